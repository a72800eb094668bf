"""Bring your own embeddings in LAION's published layout: `img_emb/img_emb_N.npy` + `metadata/metadata_N.parquet`.

    python examples/laion_embeddings.py [--workdir DIR]
    python examples/laion_embeddings.py --data-only DIR     # only write the shards (the Dagster project's data)

Writes two small shards of unit vectors (with planted near-copies) in LAION-400M's layout, with
the `key` column as id, runs the whole graph with no model at all (`--modality embedding`) and
exports the deduplicated shards: the `.npy` and its metadata filtered together, still aligned row
for row. The same command runs on the real set (`--clusters 50000` for 400M items).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from helpers import example_parser, semdedup, workdir


def write_shards(root: Path, n_shards: int = 2, per_shard: int = 200, d: int = 32, seed: int = 0) -> None:
    """n_shards pairs of img_emb_N.npy (float16, as LAION ships) and metadata_N.parquet; every 10th row is a
    slightly perturbed copy of the row before it."""
    rng = np.random.default_rng(seed)
    (root / "img_emb").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    for n in range(n_shards):
        x = rng.standard_normal((per_shard, d)).astype(np.float32)
        x[9::10] = x[8::10] + 0.01 * rng.standard_normal((per_shard // 10, d)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        np.save(root / "img_emb" / f"img_emb_{n}.npy", x.astype(np.float16))
        keys = [f"{n:05d}{i:04d}" for i in range(per_shard)]
        pq.write_table(
            pa.table(
                {
                    "key": keys,
                    "url": [f"https://example.org/{k}.jpg" for k in keys],
                    "caption": [f"caption {k}" for k in keys],
                }
            ),
            root / "metadata" / f"metadata_{n}.parquet",
        )


def main() -> None:
    parser = example_parser(__doc__)
    parser.add_argument("--data-only", type=Path, default=None, metavar="DIR", help="write the shards to DIR and stop")
    args = parser.parse_args()
    if args.data_only is not None:
        write_shards(args.data_only)
        return
    work = workdir(args, "laion")
    write_shards(work / "laion400m")
    storage = str(work / "storage")
    semdedup(
        "run",
        "--input",
        str(work / "laion400m"),
        "--storage",
        storage,
        "--modality",
        "embedding",
        "--id-column",
        "key",
        "--clusters",
        "4",
        "--buckets",
        "2",
        "--eps",
        "0.001,0.01,0.05",
    )
    semdedup("export", "--select", "eps=0.01", "--storage", storage)
    kept = np.load(Path(storage) / "deduplicated" / "eps=0.01" / "img_emb" / "img_emb_0.npy")
    meta = pq.read_table(Path(storage) / "deduplicated" / "eps=0.01" / "metadata" / "metadata_0.parquet")
    print(f"shard 0 after deduplication: {len(kept)} vectors, {meta.num_rows} metadata rows")


if __name__ == "__main__":
    main()
