"""The memory budget (issue 19): bounded stages give the same bytes, and a stage's peak stays bounded as N grows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core import storage as st
from semdedup_assets.core.config import Settings, parse_size
from semdedup_assets.core.dedup import cluster_groups
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards


def _settings(tmp_path: Path, name: str, **kw) -> Settings:
    base = dict(storage=str(tmp_path / name), input=str(tmp_path / "input"), modality="embedding",
                clusters=6, eps=(0.001, 0.01, 0.1), block_size=64, max_points_per_centroid=16)
    base.update(kw)
    return Settings(**base)


def test_parse_size_and_the_default_budget() -> None:
    assert parse_size("4GB") == 4 * 2**30 and parse_size("512mb") == 512 * 2**20 and parse_size("1.5G") == 3 * 2**29
    assert parse_size(2**20) == 2**20
    for bad in ("lots", "4XB", "10KB"):
        with pytest.raises(ValueError, match="memory_budget"):
            parse_size(bad)
    with pytest.raises(ValueError, match="memory_budget"):
        Settings(memory_budget="big")
    assert Settings().memory_budget_bytes > 2**28  # half the machine's memory
    assert Settings(memory_budget="1GB").memory_budget_bytes == 2**30


def test_cluster_groups_fit_the_budget() -> None:
    sizes = np.array([3, 0, 4, 10, 1, 1, 2])
    groups = list(cluster_groups(sizes, 5, per_row=10, budget=50))
    assert groups == [(5, 7), (7, 8), (8, 9), (9, 12)]  # [3, 0] | [4] | [10] alone, beyond the budget | [1, 1, 2]
    assert [g for g in cluster_groups(np.zeros(0, dtype=np.int64), 0, 1, 1)] == []


@pytest.fixture(scope="module")
def budget_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Settings, dg.DagsterInstance]]:
    """One input, run unconstrained and under a budget small enough to split buckets and stream clusters."""
    tmp_path = tmp_path_factory.mktemp("budget")
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=300, d=32, dup_every=7)
    variants = {"unconstrained": dict(buckets=2), "small": dict(buckets=2, memory_budget="160KB"),
                "small-one-bucket-float16": dict(buckets=1, memory_budget="100KB", embedding_dtype="float16"),
                "float16": dict(buckets=3, embedding_dtype="float16")}
    runs = {}
    for name, kw in variants.items():
        settings = _settings(tmp_path, name, **kw)
        instance = dg.DagsterInstance.ephemeral()
        run_pipeline(settings, instance, log=lambda m: None)
        runs[name] = (settings, instance)
    return runs


def _bytes(settings: Settings, stage: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in settings.storage_root().stage_files(stage)}


def test_a_small_budget_splits_buckets_and_tiles_clusters_from_disk_with_the_same_bytes(budget_runs) -> None:
    """Splitting a bucket into cluster groups and tiling a cluster from disk change no byte of the results."""
    small, instance = budget_runs["small"]
    records = instance.fetch_materializations(dg.AssetKey("semantic_duplicates"), limit=10).records
    meta = [r.asset_materialization.metadata for r in records]
    assert max(m["reads"].value for m in meta) > 1, "the budget should have split a bucket"
    assert any(m["clusters_from_disk"].value != "none" for m in meta), "a cluster should have been tiled from disk"
    reference = budget_runs["unconstrained"][0]
    assert _bytes(small, st.KEEP_LISTS) == _bytes(reference, st.KEEP_LISTS)
    assert _bytes(small, st.SEMANTIC_DUPLICATES) == _bytes(reference, st.SEMANTIC_DUPLICATES)
    # float16 storage, whatever the bucket count and budget: the same keep-lists
    tight, tight_instance = budget_runs["small-one-bucket-float16"]
    [record] = tight_instance.fetch_materializations(dg.AssetKey("semantic_duplicates"), limit=10).records
    assert record.asset_materialization.metadata["clusters_from_disk"].value != "none"
    assert _bytes(tight, st.KEEP_LISTS) == _bytes(budget_runs["float16"][0], st.KEEP_LISTS)


def test_every_stage_reports_its_resources(budget_runs) -> None:
    _, instance = budget_runs["small"]
    for key in ("raw_shards", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists"):
        event = instance.get_latest_materialization_event(dg.AssetKey(key))
        meta = event.asset_materialization.metadata
        assert meta["resources/peak_rss_mib"].value > 10, key
        assert meta["resources/seconds"].value >= 0 and meta["resources/rows"].value > 0, key
    assert instance.get_latest_materialization_event(dg.AssetKey("semantic_duplicates")).asset_materialization \
        .metadata["memory_budget_mib"].value == round(160 / 1024, 1)


def test_the_kmeans_sample_is_capped_by_the_budget_with_a_warning(budget_runs) -> None:
    from semdedup_assets.core.centroids import train_centroids

    settings, instance = budget_runs["unconstrained"]
    files = {settings.storage_root().shard_of(st.EMBEDDINGS, p): p
             for p in settings.storage_root().stage_files(st.EMBEDDINGS)}
    full = train_centroids(settings.replace(storage=settings.storage + "-centroids", max_points_per_centroid=512), files)
    with pytest.warns(UserWarning, match=r"training on a sample of 128 rows"):
        capped = train_centroids(settings.replace(storage=settings.storage + "-capped", memory_budget="64KB",
                                                  max_points_per_centroid=512), files)
    assert full.sample_rows > capped.sample_rows and capped.clusters == 6


def test_a_too_large_cluster_at_low_precision_is_refused_naming_it(tmp_path: Path) -> None:
    from semdedup_assets.core.dedup import dedup_bucket

    write_embedding_shards(tmp_path / "input", n_shards=1, per_shard=300, d=32)
    settings = _settings(tmp_path, "storage", clusters=1, buckets=1)
    run_pipeline(settings, dg.DagsterInstance.ephemeral(), log=lambda m: None)
    files = settings.storage_root().stage_files(st.CLUSTER_ASSIGNMENTS)
    with pytest.raises(ValueError, match=r"cluster 0 has 300 members .* k of at least \d+"):
        dedup_bucket(settings.replace(memory_budget="64KB", precision="fp16"), "000", 1, files)


# ---- the memory probe: a stage in a subprocess, its peak RSS over the baseline ---------------------------------

PROBE = r"""
import json, sys
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup import dedup_bucket, read_bucket_rows
from semdedup_assets.core.meter import stage_meter
import semdedup_assets.core.pairwise, torch  # imports and thread pools before the baseline
torch.ones(8, 8) @ torch.ones(8, 8)
for job in json.loads(sys.argv[1]):  # the bounded runs first: memory an earlier run left can only hide growth
    settings = Settings(storage=job["root"], buckets=1, block_size=256, memory_budget=job["budget"])
    files = settings.storage_root().stage_files("cluster_assignments")
    read_bucket_rows(files, 0, 1)  # Arrow's thread pools and their heaps start here: a fixed cost, not the stage's
    with stage_meter() as m:
        r = dedup_bucket(settings, "000", job["k"], files)
    print(json.dumps({"extra_mib": m["peak_rss_mib"] - m["start_rss_mib"], "scope": m["peak_rss_scope"],
                      "rows": r.rows, "reads": r.groups}))
"""


def _write_assignments(root: Path, n: int, k: int, d: int = 384, shard_rows: int = 1250) -> None:
    """Assignment files as the assign stage writes them: shards of `shard_rows`, k clusters, unit vectors."""
    from semdedup_assets.core.schemas import assignments_schema
    from semdedup_assets.core.tables import embedding_array

    folder = root / st.CLUSTER_ASSIGNMENTS
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(n // shard_rows):
        x = rng.standard_normal((shard_rows, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        clusters = rng.integers(0, k, shard_rows).astype(np.int32)
        table = pa.table({"id": [f"s{s}-{i}" for i in range(shard_rows)], "shard": [f"s{s}"] * shard_rows,
                          "cluster": clusters, "sim_to_centroid": rng.random(shard_rows, dtype=np.float32),
                          "embedding": embedding_array(x)}, schema=assignments_schema(d))
        pq.write_table(table.sort_by([("cluster", "ascending"), ("id", "ascending")]), folder / f"s{s}.parquet")


def _probe(tmp_path: Path, jobs: list[tuple[int, int, str]]) -> list[dict]:
    """Run dedup_bucket on (N, k, budget) buckets one after the other in one fresh process; each one's figures."""
    spec = []
    for n, k, budget in jobs:
        root = tmp_path / f"n{n}-k{k}"
        if not root.exists():
            _write_assignments(root, n, k)
        spec.append({"root": str(root), "k": k, "budget": budget})
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(spec)], capture_output=True, text=True, check=True)
    return [json.loads(line) for line in out.stdout.strip().splitlines()[-len(jobs):]]


def test_the_pairwise_stage_peak_stays_under_the_budget_as_n_grows_4x(tmp_path: Path) -> None:
    """One bucket of N = 5,000 and of 20,000 items (384-d, k = N/100, shards of 1,250): under an 8 MB budget
    the stage's extra peak RSS stays below the budget plus a fixed allowance and does not grow with N;
    unbounded, the same bucket (read whole) needs several times more."""
    small, large, unbounded = _probe(tmp_path, [(5_000, 50, "8MB"), (20_000, 200, "8MB"), (20_000, 200, "1GB")])
    assert large["rows"] == 20_000 and large["reads"] > 1
    if small["scope"] != "stage":
        pytest.skip("this kernel does not let a process reset its peak RSS")
    allowance = 32  # MiB, whatever N: the shard files' row groups in flight, torch's first tiles, allocator heaps
    assert large["extra_mib"] < 8 + allowance, large
    assert large["extra_mib"] < small["extra_mib"] * 1.5 + 8, (small, large)
    assert unbounded["reads"] == 1 and unbounded["extra_mib"] > large["extra_mib"] * 1.5, (large, unbounded)
