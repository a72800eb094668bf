"""Storage layout, atomic writes, and the DuckDB catalog's views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import duplicate_ids, query, refresh_catalog
from semdedup_assets.core.io.tables import embedding_array, embedding_matrix
from semdedup_assets.core.settings_store import load_settings, save_settings


def test_layout_and_nested_shard_keys(tmp_path: Path) -> None:
    s = st.Storage(tmp_path)
    assert str(s.shard_file(st.EMBEDDINGS, "2024/part-03")) == str(tmp_path / "embeddings" / "2024" / "part-03.parquet")
    assert str(s.keep_list_file(0.01)).endswith("keep_lists/eps=0.01.parquet")
    assert str(s.bucket_file("007")).endswith("semantic_duplicates/bucket-007.parquet")
    st.atomic_write_table(pa.table({"id": ["a"]}), s.shard_file(st.RAW, "2024/part-03"))
    assert s.shard_of(st.RAW, s.stage_files(st.RAW)[0]) == "2024/part-03"


def test_atomic_writer_leaves_nothing_on_abort(tmp_path: Path) -> None:
    path = st.Storage(tmp_path).shard_file(st.RAW, "x")
    w = st.AtomicParquetWriter(path, pa.schema([("id", pa.string())]))
    w.write(pa.table({"id": ["a"]}))
    w.abort()
    assert not list(tmp_path.rglob("*.parquet")) and not list(tmp_path.rglob("*.tmp"))
    w = st.AtomicParquetWriter(path, pa.schema([("id", pa.string())]))
    w.write(pa.table({"id": ["a", "b"]}))
    assert not path.exists()  # not visible before commit
    w.commit()
    assert st.parquet_num_rows(path) == 2 and not list(tmp_path.rglob("*.tmp"))


def test_identical_tables_give_identical_bytes(tmp_path: Path) -> None:
    t = pa.table({"id": ["a", "b"], "x": [1.0, 2.0]})
    a, b = st.to_upath(tmp_path / "a.parquet"), st.to_upath(tmp_path / "b.parquet")
    st.atomic_write_table(t, a)
    st.atomic_write_table(t, b)
    assert a.read_bytes() == b.read_bytes()


def test_embedding_columns_are_stored_plain_and_the_rest_compressed(tmp_path: Path) -> None:
    table = pa.table({"id": pa.array(["a", "b"]), "embedding": embedding_array(np.eye(2, 4, dtype=np.float32))})
    path = st.to_upath(tmp_path / "t.parquet")
    st.atomic_write_table(table, path)
    import pyarrow.parquet as pq

    cols = {c.path_in_schema: c for c in (pq.read_metadata(str(path)).row_group(0).column(i) for i in range(2))}
    assert cols["id"].compression == "ZSTD" and "RLE_DICTIONARY" in cols["id"].encodings
    assert cols["embedding.list.element"].compression == "UNCOMPRESSED"
    assert "RLE_DICTIONARY" not in cols["embedding.list.element"].encodings
    assert st.read_table(path).equals(table)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_embedding_columns_roundtrip_non_null_in_both_dtypes(tmp_path: Path, dtype: str) -> None:
    from semdedup_assets.core.io.schemas import embedding_field
    from semdedup_assets.core.io.tables import stored_dtype

    x = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    schema = pa.schema([embedding_field("embedding", 6, dtype)])
    table = pa.Table.from_arrays([embedding_array(x, dtype)], schema=schema)
    path = st.to_upath(tmp_path / "p.parquet")
    st.atomic_write_table(table, path)
    back = st.read_table(path)
    assert back.schema == schema and stored_dtype(back.schema.field("embedding")) == dtype
    expected = x.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(embedding_matrix(back.column("embedding")), expected)
    np.testing.assert_array_equal(embedding_matrix(back.slice(7, 20).column("embedding")), expected[7:27])
    with pytest.raises(ValueError, match="dtype"):
        embedding_array(x, "float64")


def test_memory_filesystem_root() -> None:
    s = st.Storage("memory://semdedup-test")
    assert not s.local
    st.atomic_write_table(pa.table({"id": ["a"]}), s.shard_file(st.RAW, "p"))
    assert st.read_table(s.shard_file(st.RAW, "p")).column("id").to_pylist() == ["a"]


def test_embedding_roundtrip_zero_copy_slices() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    arr = embedding_array(x)
    np.testing.assert_array_equal(embedding_matrix(arr), x)
    np.testing.assert_array_equal(embedding_matrix(arr.slice(1, 2)), x[1:3])


def test_catalog_views_exist_before_any_data(tmp_path: Path) -> None:
    s = st.Storage(tmp_path)
    refresh_catalog(s)
    for view in ("items", "embeddings", "centroids", "eps_curve", "raw_items", "cluster_assignments"):
        cols, rows = query(s, f"SELECT * FROM {view}")
        assert rows == [] and cols
    cols, _ = query(s, "SELECT * FROM items")
    assert cols == ["id", "shard", "cluster", "sim_to_centroid", "max_sim", "duplicate_of", "exact_of"]


def test_duplicate_ids_names_both_places(tmp_path: Path) -> None:
    s = st.Storage(tmp_path)
    st.atomic_write_table(
        pa.table({"id": ["a", "b"], "shard": ["s1", "s1"], "row": [0, 1]}), s.shard_file(st.RAW, "s1")
    )
    pending = pa.table({"id": ["c", "b"], "shard": ["s2", "s2"], "row": [0, 1]})
    assert duplicate_ids(s, pending, exclude_shards=["s2"]) == [("b", "s1", 1, "s2", 1)]
    assert duplicate_ids(s, pending, exclude_shards=["s1", "s2"]) == []


def test_settings_roundtrip_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(storage=str(tmp_path), input="/data", clusters=7, eps=(0.1, 0.01), buckets=4)
    save_settings(s)
    loaded = load_settings(str(tmp_path))
    assert loaded.clusters == 7 and loaded.eps == (0.01, 0.1) and loaded.input == "/data"
    monkeypatch.setenv("SEMDEDUP_BUCKETS", "9")
    assert load_settings(str(tmp_path)).buckets == 9
    assert load_settings(str(tmp_path), clusters=3).clusters == 3
    with pytest.raises(ValueError, match="eps"):
        Settings(eps=(0.0,))
    assert Settings().n_clusters(10_000) == 100 and Settings(clusters=50).n_clusters(10) == 10


def test_every_scan_runs_under_a_quarter_of_the_memory_budget_by_default(tmp_path) -> None:
    """catalog.scan's callers need not pass a limit: a storage from the settings carries its scan memory (a quarter
    of the budget, at least MIN_SCAN_MEMORY), so no scan gets DuckDB's default of 80% of the machine."""
    from semdedup_assets.core.config import Settings
    from semdedup_assets.core.io.catalog import MIN_SCAN_MEMORY, scan

    limit = "SELECT current_setting('memory_limit'), current_setting('temp_directory')"
    storage = Settings(storage=str(tmp_path), memory_budget="4GB").storage_root()
    assert storage.scan_memory == 2**30
    [(memory, scratch)] = scan(storage, limit)
    assert memory == "1.0 GiB" and "semdedup-duckdb-" in scratch  # spills to a scratch folder beyond it
    storage = Settings(storage=str(tmp_path), memory_budget="8MB").storage_root()
    assert scan(storage, limit)[0][0] == f"{MIN_SCAN_MEMORY / 2**20:.1f} MiB"
    assert scan(storage, limit, memory_limit=2**31)[0][0] == "2.0 GiB"  # an explicit limit wins
