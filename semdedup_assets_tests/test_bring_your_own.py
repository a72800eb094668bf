"""Bring-your-own embeddings: Parquet embedding columns and LAION-style npy + metadata pairs."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.shards import discover_shards, iter_embedding_chunks
from semdedup_assets.pipeline import PipelineError, run_pipeline
from semdedup_assets_tests.fixtures import make_planted


def write_laion(
    folder: Path, n_shards: int = 3, rows: int = 200, d: int = 16, dtype=np.float16, scale: float = 1.0
) -> np.ndarray:
    """LAION's layout: img_emb/img_emb_N.npy with metadata/metadata_N.parquet (url, caption, key)."""
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(parents=True, exist_ok=True)
    x = make_planted(n_shards * rows, d, dup_every=8, seed=5) * scale
    for n in range(n_shards):
        part = x[n * rows : (n + 1) * rows]
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", part.astype(dtype))
        pq.write_table(
            pa.table(
                {
                    "key": [f"{n:05d}{i:04d}" for i in range(rows)],
                    "url": [f"https://example.org/{n}/{i}.jpg" for i in range(rows)],
                    "caption": [f"caption {i}" for i in range(rows)],
                }
            ),
            folder / "metadata" / f"metadata_{n}.parquet",
        )
    return x


def _settings(tmp_path: Path, **kw) -> Settings:
    base = dict(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        id_column="key",
        clusters=5,
        buckets=2,
        eps=(0.001, 0.01, 0.1),
    )
    base.update(kw)
    return Settings(**base)


def test_laion_layout_pairs_npy_with_metadata(tmp_path: Path) -> None:
    write_laion(tmp_path / "input", n_shards=2, rows=10)
    shards = discover_shards(tmp_path / "input")
    assert [s.key for s in shards] == ["img_emb/img_emb_0", "img_emb/img_emb_1"]
    assert shards[0].metadata.name == "metadata_0.parquet"
    chunks = list(iter_embedding_chunks(shards[0], chunk_rows=4))
    assert [len(c) for c in chunks] == [4, 4, 2] and chunks[0].dtype == np.float32


def test_laion_layout_through_the_graph(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    x = write_laion(tmp_path / "input", scale=3.0)  # norms 3: re-normalised and reported
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    _, [(n, dups)] = query(storage, "SELECT count(*), count(*) FILTER (max_sim > 0.99) FROM items")
    assert n == len(x) and dups == len(range(1, len(x), 8))
    _, [(ident,)] = query(storage, "SELECT min(id) FROM items")
    assert ident == "000000000"  # ids from the metadata's key column
    _, [(norm,)] = query(storage, "SELECT max(abs(list_dot_product(embedding, embedding) - 1)) FROM embeddings")
    assert norm < 1e-5
    events = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=10).records
    assert [e.asset_materialization.metadata["renormalised_rows"].value for e in events] == [200] * 3  # per shard
    assert events[0].asset_materialization.metadata["run_renormalised_rows"].value == len(x)


def test_parquet_float16_fixed_size_embeddings(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    x = make_planted(300, 8, dup_every=6, seed=2)
    (tmp_path / "input").mkdir()
    for s in range(2):
        part = x[s * 150 : (s + 1) * 150].astype(np.float16)
        col = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1), pa.float16()), 8)
        pq.write_table(
            pa.table({"key": [f"{s}-{i}" for i in range(150)], "vec": col}), tmp_path / "input" / f"p{s}.parquet"
        )
    settings = _settings(tmp_path, column="vec", clusters=3)
    run_pipeline(settings, instance, log=lambda m: None)
    _, [(n, dups)] = query(settings.storage_root(), "SELECT count(*), count(*) FILTER (max_sim > 0.99) FROM items")
    assert n == 300 and dups == 50


def _fails(tmp_path: Path, instance: dg.DagsterInstance, match: str) -> str:
    with pytest.raises(PipelineError, match=match) as exc:
        run_pipeline(_settings(tmp_path), instance, log=lambda m: None)
    storage = tmp_path / "storage"
    assert not [p for p in storage.rglob("*.parquet") if "dagster_home" not in str(p)]
    return str(exc.value)


def test_mismatched_row_counts(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_laion(tmp_path / "input", n_shards=2, rows=20)
    pq.write_table(
        pq.read_table(tmp_path / "input" / "metadata" / "metadata_1.parquet").slice(0, 19),
        tmp_path / "input" / "metadata" / "metadata_1.parquet",
    )
    msg = _fails(tmp_path, instance, "img_emb_1.npy has 20 rows but its metadata metadata_1.parquet has 19")
    assert "shard 'img_emb/img_emb_1'" in msg


def test_nan_row(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_laion(tmp_path / "input", n_shards=2, rows=20)
    x = np.load(tmp_path / "input" / "img_emb" / "img_emb_0.npy")
    x[13, 4] = np.nan
    np.save(tmp_path / "input" / "img_emb" / "img_emb_0.npy", x)
    msg = _fails(tmp_path, instance, "non-finite")
    assert "shard 'img_emb/img_emb_0', row 13" in msg


def test_wrong_dimension_across_shards(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_laion(tmp_path / "input", n_shards=2, rows=20, d=16)
    np.save(tmp_path / "input" / "img_emb" / "img_emb_1.npy", make_planted(20, 12, 4).astype(np.float16))
    msg = _fails(tmp_path, instance, "dimension 12 differs")
    assert "shard 'img_emb/img_emb_1'" in msg and "'img_emb/img_emb_0' (16)" in msg


def test_missing_metadata(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_laion(tmp_path / "input", n_shards=2, rows=20)
    (tmp_path / "input" / "metadata" / "metadata_1.parquet").unlink()
    msg = _fails(tmp_path, instance, "no metadata Parquet")
    assert "shard 'img_emb/img_emb_1'" in msg
