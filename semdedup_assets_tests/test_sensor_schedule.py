"""The shard sensor (through the daemon's code path) and the re-training schedule."""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg

from semdedup_assets.core.config import Settings
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None) -> dg.SensorResult:
    sensor = defs.resolve_sensor_def("shard_sensor")
    # instance_ref as the daemon passes it: run requests for partitions added in the same tick resolve.
    ctx = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs, cursor=cursor)
    return sensor.evaluate_tick(ctx)


def test_sensor_registers_new_files_and_requests_runs(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=20, d=8)
    settings = Settings(storage=str(tmp_path / "storage"), input=str(tmp_path / "input"), modality="embedding")
    defs = build_definitions(settings)

    first = _tick(defs, instance, None)
    assert sorted(r.partition_key for r in first.run_requests) == ["part-00", "part-01"]
    assert all(r.job_name in (None, "ingest_job") for r in first.run_requests)
    assert [req.partition_keys for req in first.dynamic_partitions_requests] == [["part-00", "part-01"]]
    # The daemon applies the add request; emulate that, then tick again: nothing to do.
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["part-00", "part-01"])
    second = _tick(defs, instance, first.cursor)
    assert not second.run_requests and second.skip_message

    # A new file in a sub-folder: one partition with a nested key, one run.
    sub = tmp_path / "input" / "2024"
    write_embedding_shards(sub, n_shards=1, per_shard=20, d=8, seed=3)
    third = _tick(defs, instance, second.cursor or first.cursor)
    assert [r.partition_key for r in third.run_requests] == ["2024/part-00"]
    assert third.dynamic_partitions_requests[0].partition_keys == ["2024/part-00"]
    assert set(json.loads(third.cursor)) == {"part-00", "part-01", "2024/part-00"}


def test_sensor_run_request_executes(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=1, per_shard=30, d=8)
    settings = Settings(storage=str(tmp_path / "storage"), input=str(tmp_path / "input"), modality="embedding")
    defs = build_definitions(settings)
    tick = _tick(defs, instance, None)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, tick.dynamic_partitions_requests[0].partition_keys)
    req = tick.run_requests[0]
    result = defs.resolve_job_def("ingest_job").execute_in_process(instance=instance, partition_key=req.partition_key)
    assert result.success
    assert settings.storage_root().shard_file("embeddings", "part-00").exists()


def test_schedule_requests_a_retrain_run_that_succeeds(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    settings = Settings(
        storage=str(tmp_path / "storage"), input=str(tmp_path / "input"), modality="embedding", clusters=4, buckets=2
    )
    run_pipeline(settings, instance, log=lambda m: None)
    defs = build_definitions(settings)
    schedule = defs.resolve_schedule_def("retrain_centroids_schedule")
    before = settings.storage_root().centroids_file.stat().st_mtime_ns
    ctx = dg.build_schedule_context(instance=instance)
    requests = list(schedule.evaluate_tick(ctx).run_requests or [])
    assert len(requests) == 1
    time.sleep(0.01)
    job = defs.resolve_job_def(schedule.job_name)
    assert job.name == "centroids_job"
    result = job.execute_in_process(instance=instance, tags=requests[0].tags)
    assert result.success
    assert settings.storage_root().centroids_file.stat().st_mtime_ns > before
