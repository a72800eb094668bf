"""A storage holds exactly what the current settings and shards imply (issue 16).

One test per defect: changed bucket counts, stale keep-lists, failed runs that left
shards behind, a named id column that is missing, and the smaller ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.shards import ShardError, discover_shards, read_shard
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import PipelineError, forget_shard, run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards, write_text_shards


def _settings(tmp_path: Path, **kw) -> Settings:
    base = dict(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=6,
        buckets=4,
        eps=(0.001, 0.01, 0.1),
    )
    base.update(kw)
    return Settings(**base)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.parquet")) if folder.exists() else []


def _checks(run: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in run.get_asset_check_evaluations()}


def test_fewer_buckets_leave_no_old_bucket_results(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 1: after --buckets 4 then --buckets 2, `items` has one row per id."""
    x = write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    run_pipeline(_settings(tmp_path, buckets=4), instance, log=lambda m: None)
    settings = _settings(tmp_path, buckets=2)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    assert _files(tmp_path / "storage" / st.SEMANTIC_DUPLICATES) == ["bucket-000.parquet", "bucket-001.parquet"]
    _, [(rows, ids)] = query(storage, "SELECT count(*), count(DISTINCT id) FROM items")
    assert rows == ids == len(x)


def test_checks_count_the_files_on_disk(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 1: a leftover bucket file fails `every_item_in_one_bucket`; stray files fail `files_match_partitions`."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    shutil.copy(storage.bucket_file("001"), storage.stage_dir(st.SEMANTIC_DUPLICATES) / "bucket-009.parquet")
    shutil.copy(storage.shard_file(st.RAW, "part-00"), storage.shard_file(st.RAW, "ghost"))
    defs = build_definitions(settings)
    run = defs.resolve_job_def("keep_lists_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not run.success
    checks = _checks(run)
    assert not checks["every_item_in_one_bucket"].passed
    assert not checks["files_match_partitions"].passed
    description = checks["files_match_partitions"].description
    assert "bucket partitions" in description and "'009'" in description and "'ghost'" in description
    # Materializing the owning stages removes what no longer belongs; then every check passes again.
    run_pipeline(settings, instance, log=lambda m: None)
    assert not storage.shard_file(st.RAW, "ghost").exists()
    assert not (storage.stage_dir(st.SEMANTIC_DUPLICATES) / "bucket-009.parquet").exists()


def test_keep_lists_follow_the_configured_eps_and_forget(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 2: keep-lists of eps no longer configured go; forget rewrites every keep-list."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    run_pipeline(_settings(tmp_path, eps=(0.01, 0.05, 0.2)), instance, log=lambda m: None)
    settings = _settings(tmp_path, eps=(0.1, 0.3))
    run_pipeline(settings, instance, log=lambda m: None)
    keep_dir = tmp_path / "storage" / st.KEEP_LISTS
    assert _files(keep_dir) == ["eps=0.1.parquet", "eps=0.3.parquet", "eps_curve.parquet"]
    forget_shard(settings, instance, "part-01", log=lambda m: None)
    for path in keep_dir.glob("eps=*.parquet"):
        shards = set(pq.read_table(path, columns=["shard"]).column("shard").to_pylist())
        assert shards == {"part-00"}, path.name


def _registered(instance: dg.DagsterInstance) -> list[str]:
    return list(instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))


def test_failed_validation_leaves_no_trace(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 3: a bad shard fails the run with no partition and no raw/ file; the retry works."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8)
    bad = tmp_path / "input" / "b-bad.parquet"
    pq.write_table(pa.table({"id": ["z0"], "embedding": pa.array([[np.nan] * 8], pa.list_(pa.float32()))}), bad)
    settings = _settings(tmp_path)
    with pytest.raises(PipelineError, match="b-bad"):
        run_pipeline(settings, instance, log=lambda m: None)
    assert _registered(instance) == []
    assert _files(tmp_path / "storage") == []
    bad.unlink()
    run_pipeline(settings, instance, log=lambda m: None)
    assert sorted(_registered(instance)) == ["part-00", "part-01"]


@pytest.mark.slow
def test_failed_embedding_withdraws_only_the_new_shards(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 3: missing weights fail the embedding step; the run's new shards are withdrawn, earlier ones stay."""
    write_text_shards(tmp_path / "input", n_shards=2)
    settings = _settings(tmp_path, modality="text", clusters=2, buckets=1)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    before = {p: p.read_bytes() for p in storage.stage_files(st.EMBEDDINGS)}
    pq.write_table(
        pa.table({"id": ["n0", "n1"], "text": ["A new shard.", "Another new line."]}),
        tmp_path / "input" / "part-02.parquet",
    )
    (tmp_path / "no-model").mkdir()  # a folder without weights: refused by the embed step, not before the run
    with pytest.raises(PipelineError, match="ingest"):
        run_pipeline(
            _settings(tmp_path, modality="text", clusters=2, buckets=1, model=str(tmp_path / "no-model")),
            instance,
            log=lambda m: None,
        )
    assert sorted(_registered(instance)) == ["part-00", "part-01"]
    for stage in (st.RAW, st.EMBEDDINGS):
        assert _files(tmp_path / "storage" / stage) == ["part-00.parquet", "part-01.parquet"]
    assert {p: p.read_bytes() for p in storage.stage_files(st.EMBEDDINGS)} == before
    run_pipeline(settings, instance, log=lambda m: None)
    _, [(n,)] = query(storage, "SELECT count(*) FROM items")
    assert n == 23


def test_a_named_id_column_must_exist(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 5: `--id-column doc_idd` on shards with `doc_id` is an error; only the default `id` falls back."""
    (tmp_path / "input").mkdir()
    pq.write_table(pa.table({"doc_id": ["a", "b"], "text": ["one", "two"]}), tmp_path / "input" / "p.parquet")
    [shard] = discover_shards(tmp_path / "input")
    with pytest.raises(ShardError, match=r"shard 'p'.*missing id column 'doc_idd' \(columns: doc_id, text\)"):
        read_shard(shard, "text", "text", id_column="doc_idd")
    assert read_shard(shard, "text", "text", id_column="id").table.column("id").to_pylist() == ["p:0", "p:1"]
    assert read_shard(shard, "text", "text", id_column="doc_id").table.column("id").to_pylist() == ["a", "b"]
    write_embedding_shards(tmp_path / "emb", n_shards=1, per_shard=10, d=4)
    with pytest.raises(PipelineError, match="missing id column 'doc_idd'"):
        run_pipeline(
            _settings(tmp_path, input=str(tmp_path / "emb"), id_column="doc_idd"), instance, log=lambda m: None
        )
    assert _registered(instance) == []


def test_sql_on_a_missing_storage_fails_and_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Defect 6: `semdedup sql --storage /nonexistent` names the path and creates nothing."""
    from semdedup_assets.cli import main

    missing = tmp_path / "nonexistent"
    assert main(["sql", "SELECT 1", "--storage", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not missing.exists()


def test_jsonl_field_of_mixed_types_names_shard_and_row(tmp_path: Path) -> None:
    """Defect 6: `"text": 5` in one line of a JSONL shard names the shard and the row."""
    lines = [{"id": "a", "text": "fine"}, {"id": "b", "text": "also fine"}, {"id": "c", "text": 5}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    [shard] = discover_shards(tmp_path)
    with pytest.raises(ShardError) as err:
        read_shard(shard, "text", "text")
    assert err.value.shard == "mixed" and err.value.row == 2
    assert "'text' is a number here but a string in row 0" in str(err.value)


def test_no_shard_files_message_lists_every_format(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 6: the "no shard files" message names every supported extension."""
    (tmp_path / "input").mkdir()
    with pytest.raises(PipelineError) as err:
        run_pipeline(_settings(tmp_path), instance, log=lambda m: None)
    for suffix in (".parquet", ".jsonl", ".jsonl.gz", ".tar", ".npy"):
        assert suffix in str(err.value)


def test_per_partition_metadata_is_per_partition(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    """Defect 6: each shard's materialization shows its own rows, not the run's total."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=30, d=8)
    pq.write_table(
        pa.table(
            {
                "id": [f"x{i}" for i in range(7)],
                "embedding": pa.array(list(np.eye(8, dtype=np.float32)[:7]), pa.list_(pa.float32())),
            }
        ),
        tmp_path / "input" / "part-02.parquet",
    )
    run_pipeline(_settings(tmp_path), instance, log=lambda m: None)
    expected = {"part-00": 30, "part-01": 30, "part-02": 7}
    for asset in ("raw_shards", "embeddings", "cluster_assignments"):
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
        assert len(records) == 3, asset  # one event per partition
        for record in records:
            meta = record.asset_materialization.metadata
            assert meta["rows"].value == expected[record.partition_key], (asset, record.partition_key)
            assert meta["run_rows"].value == 67 and meta["shards_in_run"].value == 3
    storage = _settings(tmp_path).storage_root()
    buckets = instance.fetch_materializations(dg.AssetKey("semantic_duplicates"), limit=100).records
    assert len(buckets) == 4
    for record in buckets:
        meta = record.asset_materialization.metadata
        assert meta["rows"].value == st.parquet_num_rows(storage.bucket_file(record.partition_key))
        assert meta["run_rows"].value == 67 and meta["buckets_in_run"].value == 4


def test_partition_metadata_reads_the_partition_keys_once_per_step(
    tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`add_asset_metadata(partition_key=...)` re-read every dynamic partition key on each call (O(P^2) per run:
    45 s of a 181 s run at 1,000 shards); inside partition_keys_read_once the instance answers from a memo, and
    its own methods are back afterwards. Run with 8 shards and with 2: the reads per run do not grow with them."""
    from semdedup_assets.assets.common import partition_keys_read_once

    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [f"k{i}" for i in range(5)])
    calls: list[str] = []
    storage_get = type(instance).get_dynamic_partitions

    def counted(self: dg.DagsterInstance, *args: object, **kwargs: object) -> object:
        calls.append(str(args[0] if args else kwargs["partitions_def_name"]))
        return storage_get(self, *args, **kwargs)

    monkeypatch.setattr(type(instance), "get_dynamic_partitions", counted)
    with partition_keys_read_once(instance):
        assert [instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME) for _ in range(10)][-1] == [
            f"k{i}" for i in range(5)
        ]
        assert instance.has_dynamic_partition(SHARDS_PARTITIONS_NAME, "k3")
        assert not instance.has_dynamic_partition(SHARDS_PARTITIONS_NAME, "nope")
    assert calls == [SHARDS_PARTITIONS_NAME]
    assert "get_dynamic_partitions" not in vars(instance) and "has_dynamic_partition" not in vars(instance)
    instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)
    assert len(calls) == 2  # the instance's own method again

    reads = {}
    for n_shards in (2, 8):
        calls.clear()
        with dg.instance_for_test() as fresh:
            monkeypatch.setattr(type(fresh), "get_dynamic_partitions", counted)
            write_embedding_shards(tmp_path / f"in{n_shards}", n_shards=n_shards, per_shard=20, d=8)
            run_pipeline(
                Settings(
                    storage=str(tmp_path / f"s{n_shards}"),
                    input=str(tmp_path / f"in{n_shards}"),
                    modality="embedding",
                    clusters=2,
                    buckets=2,
                ),
                fresh,
                log=lambda m: None,
            )
        reads[n_shards] = len(calls)
    assert reads[8] <= reads[2] + 3, reads  # was 3 per shard and per-shard stage more
