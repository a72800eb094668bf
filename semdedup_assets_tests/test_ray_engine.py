"""The Ray engine on real Ray clusters: a head plus a second node, and a head with two logical GPUs.

Every Ray process (heads, nodes, the `semdedup run` driver) runs inside a network
namespace that holds only `lo` (see raycluster.py), and each test stops every process
it started. The local engine's results, computed in this process, are the reference:
the Ray engine must give the same bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.catalog import query
from semdedup_assets.core.config import Settings
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import BASE_SENTENCES, write_embedding_shards, write_text_shards
from semdedup_assets_tests.raycluster import NetNamespace, RayCluster, namespaces_available, run_semdedup, start_cluster

pytestmark = [pytest.mark.timeout(900), pytest.mark.skipif(namespaces_available() is not None,
                                                          reason=namespaces_available() or "")]

STAGES = ("raw", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")
COMMON = ["--clusters", "4", "--buckets", "2", "--eps", "0.001,0.01,0.1"]


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray head and a second node (its own raylet), one CPU each, on 127.0.0.1."""
    cluster = start_cluster([{"num_cpus": 1}, {"num_cpus": 1}])
    try:
        yield cluster
    finally:
        assert cluster.stop() == [], "processes left in the namespace"


def stage_files(storage: Path) -> dict[str, bytes]:
    """Every Parquet file the stages wrote (relative path -> bytes); temporaries included, to catch leftovers."""
    return {str(p.relative_to(storage)): p.read_bytes()
            for stage in STAGES for p in sorted((storage / stage).rglob("*")) if p.is_file()}


def run_local(input_dir: Path, storage: Path, **settings) -> None:
    """The reference: the whole graph with the local engine, in this process."""
    cfg = Settings(storage=str(storage), input=str(input_dir), clusters=4, buckets=2, eps=(0.001, 0.01, 0.1),
                   **settings)
    with dg.instance_for_test() as instance:
        run_pipeline(cfg, instance, log=lambda m: None)


def assert_same_results(local: Path, ray: Path) -> None:
    a, b = stage_files(local), stage_files(ray)
    assert sorted(a) == sorted(b)
    assert not [p for p in a if p.endswith(".tmp")]
    different = [p for p in a if a[p] != b[p]]
    assert not different, f"files differ between the engines: {different}"
    items = "SELECT id, shard, cluster, sim_to_centroid, max_sim, duplicate_of FROM items ORDER BY id"
    assert query(Settings(storage=str(local)).storage_root(), items) == query(Settings(storage=str(ray)).storage_root(), items)


def semdedup_ok(cluster: RayCluster, *args: str) -> subprocess.CompletedProcess:
    done = cluster.semdedup("run", *args, "--engine", "ray", "--ray-address", cluster.address, *COMMON)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_two_nodes_give_the_local_engines_bytes_for_text_and_bring_your_own_embeddings(two_nodes, tmp_path):
    text_in, byo_in = tmp_path / "text", tmp_path / "byo"
    write_text_shards(text_in, n_shards=3)
    write_embedding_shards(byo_in, n_shards=3, per_shard=200)

    semdedup_ok(two_nodes, "--input", str(text_in), "--storage", str(tmp_path / "text-ray"))
    run_local(text_in, tmp_path / "text-local")
    assert_same_results(tmp_path / "text-local", tmp_path / "text-ray")

    semdedup_ok(two_nodes, "--input", str(byo_in), "--storage", str(tmp_path / "byo-ray"), "--modality", "embedding")
    run_local(byo_in, tmp_path / "byo-local", modality="embedding")
    assert_same_results(tmp_path / "byo-local", tmp_path / "byo-ray")

    # Both nodes did work: each embedding shard names the raylet's node and worker process it ran on.
    workers = {r["worker"] for r in per_shard_rows(tmp_path / "byo-ray", "embeddings")}
    assert len(workers) == 2, workers

    # Every socket of every process in the namespace (GCS, raylets, workers, driver's) is on the loopback.
    listening = two_nodes.ns.listening()
    assert any(addr.endswith(":6379") for addr, _ in listening), listening
    outside = [(a, p) for a, p in listening if not a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]")]
    assert not outside, f"Ray listens beyond 127.0.0.1: {outside}"


def per_shard_rows(storage: Path, asset: str) -> list[dict[str, object]]:
    """Each shard's own metadata on its latest materialization (from the run's Dagster instance)."""
    with dg.DagsterInstance.from_config(str(storage / "dagster_home")) as instance:
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
        rows: dict[str, dict[str, object]] = {}
        for record in records:  # newest first
            meta = record.asset_materialization.metadata
            rows.setdefault(record.partition_key, {"shard": record.partition_key,
                                                   **{k: v.value for k, v in meta.items()}})
        return list(rows.values())


def big_text_shards(folder: Path, n_shards: int = 2, rows: int = 600) -> None:
    """Shards large enough that embedding one takes seconds on one CPU (time to kill its worker)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        texts = [f"{BASE_SENTENCES[i % len(BASE_SENTENCES)]} (note {s}-{i}, {i % 7} of {i % 11})" for i in range(rows)]
        pq.write_table(pa.table({"id": [f"big-{s}-{i:05d}" for i in range(rows)], "text": texts}),
                       folder / f"big-{s}.parquet")


def embedding_worker_pids(ns: NetNamespace) -> list[int]:
    """The namespace's embedding actors that are running a shard (Ray titles them ray::ShardEmbedder.embed)."""
    pids = []
    for pid in ns.members():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::ShardEmbedder.embed"):
            pids.append(pid)
    return pids


def kill_one_embedding_worker(ns: NetNamespace, run: subprocess.Popen, timeout: float = 240) -> int:
    """SIGKILL the first embedding actor seen in the middle of a shard; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        pids = embedding_worker_pids(ns)
        if pids:
            time.sleep(0.5)  # well inside the shard
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.05)
    raise AssertionError(f"no embedding actor seen running a shard (run exited: {run.poll()})")


def test_a_killed_worker_is_retried_and_a_shard_past_its_retries_fails_the_run_naming_it(two_nodes, tmp_path):
    big = tmp_path / "big"
    big_text_shards(big)
    args = ["run", "--input", str(big), "--engine", "ray", "--ray-address", two_nodes.address, *COMMON]

    run = two_nodes.popen_semdedup(*args, "--storage", str(tmp_path / "ray"))
    kill_one_embedding_worker(two_nodes.ns, run)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-4000:]
    run_local(big, tmp_path / "local")
    assert_same_results(tmp_path / "local", tmp_path / "ray")  # also: no temporary file left behind

    run = two_nodes.popen_semdedup(*args, "--storage", str(tmp_path / "ray0"), "--ray-retries", "0")
    kill_one_embedding_worker(two_nodes.ns, run)
    out, _ = run.communicate(timeout=600)
    assert run.returncode != 0
    assert "its Ray worker died 1 time(s); the 0 retries are exhausted" in out, out[-4000:]
    assert "shard 'big-" in out
    leftovers = [p for p in (tmp_path / "ray0").rglob("*.tmp")]
    assert not leftovers


def test_two_logical_gpus_get_one_embedding_actor_each_and_both_embed(tmp_path):
    cluster = start_cluster([{"num_cpus": 1, "num_gpus": 2}])
    try:
        text_in = tmp_path / "text"
        write_text_shards(text_in, n_shards=4)
        semdedup_ok(cluster, "--input", str(text_in), "--storage", str(tmp_path / "ray"))
    finally:
        assert cluster.stop() == []
    rows = per_shard_rows(tmp_path / "ray", "embeddings")
    assert len(rows) == 4
    devices = [str(r["worker"]).split("CUDA_VISIBLE_DEVICES=")[-1] for r in rows]
    assert all("CUDA_VISIBLE_DEVICES=" in str(r["worker"]) for r in rows), rows
    assert set(devices) == {"0", "1"}, rows  # distinct devices, and both did work
    run_local(text_in, tmp_path / "local")  # the CPU path ran the math: same bytes as in-process
    assert_same_results(tmp_path / "local", tmp_path / "ray")


def test_an_unreachable_ray_address_fails_at_once_naming_it_and_publishes_nothing(tmp_path):
    write_text_shards(tmp_path / "text", n_shards=2)
    ns = NetNamespace()
    try:
        start = time.monotonic()
        done = run_semdedup(ns, "run", "--input", str(tmp_path / "text"), "--storage", str(tmp_path / "s"),
                                      "--engine", "ray", "--ray-address", "127.0.0.1:6390")
        seconds = time.monotonic() - start
    finally:
        assert ns.stop() == []
    assert done.returncode != 0
    assert "127.0.0.1:6390" in done.stderr, done.stderr
    assert seconds < 60, seconds  # ray.init alone would retry for minutes
    assert not [p for stage in STAGES for p in (tmp_path / "s" / stage).rglob("*")]
    assert not (tmp_path / "s" / "semdedup.json").exists()
