"""`semdedup export` and the `deduplicated` asset over a real pipeline run (Parquet, JSONL.gz and LAION npy shards)."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.keep import keep_for_target
from semdedup_assets.core.io.catalog import query
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import make_planted

PER_SHARD = 120


def _write_inputs(folder: Path) -> None:
    """One shard per format, every one with planted near-copies (every 4th row copies the row before)."""
    x = make_planted(3 * PER_SHARD, 12, dup_every=4, seed=3)
    parts = [x[i * PER_SHARD : (i + 1) * PER_SHARD] for i in range(3)]
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table(
            {
                "id": [f"p-{i:04d}" for i in range(PER_SHARD)],
                "lang": ["en"] * PER_SHARD,
                "embedding": pa.array(list(parts[0]), pa.list_(pa.float32())),
            }
        ),
        folder / "a.parquet",
    )
    lines = [
        json.dumps({"id": f"j-{i:04d}", "embedding": [float(v) for v in row], "n": i}) + "\n"
        for i, row in enumerate(parts[1])
    ]
    (folder / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines).encode()))
    for d in ("img_emb", "metadata"):
        (folder / "laion" / d).mkdir(parents=True)
    np.save(folder / "laion" / "img_emb" / "img_emb_0.npy", parts[2])
    pq.write_table(
        pa.table({"url": [f"http://x/{i}" for i in range(PER_SHARD)]}),
        folder / "laion" / "metadata" / "metadata_0.parquet",
    )


@pytest.fixture
def ran(tmp_path: Path, instance: dg.DagsterInstance) -> Settings:
    _write_inputs(tmp_path / "input")
    settings = Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=4,
        buckets=2,
        eps=(0.001, 0.01, 0.1),
        block_size=32,
    )
    run_pipeline(settings, instance, log=lambda m: None)
    return settings


def _kept_by_shard(settings: Settings, sql_filter: str) -> dict[str, list[int]]:
    _, rows = query(
        settings.storage_root(),
        f"SELECT r.shard, r.row FROM items i JOIN raw_items r USING (id) WHERE {sql_filter} ORDER BY r.shard, r.row",
    )
    out: dict[str, list[int]] = {}
    for shard, row in rows:
        out.setdefault(shard, []).append(row)
    return out


def _exported_rows(settings: Settings, label: str) -> dict[str, list[int]]:
    """Row numbers of each exported shard, read back from the files (the inputs number their rows)."""
    base = Path(settings.storage) / "deduplicated" / label
    src = Path(settings.input)
    a = pq.read_table(base / "a.parquet")
    assert a.schema == pq.read_schema(src / "a.parquet")
    assert a.equals(pq.read_table(src / "a.parquet").take(pa.array([int(i[2:]) for i in a.column("id").to_pylist()])))
    lines = gzip.decompress((base / "b.jsonl.gz").read_bytes()).splitlines(keepends=True)
    src_lines = gzip.decompress((src / "b.jsonl.gz").read_bytes()).splitlines(keepends=True)
    b_rows = [json.loads(ln)["n"] for ln in lines]
    assert lines == [src_lines[r] for r in b_rows]  # byte-identical lines
    urls = pq.read_table(base / "laion" / "metadata" / "metadata_0.parquet").column("url").to_pylist()
    c_rows = [int(u.rsplit("/", 1)[1]) for u in urls]
    vectors = np.load(base / "laion" / "img_emb" / "img_emb_0.npy")
    assert vectors.tobytes() == np.load(src / "laion" / "img_emb" / "img_emb_0.npy")[c_rows].tobytes()  # aligned
    return {"a": [int(i[2:]) for i in a.column("id").to_pylist()], "b": b_rows, "laion/img_emb/img_emb_0": c_rows}


def test_export_by_eps_and_by_keep_fraction(ran: Settings, capsys) -> None:
    storage = ["--storage", ran.storage]
    assert main(["export", "--select", "eps=0.01", *storage]) == 0
    expected = _kept_by_shard(ran, "i.max_sim <= 1 - 0.01")
    assert sum(map(len, expected.values())) < 3 * PER_SHARD  # the planted copies are gone
    assert _exported_rows(ran, "eps=0.01") == expected

    # keep-fraction: exactly ceil(F * items) items, the smallest max_sim first, ties by id.
    assert main(["export", "--select", "keep-fraction=0.45", *storage]) == 0
    _, rows = query(ran.storage_root(), "SELECT id, max_sim FROM items")
    n = int(np.ceil(0.45 * len(rows)))
    ids = np.array([r[0] for r in rows])
    chosen = set(ids[keep_for_target(ids, np.array([r[1] for r in rows]), n=n)].tolist())
    expected = _kept_by_shard(ran, f"i.id IN ({', '.join(repr(i) for i in sorted(chosen))})")
    assert _exported_rows(ran, "keep-fraction=0.45") == expected
    assert sum(map(len, expected.values())) == n

    capsys.readouterr()
    assert main(["export", "--select", "eps=0.01", *storage]) == 0  # nothing changed: nothing rewritten
    out = capsys.readouterr().out
    assert out.count("(unchanged)") == 3, out

    # A changed keep decision in one shard (an item flagged as contaminated) rewrites that shard only.
    from semdedup_assets.core.io import storage as st
    from semdedup_assets.core.io.schemas import CONTAMINATED_SCHEMA

    eps_kept = _kept_by_shard(ran, "i.max_sim <= 1 - 0.01")["a"]
    victim = f"p-{eps_kept[0]:04d}"
    st.atomic_write_table(
        pa.Table.from_pylist(
            [{"id": victim, "shard": "a", "reference_id": "eval-0", "score": 1.0}], schema=CONTAMINATED_SCHEMA
        ),
        ran.storage_root().contaminated_file,
    )
    assert main(["export", "--select", "eps=0.01", *storage]) == 0
    out = capsys.readouterr().out
    [line_a] = [ln for ln in out.splitlines() if ln.startswith("a: ")]
    assert not line_a.endswith("(unchanged)") and out.count("(unchanged)") == 2, out
    kept = pq.read_table(Path(ran.storage) / "deduplicated" / "eps=0.01" / "a.parquet").column("id").to_pylist()
    assert victim not in kept and len(kept) == len(eps_kept) - 1


def test_export_refuses_bad_selections_and_changed_shards(ran: Settings, capsys) -> None:
    storage = ["--storage", ran.storage]
    assert main(["export", "--select", "eps=0.02", *storage]) == 1
    assert "eps=0.02 is not configured; configured eps: 0.001, 0.01, 0.1" in capsys.readouterr().err
    assert main(["export", "--select", "keep-fraction=1.2", *storage]) == 1
    assert "keep-fraction must lie in (0, 1]" in capsys.readouterr().err
    path = Path(ran.input) / "b.jsonl.gz"
    path.write_bytes(path.read_bytes())
    os.utime(path, (1_000_000_000, 1_000_000_000))  # the shard was rewritten after it was embedded
    assert main(["export", "--select", "eps=0.01", *storage]) == 1
    assert "shard 'b' changed since it was embedded" in capsys.readouterr().err
    assert not (Path(ran.storage) / "deduplicated").exists()  # checked before anything is written


def test_deduplicated_asset_takes_the_selection_from_the_resource(ran: Settings, instance: dg.DagsterInstance) -> None:
    defs = build_definitions(ran.replace(select="eps=0.1"))
    assert sorted(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)) == ["a", "b", "laion/img_emb/img_emb_0"]
    result = defs.resolve_job_def("export_job").execute_in_process(instance=instance, partition_key="a")
    assert result.success
    [mat] = result.asset_materializations_for_node("deduplicated")
    meta = {k: v.value for k, v in mat.metadata.items()}
    expected = _kept_by_shard(ran, "i.max_sim <= 1 - 0.1")["a"]
    assert (meta["selection"], meta["kept"], meta["removed"]) == ("eps=0.1", len(expected), PER_SHARD - len(expected))
    kept = pq.read_table(Path(ran.storage) / "deduplicated" / "eps=0.1" / "a.parquet").column("id").to_pylist()
    assert [int(i[2:]) for i in kept] == expected


def _write_reference(folder: Path, x: np.ndarray, d: int | None = None) -> None:
    folder.mkdir(parents=True)
    pq.write_table(
        pa.table({"id": [f"eval-{i}" for i in range(len(x))], "embedding": pa.array(list(x), pa.list_(pa.float32()))}),
        folder / "eval.parquet",
    )


def test_planted_leak_is_flagged_and_left_out_of_the_export(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    _write_inputs(tmp_path / "input")
    dataset = pq.read_table(tmp_path / "input" / "a.parquet")
    vectors = np.asarray(dataset.column("embedding").to_pylist(), dtype=np.float32)
    rng = np.random.default_rng(7)
    # Eval items that are slightly perturbed copies of these training items (none in a planted pair 4k, 4k+1).
    leaked = [6, 50, 98]
    ref = rng.normal(size=(40, 12)).astype(np.float32)
    for k, row in enumerate(leaked):
        ref[10 + k] = vectors[row] + 0.002 * rng.normal(size=12)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    _write_reference(tmp_path / "eval", ref)
    settings = Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=4,
        buckets=2,
        eps=(0.001, 0.01, 0.1),
        block_size=32,
        reference=str(tmp_path / "eval"),
    )
    run_pipeline(settings, instance, log=lambda m: None)
    _, rows = query(
        settings.storage_root(), "SELECT id, reference_id, score FROM contaminated WHERE score > 1 - 0.01 ORDER BY id"
    )
    assert [(i, r) for i, r, _ in rows] == [(f"p-{row:04d}", f"eval-{10 + k}") for k, row in enumerate(leaked)]
    assert all(s > 0.99 for _, _, s in rows)
    assert main(["export", "--select", "eps=0.01", "--storage", settings.storage]) == 0
    kept = pq.read_table(Path(settings.storage) / "deduplicated" / "eps=0.01" / "a.parquet").column("id").to_pylist()
    dedup_kept = _kept_by_shard(settings, "i.max_sim <= 1 - 0.01")["a"]
    assert [int(i[2:]) for i in kept] == [r for r in dedup_kept if r not in leaked]


def test_reference_of_another_dimension_fails_naming_both(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    _write_inputs(tmp_path / "input")
    _write_reference(tmp_path / "eval", np.eye(8, dtype=np.float32))
    settings = Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=4,
        buckets=2,
        eps=(0.01,),
        reference=str(tmp_path / "eval"),
    )
    with pytest.raises(
        Exception, match="reference shard 'eval' has dimension 8 but the dataset's embeddings have dimension 12"
    ):
        run_pipeline(settings, instance, log=lambda m: None)
