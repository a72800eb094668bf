"""Incremental dedup: a new shard re-runs only the buckets its clusters fall in."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from semdedup_assets.core.cluster.assign import touched_buckets
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.settings_store import save_settings
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards

K, BUCKETS = 12, 12


def _settings(tmp_path: Path, name: str) -> Settings:
    return Settings(
        storage=str(tmp_path / name),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=K,
        buckets=BUCKETS,
        eps=(0.001, 0.01, 0.1),
    )


def _tick(defs: dg.Definitions, name: str, instance: dg.DagsterInstance, cursor: str | None):
    ctx = dg.build_sensor_context(instance=instance, instance_ref=instance.get_ref(), definitions=defs, cursor=cursor)
    return defs.resolve_sensor_def(name).evaluate_tick(ctx)


def _run(defs: dg.Definitions, job: str, instance: dg.DagsterInstance, key: str | None = None) -> None:
    assert defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=key).success


def _bucket_materializations(instance: dg.DagsterInstance) -> dict[str, int]:
    records = instance.fetch_materializations(dg.AssetKey("semantic_duplicates"), limit=10_000).records
    counts: dict[str, int] = {}
    for r in records:
        counts[r.partition_key] = counts.get(r.partition_key, 0) + 1
    return counts


def test_new_shard_reruns_only_touched_buckets_and_equals_a_full_recompute(tmp_path: Path) -> None:
    x = write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=200, d=16, dup_every=10)
    settings = _settings(tmp_path, "incremental")
    defs = build_definitions(settings)
    with dg.instance_for_test() as inst:
        run_pipeline(settings, inst, log=lambda m: None)
        storage = settings.storage_root()
        assert _bucket_materializations(inst) == {
            b: 1 for b in defs.resolve_assets_def("semantic_duplicates").partitions_def.get_partition_keys()
        }
        shard_cursor = _tick(defs, "shard_sensor", inst, None).cursor
        bucket_tick = _tick(defs, "bucket_sensor", inst, None)
        assert not bucket_tick.run_requests  # every bucket is newer than the assignments
        auto = dg.evaluate_automation_conditions(defs=defs, instance=inst)

        # A new shard: near-copies of three existing items, so it touches few clusters.
        rng = np.random.default_rng(9)
        new = x[[5, 250, 480]] + 0.001 * rng.normal(size=(3, 16)).astype(np.float32)
        pq.write_table(
            pa.table({"id": ["new-0", "new-1", "new-2"], "embedding": pa.array(list(new), pa.list_(pa.float32()))}),
            tmp_path / "input" / "part-03.parquet",
        )
        tick = _tick(defs, "shard_sensor", inst, shard_cursor)
        assert [r.partition_key for r in tick.run_requests] == ["part-03"]
        inst.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["part-03"])
        _run(defs, "ingest_job", inst, "part-03")

        # Declarative automation assigns the new shard (and only it) to the existing centroids.
        auto = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=auto.cursor)
        requested = {
            (r.key.to_user_string(), tuple(sorted(r.true_subset.expensively_compute_partition_keys())))
            for r in auto.results
            if r.true_subset.size
        }
        assert requested == {("cluster_assignments", ("part-03",))}
        centroid_bytes = storage.centroids_file.read_bytes()
        _run(defs, "assign_job", inst, "part-03")
        assert storage.centroids_file.read_bytes() == centroid_bytes  # not re-trained

        clusters = (
            pq.read_table(str(storage.shard_file(st.CLUSTER_ASSIGNMENTS, "part-03"))).column("cluster").to_numpy()
        )
        expected = touched_buckets(clusters, K, BUCKETS)
        tick = _tick(defs, "bucket_sensor", inst, bucket_tick.cursor)
        assert sorted(r.partition_key for r in tick.run_requests) == sorted(expected)
        assert 0 < len(expected) <= 3
        for r in tick.run_requests:
            _run(defs, "dedup_job", inst, r.partition_key)
        assert not _tick(defs, "bucket_sensor", inst, tick.cursor).run_requests
        counts = _bucket_materializations(inst)
        assert {b for b, n in counts.items() if n == 2} == expected  # touched ran again
        assert all(n == 1 for b, n in counts.items() if b not in expected)  # untouched did not run

        auto = dg.evaluate_automation_conditions(defs=defs, instance=inst, cursor=auto.cursor)
        requested = {r.key.to_user_string() for r in auto.results if r.true_subset.size}
        assert requested == {"keep_lists"}
        _run(defs, "keep_lists_job", inst)

    # From scratch on all four shards with the same centroids.
    scratch = _settings(tmp_path, "scratch")
    save_settings(scratch)
    sdefs = build_definitions(scratch)
    shutil.copytree(str(storage.stage_dir(st.CENTROIDS)), str(scratch.storage_root().stage_dir(st.CENTROIDS)))
    with dg.instance_for_test() as inst:
        keys = ["part-00", "part-01", "part-02", "part-03"]
        inst.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, keys)
        for k in keys:
            _run(sdefs, "ingest_job", inst, k)
            _run(sdefs, "assign_job", inst, k)
        for b in sdefs.resolve_assets_def("semantic_duplicates").partitions_def.get_partition_keys():
            _run(sdefs, "dedup_job", inst, b)
        _run(sdefs, "keep_lists_job", inst)
    a, b = storage, scratch.storage_root()
    for stage in (st.SEMANTIC_DUPLICATES, st.KEEP_LISTS):
        files_a = {p.name: p.read_bytes() for p in a.stage_files(stage)}
        files_b = {p.name: p.read_bytes() for p in b.stage_files(stage)}
        assert files_a.keys() == files_b.keys()
        assert all(files_a[n] == files_b[n] for n in files_a), stage
