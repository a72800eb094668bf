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

from semdedup_assets_tests.fixtures import BASE_SENTENCES, write_embedding_shards, write_text_shards
from semdedup_assets_tests.raycluster import (
    STAGES,
    NetNamespace,
    RayCluster,
    assert_same_results,
    namespaces_available,
    run_local,
    run_semdedup,
    start_cluster,
)

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(namespaces_available() is not None, reason=namespaces_available() or ""),
]

COMMON = ["--clusters", "4", "--buckets", "2", "--eps", "0.001,0.01,0.1"]


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray head and a second node (its own raylet), one CPU each, on 127.0.0.1."""
    cluster = start_cluster([{"num_cpus": 1}, {"num_cpus": 1}])
    try:
        yield cluster
    finally:
        assert cluster.stop() == [], "processes left in the namespace"


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
    assert_stages_ran_on_the_cluster(tmp_path / "byo-ray", gpus=False)

    # Every socket of every process in the namespace (GCS, raylets, workers, driver's) is on the loopback.
    listening = two_nodes.ns.listening()
    assert any(addr.endswith(":6379") for addr, _ in listening), listening
    outside = [(a, p) for a, p in listening if a.rsplit(":", 1)[0] not in ("127.0.0.1", "[::ffff:127.0.0.1]")]
    assert not outside, f"Ray listens beyond 127.0.0.1: {outside}"


def node_and_pid(worker: object) -> tuple[str, int]:
    """(Ray node id, pid) of a `worker` metadata value ('127.0.0.1 node 1a2b... pid 42 ...')."""
    words = str(worker).split()
    return words[words.index("node") + 1], int(words[words.index("pid") + 1])


def assert_stages_ran_on_the_cluster(storage: Path, gpus: bool) -> None:
    """Where each stage ran, from its metadata: embedding actors on both nodes, k-means on a GPU worker (or, with no
    GPU in the cluster, in the driver), ingest, assignment, pairwise and keep-lists as Ray tasks (not in the
    driver)."""
    embed_nodes = {node_and_pid(r["worker"])[0] for r in per_shard_rows(storage, "embeddings")}
    (kmeans,) = per_shard_rows(storage, "centroids")
    kmeans_node, kmeans_pid = node_and_pid(kmeans["worker"])
    assert kmeans["ran_on"] == ("ray worker" if gpus else "driver"), kmeans
    assert kmeans["device"] == "cpu" and "CUDA not available here" in kmeans["device_note"], kmeans
    tasks = [
        node_and_pid(r["worker"])
        for asset in ("raw_shards", "cluster_assignments", "semantic_duplicates", "keep_lists")
        for r in per_shard_rows(storage, asset)
    ]
    assert {node_and_pid(r["worker"]) for r in per_shard_rows(storage, "raw_shards")}, "ingest ran as Ray tasks"
    (keep,) = per_shard_rows(storage, "keep_lists")
    assert keep["ran_on"] == "ray worker", keep
    assert tasks and {node for node, _ in tasks} <= embed_nodes | {kmeans_node}, (tasks, embed_nodes)
    # Each stage's metadata shows its largest Ray unit's peak RSS in its worker, and how many workers ran units
    # (the driver's own `resources/peak_rss_mib` does not see them); each bucket shows its own.
    for asset in ("raw_shards", "embeddings", "cluster_assignments", "semantic_duplicates", "keep_lists"):
        for r in per_shard_rows(storage, asset):
            assert r["resources/worker_peak_rss_mib"] > 10 and r["resources/workers"] >= 1, (asset, r)
            assert r["resources/worker_peak_rss_mib"] < 8192, (asset, r)  # a unit's peak, not a sum over workers
    assert all(r["worker_peak_rss_mib"] > 10 for r in per_shard_rows(storage, "semantic_duplicates"))
    assert ("resources/worker_peak_rss_mib" in kmeans) == gpus, kmeans  # k-means in the driver: its own figures
    if not gpus:  # the driver's pid: no assignment or bucket ran there
        assert len(embed_nodes) == 2 and kmeans_node in embed_nodes, (embed_nodes, kmeans)
        assert kmeans_pid not in {pid for _, pid in tasks}, (kmeans, tasks)
    else:
        assert "CUDA_VISIBLE_DEVICES=" in str(kmeans["worker"]), kmeans
        assert all("CUDA_VISIBLE_DEVICES=" in str(r["worker"]) for r in per_shard_rows(storage, "cluster_assignments"))


def per_shard_rows(storage: Path, asset: str) -> list[dict[str, object]]:
    """Each shard's own metadata on its latest materialization (from the run's Dagster instance)."""
    with dg.DagsterInstance.from_config(str(storage / "dagster_home")) as instance:
        records = instance.fetch_materializations(dg.AssetKey(asset), limit=100).records
        rows: dict[str, dict[str, object]] = {}
        for record in records:  # newest first
            meta = record.asset_materialization.metadata
            rows.setdefault(
                record.partition_key, {"shard": record.partition_key, **{k: v.value for k, v in meta.items()}}
            )
        return list(rows.values())


def big_text_shards(folder: Path, n_shards: int = 2, rows: int = 600) -> None:
    """Shards large enough that embedding one takes seconds on one CPU (time to kill its worker)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        texts = [f"{BASE_SENTENCES[i % len(BASE_SENTENCES)]} (note {s}-{i}, {i % 7} of {i % 11})" for i in range(rows)]
        pq.write_table(
            pa.table({"id": [f"big-{s}-{i:05d}" for i in range(rows)], "text": texts}), folder / f"big-{s}.parquet"
        )


EMBEDDING_ACTOR, ASSIGN_TASK = "ray::ShardEmbedder.embed", "ray::_assign_task"  # Ray's titles of busy workers


def busy_worker_pids(ns: NetNamespace, title: str) -> list[int]:
    """The namespace's Ray workers running a unit of `title` (e.g. ray::ShardEmbedder.embed)."""
    pids = []
    for pid in ns.members():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith(title):
            pids.append(pid)
    return pids


def kill_one_worker(
    ns: NetNamespace, run: subprocess.Popen, title: str = EMBEDDING_ACTOR, settle: float = 0.5, timeout: float = 240
) -> int:
    """SIGKILL the first worker seen running a unit of `title`, `settle` seconds into it; returns its pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.poll() is None:
        pids = busy_worker_pids(ns, title)
        if pids:
            time.sleep(settle)  # inside the unit
            os.kill(pids[0], signal.SIGKILL)
            return pids[0]
        time.sleep(0.01)
    raise AssertionError(f"no {title} worker seen (run exited: {run.poll()})")


def test_a_killed_worker_is_retried_and_a_shard_past_its_retries_fails_the_run_naming_it(two_nodes, tmp_path):
    big = tmp_path / "big"
    big_text_shards(big)
    args = ["run", "--input", str(big), "--engine", "ray", "--ray-address", two_nodes.address, *COMMON]

    # An embedding actor and an assignment task's worker killed in one run: both retried, the local bytes.
    run = two_nodes.popen_semdedup(*args, "--storage", str(tmp_path / "ray"))
    kill_one_worker(two_nodes.ns, run)
    killed = kill_one_worker(two_nodes.ns, run, ASSIGN_TASK, settle=0)
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out[-4000:]
    assert killed not in {node_and_pid(r["worker"])[1] for r in per_shard_rows(tmp_path / "ray", "cluster_assignments")}
    run_local(big, tmp_path / "local")
    assert_same_results(tmp_path / "local", tmp_path / "ray")  # also: no temporary file left behind

    run = two_nodes.popen_semdedup(*args, "--storage", str(tmp_path / "ray0"), "--ray-retries", "0")
    kill_one_worker(two_nodes.ns, run)
    out, _ = run.communicate(timeout=600)
    assert run.returncode != 0
    assert "its Ray worker died 1 time(s); the 0 retries are exhausted" in out, out[-4000:]
    assert "shard 'big-" in out
    leftovers = [p for p in (tmp_path / "ray0").rglob("*.tmp")]
    assert not leftovers

    # Again on the first storage (its embeddings cached): an assignment past its 0 retries fails naming the shard.
    run = two_nodes.popen_semdedup(*args, "--storage", str(tmp_path / "ray"), "--ray-retries", "0")
    kill_one_worker(two_nodes.ns, run, ASSIGN_TASK, settle=0)
    out, _ = run.communicate(timeout=600)
    assert run.returncode != 0
    assert "cluster_assignments: " in out and "its Ray worker died 1 time(s); the 0 retries are exhausted" in out, out[
        -4000:
    ]
    assert "shard 'big-" in out
    assert not [p for p in (tmp_path / "ray").rglob("*.tmp")]


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
    # k-means on a GPU worker (no real CUDA here: faiss' CPU math inside it, said so), assignments on GPU tasks.
    assert_stages_ran_on_the_cluster(tmp_path / "ray", gpus=True)
    run_local(text_in, tmp_path / "local")  # the CPU path ran the math: same bytes as in-process
    assert_same_results(tmp_path / "local", tmp_path / "ray")


def test_an_unreachable_ray_address_fails_at_once_naming_it_and_publishes_nothing(tmp_path):
    write_text_shards(tmp_path / "text", n_shards=2)
    ns = NetNamespace()
    try:
        start = time.monotonic()
        done = run_semdedup(
            ns,
            "run",
            "--input",
            str(tmp_path / "text"),
            "--storage",
            str(tmp_path / "s"),
            "--engine",
            "ray",
            "--ray-address",
            "127.0.0.1:6390",
        )
        seconds = time.monotonic() - start
    finally:
        assert ns.stop() == []
    assert done.returncode != 0
    assert "127.0.0.1:6390" in done.stderr, done.stderr
    assert seconds < 60, seconds  # ray.init alone would retry for minutes
    assert not [p for stage in STAGES for p in (tmp_path / "s" / stage).rglob("*")]
    assert not (tmp_path / "s" / "semdedup.json").exists()
