"""Operating the platform: changed and vanished files, forgetting a shard, re-training, blocking checks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import forget_shard, run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=6,
        buckets=6,
        eps=(0.001, 0.01, 0.1),
    )


def _tick(defs: dg.Definitions, instance: dg.DagsterInstance, cursor: str | None, name: str = "shard_sensor"):
    ctx = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs, cursor=cursor)
    return defs.resolve_sensor_def(name).evaluate_tick(ctx)


def test_changed_file_requests_exactly_one_rerun(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=30, d=8)
    defs = build_definitions(_settings(tmp_path))
    first = _tick(defs, instance, None)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["part-00", "part-01"])
    assert not _tick(defs, instance, first.cursor).run_requests
    write_embedding_shards(tmp_path / "changed", n_shards=2, per_shard=31, d=8, seed=4)
    os.replace(tmp_path / "changed" / "part-01.parquet", tmp_path / "input" / "part-01.parquet")
    changed = _tick(defs, instance, first.cursor)
    assert [r.partition_key for r in changed.run_requests] == ["part-01"]
    assert not changed.dynamic_partitions_requests  # already registered
    assert not _tick(defs, instance, changed.cursor).run_requests  # exactly one


def test_vanished_file_is_reported_and_kept_until_forget(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    x = write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8, dup_every=4)
    # A small third shard (near-copies of two items) that lives in few clusters.
    pq.write_table(
        pa.table({"id": ["c-0", "c-1"], "embedding": pa.array(list(x[[3, 70]] + 1e-3), pa.list_(pa.float32()))}),
        tmp_path / "input" / "part-02.parquet",
    )
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    defs = build_definitions(settings)
    cursor = _tick(defs, instance, None).cursor
    (tmp_path / "input" / "part-02.parquet").unlink()
    tick = _tick(defs, instance, cursor)
    assert not tick.run_requests
    [event] = tick.asset_events
    assert event.partition == "part-02" and event.metadata["vanished"].value is True
    assert set(json.loads(tick.cursor)) == {"part-00", "part-01"}
    # Results stay: the catalog still has the shard.
    _, [(n,)] = query(storage, "SELECT count(*) FROM items WHERE shard = 'part-02'")
    assert n == 2

    before = {
        r.partition_key: r.storage_id
        for r in instance.fetch_materializations(dg.AssetKey("semantic_duplicates"), limit=100, ascending=True).records
    }
    result = forget_shard(settings, instance, "part-02", log=lambda m: None)
    assert "part-02" not in instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME)
    assert not storage.shard_file(st.EMBEDDINGS, "part-02").exists()
    assert 0 < len(result.buckets) <= 2
    _, [(n, total)] = query(storage, "SELECT count(*) FILTER (shard = 'part-02'), count(*) FROM items")
    assert n == 0 and total == 120
    _, [(kept,)] = query(storage, "SELECT kept + removed FROM eps_curve WHERE eps = 0.01")
    assert kept == 120
    after = {
        r.partition_key: r.storage_id
        for r in instance.fetch_materializations(dg.AssetKey("semantic_duplicates"), limit=100, ascending=True).records
    }
    rerun = sorted(b for b in after if after[b] != before[b])
    assert rerun == result.buckets  # only the buckets that held its items


def test_retrained_centroids_make_every_assignment_stale(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    defs = build_definitions(settings)
    auto = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert defs.resolve_job_def("centroids_job").execute_in_process(instance=instance).success
    auto = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=auto.cursor)
    requested = {
        (r.key.to_user_string(), tuple(sorted(r.true_subset.expensively_compute_partition_keys())))
        for r in auto.results
        if r.true_subset.size
    }
    assert requested == {("cluster_assignments", ("part-00", "part-01"))}


def test_failed_blocking_check_stops_automation(
    tmp_path: Path, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=60, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    defs = build_definitions(settings)
    auto = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    # Bad data: embeddings that are not unit norm (as a broken encoder would produce).
    from semdedup_assets.core.embed import shard as embed

    monkeypatch.setattr(embed, "renormalise", lambda chunk: (np.asarray(chunk, np.float32) * 2.0, 0))
    os.utime(tmp_path / "input" / "part-01.parquet", (time.time() + 5, time.time() + 5))  # invalidate the cache
    run = defs.resolve_job_def("ingest_job").execute_in_process(
        instance=instance, partition_key="part-01", raise_on_error=False
    )
    assert not run.success
    [check] = [e for e in run.get_asset_check_evaluations() if e.check_name == "embeddings_finite_unit_norm"]
    assert not check.passed and "norms deviate" in check.description
    auto = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=auto.cursor)
    assert not [r for r in auto.results if r.true_subset.size]  # nothing downstream is requested


def test_cli_forget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from semdedup_assets.cli import main

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=40, d=8)
    storage = str(tmp_path / "storage")
    assert (
        main(
            [
                "run",
                "--input",
                str(tmp_path / "input"),
                "--storage",
                storage,
                "--modality",
                "embedding",
                "--clusters",
                "3",
                "--buckets",
                "3",
            ]
        )
        == 0
    )
    assert main(["forget", "part-00", "--storage", storage]) == 0
    assert "forgot shard 'part-00'" in capsys.readouterr().out
    assert main(["sql", "SELECT count(*) AS n, count(DISTINCT shard) AS shards FROM items", "--storage", storage]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split() == ["40", "|", "1"]
    assert main(["forget", "part-00", "--storage", storage]) == 1
    assert "no shard 'part-00'" in capsys.readouterr().err


def test_first_tick_after_semdedup_run_requests_nothing(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=30, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    tick = _tick(build_definitions(settings), instance, None)
    assert not tick.run_requests and set(json.loads(tick.cursor)) == {"part-00", "part-01"}
