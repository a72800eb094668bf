"""Test data shared by the tests and the benchmarks (not part of the package): small datasets written
as real shard files (text with planted near-copies, bring-your-own embeddings), a tiny CLIP."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semdedup_assets.core.embed.encoders.clip_pretrained import LOCAL_DIR_PREFIX, OPEN_CLIP_CONFIG
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import SEMANTIC_DUPLICATES_SCHEMA

TINY_ARCH = "tiny-test-vit"
# A few-hundred-kB ViT for offline tests and smoke runs; the vocabulary size must match
# open_clip's bundled BPE tokenizer, which dominates the parameter count.
_TINY_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder: str | os.PathLike[str], seed: int = 0) -> dict[str, str]:
    """Build a tiny random open_clip model offline and save it as a checkpoint and a local-dir folder."""
    import open_clip
    import torch

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    # Registering the arch lets `OpenClipImageEncoder(TINY_ARCH, pretrained=<file>)` find it.
    config_path = root / f"{TINY_ARCH}.json"
    config_path.write_text(json.dumps(_TINY_CFG, indent=2))
    open_clip.add_model_config(config_path)

    # A private RNG stream: same weights for the same seed, caller's RNG state untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = open_clip.create_model(TINY_ARCH, pretrained=None, device="cpu")
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}

    checkpoint = root / "tiny.pt"
    torch.save(state, checkpoint)

    local = root / "local"
    local.mkdir(exist_ok=True)
    preprocess_cfg = dict(net.visual.preprocess_cfg)
    (local / OPEN_CLIP_CONFIG).write_text(
        json.dumps({"model_cfg": _TINY_CFG, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    try:
        from safetensors.torch import save_file
    except ImportError:  # safetensors is optional for open_clip; its .bin name works too
        torch.save(state, local / "open_clip_pytorch_model.bin")
    else:
        save_file(state, str(local / "open_clip_model.safetensors"))
    return {
        "arch": TINY_ARCH,
        "config": str(config_path),
        "checkpoint": str(checkpoint),
        "local_dir": LOCAL_DIR_PREFIX + str(local),
    }


# Real English sentences with planted paraphrases/near-copies (pairs share an index).
BASE_SENTENCES = [
    "The cat sat on the mat and watched the birds outside.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "The football match was postponed because of heavy rain.",
    "Python lists are mutable sequences that can hold items of any type.",
    "A healthy breakfast includes fruit, whole grains and protein.",
    "The museum opened a new exhibition of impressionist paintings.",
    "Volcanoes form where magma rises through cracks in the earth's crust.",
    "She practised the violin for two hours every evening.",
    "Electric cars are becoming cheaper as battery prices drop.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Mount Everest is the highest mountain above sea level.",
    "The library extended its opening hours during exam season.",
    "Honey bees communicate the location of flowers by dancing.",
    "The train to Edinburgh was delayed by forty minutes.",
    "Regular exercise lowers the risk of heart disease.",
]
NEAR_COPIES = {
    0: "The cat sat on the mat and watched the birds outside!",
    1: "Stock markets fell sharply after the central bank raised its interest rates.",
    4: "Python lists are mutable sequences which can hold items of any type.",
    9: "Electric cars are becoming cheaper as the battery prices drop.",
    13: "Honeybees communicate the location of flowers by dancing.",
}


def text_rows(n_shards: int = 2) -> list[list[dict[str, str]]]:
    """Rows per shard: every base sentence once, near-copies placed in other shards."""
    shards: list[list[dict[str, str]]] = [[] for _ in range(n_shards)]
    for i, s in enumerate(BASE_SENTENCES):
        shards[i % n_shards].append({"id": f"base-{i:02d}", "text": s})
    for i, s in NEAR_COPIES.items():
        shards[(i + 1) % n_shards].append({"id": f"copy-{i:02d}", "text": s})
    return shards


def write_text_shards(folder: Path, n_shards: int = 2, fmt: str = "parquet") -> list[Path]:
    """Write the small text dataset as Parquet or JSON Lines shards."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, rows in enumerate(text_rows(n_shards)):
        path = folder / f"part-{k:02d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(rows), path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def make_planted(n: int, d: int, dup_every: int, seed: int = 0, noise: float = 0.01) -> np.ndarray:
    """Random unit vectors where every dup_every-th row is a noisy copy of the row before."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    for i in range(1, n, dup_every):
        x[i] = x[i - 1] + noise * rng.normal(size=d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedding_shards(
    folder: Path, n_shards: int = 4, per_shard: int = 300, d: int = 16, dup_every: int = 10, seed: int = 0
) -> np.ndarray:
    """Bring-your-own-embedding shards with planted duplicates; returns the full matrix."""
    folder.mkdir(parents=True, exist_ok=True)
    x = make_planted(n_shards * per_shard, d, dup_every, seed)
    for s in range(n_shards):
        part = x[s * per_shard : (s + 1) * per_shard]
        pq.write_table(
            pa.table(
                {
                    "id": [f"s{s}-{i:05d}" for i in range(per_shard)],
                    "embedding": pa.array(list(part), type=pa.list_(pa.float32())),
                }
            ),
            folder / f"part-{s:02d}.parquet",
        )
    return x


def write_embeddings_and_reference(root: Path, per_shard: int, d: int) -> dict[str, Path]:
    """Three bring-your-own shards under root/input and a --reference root/ref (a copy of part-00: all flagged)."""
    write_embedding_shards(root / "input", n_shards=3, per_shard=per_shard, d=d)
    (root / "ref").mkdir()
    shutil.copy(root / "input" / "part-00.parquet", root / "ref" / "eval.parquet")
    return {"root": root, "input": root / "input", "storage": root / "storage", "ref": root / "ref"}


def write_bucket_results(root: Path, n: int, cluster: int, seed: int = 0, buckets: int = 4) -> None:
    """Synthetic `semantic_duplicates` bucket files of `n` items in clusters of `cluster` members, rows in the rule's
    order per cluster: every non-first member points at a random earlier member of its cluster (chains of every
    length), half of them with max_sim in [0.9, 1) (removed at eps 0.1), the rest in [0.3, 0.9)."""
    rng = np.random.default_rng(seed)
    k = n // cluster
    folder = root / st.SEMANTIC_DUPLICATES
    folder.mkdir(parents=True, exist_ok=True)
    for b, clusters in enumerate(np.array_split(np.arange(k), buckets)):
        m = len(clusters) * cluster
        c = np.repeat(clusters, cluster).astype(np.int32)
        rank = np.tile(np.arange(cluster), len(clusters)).astype(np.int64)
        ids = np.char.add(np.char.add(c.astype(str), "-"), rank.astype(str))
        earlier = (rng.random(m) * rank).astype(np.int64)  # a random earlier member of the same cluster
        has = rank > 0
        dup = np.where(has, np.char.add(np.char.add(c.astype(str), "-"), earlier.astype(str)), None)
        max_sim = np.where(has, np.where(rng.random(m) < 0.5, rng.uniform(0.9, 1.0, m), rng.uniform(0.3, 0.9, m)), 0.0)
        table = pa.table(
            {
                "id": ids.tolist(),
                "shard": ["s"] * m,
                "cluster": c,
                "rank": rank,
                "sim_to_centroid": rng.random(m),
                "max_sim": max_sim,
                "duplicate_of": pa.array(dup.tolist(), pa.string()),
            },
            schema=SEMANTIC_DUPLICATES_SCHEMA,
        )
        pq.write_table(table, folder / f"bucket-{b:03d}.parquet", row_group_size=st.STREAM_ROW_GROUP)
