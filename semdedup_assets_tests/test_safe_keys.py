"""Hostile shard keys through every entry point: they never become a path outside a stage folder."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.shards import discover_shards
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards

HOSTILE = ["../x", "a/../../x", "/etc/passwd", "a//b", "a/", "./a", "a\\..\\b", "a\x00b", "a\nb", ""]


@pytest.mark.parametrize("key", HOSTILE)
def test_validate_shard_key_refuses_and_names_the_key(key: str) -> None:
    with pytest.raises(st.UnsafeKeyError, match="unsafe shard key") as err:
        st.validate_shard_key(key)
    assert repr(key) in str(err.value)
    with pytest.raises(st.UnsafeKeyError):
        st.Storage("/tmp/s").shard_file(st.EMBEDDINGS, key)


@pytest.mark.parametrize("key", ["part-03", "2024/part-03", "a..b", "x.y/z-1_2", "späť"])
def test_ordinary_keys_pass(key: str) -> None:
    assert st.validate_shard_key(key) == key
    assert str(st.Storage("/tmp/s").shard_file(st.RAW, key)) == f"/tmp/s/raw/{key}.parquet"


def _memory_input_with_hostile_key() -> str:
    """An object-store listing (fsspec memory) that holds a key with `..` segments, kept literally."""
    root = f"memory://in-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for name in ("ok.parquet", "a/../../x.parquet"):
        with fs.open(f"{root}/{name}", "wb") as f:
            pq.write_table(pa.table({"id": [name], "embedding": pa.array([[1.0, 0.0]], pa.list_(pa.float32()))}), f)
    return root


def test_object_store_key_with_dotdot_is_refused_by_discovery() -> None:
    root = _memory_input_with_hostile_key()
    with pytest.raises(st.UnsafeKeyError, match=r"'a/\.\./\.\./x'"):
        discover_shards(root)


def test_object_store_key_with_dotdot_is_refused_by_run_and_sensor(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    settings = Settings(storage=str(tmp_path / "storage"), input=_memory_input_with_hostile_key(), modality="embedding")
    with pytest.raises(st.UnsafeKeyError, match="unsafe shard key"):
        run_pipeline(settings, instance, log=lambda m: None)
    defs = build_definitions(settings)
    ctx = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs)
    with pytest.raises(Exception, match="unsafe shard key"):
        defs.resolve_sensor_def("shard_sensor").evaluate_tick(ctx)
    assert not instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".parquet")]


def test_cli_forget_never_deletes_outside_the_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Regression: `forget ../../../victim` resolved <storage>/raw/../../../victim.parquet and deleted it."""
    from semdedup_assets.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    storage = tmp_path / "deep" / "storage"
    storage.mkdir(parents=True)
    victim = tmp_path / "victim.parquet"  # = <storage>/raw/../../../victim.parquet
    pq.write_table(pa.table({"x": [1]}), victim)
    for key in ("../../../victim", "/" + str(victim)[1 : -len(".parquet")]):
        assert main(["forget", key, "--storage", str(storage)]) != 0
        assert "unsafe shard key" in capsys.readouterr().err
        assert victim.exists()


def test_ui_style_partition_with_dotdot_touches_no_file_outside_the_root(
    tmp_path: Path, instance: dg.DagsterInstance
) -> None:
    """A partition added through the instance (as the UI or GraphQL would) named '../../victim'.

    Before the fix, `cluster_assignments` for it read <storage>/embeddings/../../victim.parquet
    and overwrote <storage>/cluster_assignments/../../victim.parquet: the same file, outside the root.
    """
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8)
    settings = Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=3,
        buckets=2,
        eps=(0.01,),
    )
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    victim = tmp_path / "victim.parquet"
    shutil.copy(str(storage.shard_file(st.CLUSTER_ASSIGNMENTS, "part-00")), victim)  # id + embedding columns
    before = victim.read_bytes()

    key = "../../victim"
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, [key])
    defs = build_definitions(settings)
    for job in ("assign_job", "ingest_job"):
        run = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=key, raise_on_error=False)
        assert victim.read_bytes() == before
        assert not run.success
        failures = [e.step_failure_data.error for e in run.all_events if e.is_step_failure]
        assert failures and any("unsafe shard key '../../victim'" in (f.message + str(f.cause)) for f in failures)
    run = defs.resolve_job_def("centroids_job").execute_in_process(instance=instance, raise_on_error=False)
    assert not run.success
    assert victim.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "storage", "victim.parquet"]

    # `forget` of such a key deletes only the registration, so the UI can get rid of it.
    from semdedup_assets.pipeline import forget_shard

    result = forget_shard(settings, instance, key, log=lambda m: None)
    assert result.removed == [] and key not in instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)
    assert victim.read_bytes() == before
