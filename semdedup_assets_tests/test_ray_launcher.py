"""Runs launched from the UI execute on the Ray cluster: dagster-ray's `RayRunLauncher`, for real.

One loopback-only network namespace (raycluster.py) holds a Ray head with its dashboard (the
Ray Jobs API the launcher submits to) and `dg dev` (webserver, daemon, code server) on an
instance whose dagster.yaml names `RayRunLauncher`. The test acts as a UI user over GraphQL:
it adds the shard partition, then launches the graph's jobs one after another, the partitioned
ones for that one partition (`dagster/partition` tag, as the launchpad sends it), with
`engine: ray`. While the runs go on, a sampler records every process of the namespace with its
parent, so the test can show where each run's process and each step's process lived: under
the Ray node's raylet (through Ray's job supervisor), never under `dg dev`. Ray's own job list
names each run's job and each step's driver process. The keep-lists must equal, byte for byte,
those of a local `semdedup run` on the same input.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import requests

from semdedup_assets.instance import instance_yaml
from semdedup_assets_tests.fixtures import write_embedding_shards
from semdedup_assets_tests.raycluster import (
    DASHBOARD_PORT,
    NetNamespace,
    RayCluster,
    assert_same_results,
    namespaces_available,
    ray_env,
    semdedup_command,
)
from semdedup_assets_tests.webserver import FAILED, REPO, DagsterDev, dagster_dev, describe_runs, platform_env, runs

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(namespaces_available() is not None, reason=namespaces_available() or ""),
]

SHARD = "part-00"
# What the user launches: one shard partition of the ingest job (validate + embed), then the
# job that materializes every stage (one run per stage, inside that run's process).
LAUNCHES = (("ingest_job", SHARD), ("pipeline_job", None))
# What the code location's environment sets; RayRunLauncher copies these into each run's Ray job.
FORWARDED = (
    "SEMDEDUP_STORAGE",
    "SEMDEDUP_INPUT",
    "SEMDEDUP_MODALITY",
    "SEMDEDUP_CLUSTERS",
    "SEMDEDUP_BUCKETS",
    "SEMDEDUP_EPS",
    "SEMDEDUP_SENSORS",
    "SEMDEDUP_ENGINE",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
)


def launcher_yaml(dashboard_url: str) -> str:
    """The run launcher part of dagster.yaml (what docs/scale-out.md shows), on top of what semdedup writes."""
    env_vars = "".join(f"\n        - {name}" for name in FORWARDED)
    return (
        f"run_launcher:\n  module: dagster_ray\n  class: RayRunLauncher\n  config:\n    ray:\n"
        f"      address: {dashboard_url}\n      env_vars:{env_vars}\n"
        # The daemon's queue: a run starts within a second of its launch (default: 5 s), for the test's time.
        "run_coordinator:\n  module: dagster.core.run_coordinator\n  class: QueuedRunCoordinator\n"
        "  config:\n    dequeue_interval_seconds: 1\n"
    )


class ProcessLog:
    """Every process seen inside a namespace, sampled every 0.2 s by a thread.

    `parent[pid]` is the parent seen first (a process whose parent exits is re-parented, so the
    first sighting is the one that tells who started it); `titles[pid]` every command line it
    showed (a Ray worker retitles itself `ray::ShardEmbedder...` once its actor is placed).
    """

    def __init__(self, ns: NetNamespace) -> None:
        self.ns = ns
        self.parent: dict[int, int] = {}
        self.titles: dict[int, list[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="process-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(0.2)

    def sample(self) -> None:
        for pid in [self.ns.pid, *self.ns.members()]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if pid not in self.parent:
                    stat = Path(f"/proc/{pid}/stat").read_text()
                    self.parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid
            except OSError:
                continue  # gone already
            titles = self.titles.setdefault(pid, [])
            if cmdline.strip() and cmdline.strip() not in titles:
                titles.append(cmdline.strip())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()

    def chain(self, pid: int) -> list[int]:
        """`pid` and its ancestors inside the namespace, nearest first (up to the holder process)."""
        out = [pid]
        while out[-1] in self.parent and out[-1] != self.ns.pid and len(out) < 64:
            out.append(self.parent[out[-1]])
        return out

    def find(self, pattern: str) -> set[int]:
        """Processes that showed a command line matching `pattern` (at its start)."""
        return {pid for pid, titles in self.titles.items() if any(re.match(pattern, t) for t in titles)}

    def describe(self, pids: list[int]) -> str:
        return " <- ".join(f"{p} {(self.titles.get(p) or ['?'])[-1][:60]!r}" for p in pids)


LAUNCH_RUN = """
mutation LaunchRun($executionParams: ExecutionParams!) { launchRun(executionParams: $executionParams) {
  __typename
  ... on LaunchRunSuccess { run { runId } }
  ... on PythonError { message stack }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on InvalidSubsetError { message }
  ... on PipelineNotFoundError { message }
  ... on RunConflict { message }
  ... on UnauthorizedError { message }
} }
"""

ADD_PARTITION = """
mutation AddPartition($partitionsDefName: String!, $partitionKey: String!, $repositorySelector: RepositorySelector!) {
  addDynamicPartition(partitionsDefName: $partitionsDefName, partitionKey: $partitionKey,
                      repositorySelector: $repositorySelector) {
    __typename
    ... on AddDynamicPartitionSuccess { partitionKey }
    ... on PythonError { message }
    ... on UnauthorizedError { message }
    ... on DuplicateDynamicPartitionError { partitionName }
  }
}
"""

REPOSITORY = {"repositoryLocationName": "semdedup", "repositoryName": "__repository__"}


# The launchpad's executor choice: steps in the run's own process. Each step of the default
# (multiprocess) executor is a fresh Python process loading the code location, seconds apiece;
# with engine: ray a step is only the driver of the actors and tasks.
IN_PROCESS = {"execution": {"config": {"in_process": {}}}}


def launch(dev: DagsterDev, job: str, partition: str | None) -> str:
    """Launch `job` (for `partition`) as the launchpad does; returns the run id."""
    tags = [{"key": "dagster/partition", "value": partition}] if partition else []
    result = dev.graphql(
        LAUNCH_RUN,
        {
            "executionParams": {
                "selector": {**REPOSITORY, "jobName": job},
                "runConfigData": IN_PROCESS,
                "executionMetadata": {"tags": tags},
            }
        },
    )["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def wait_for_run(dev: DagsterDev, run_id: str, timeout: float = 240) -> None:
    def done() -> bool:
        [run] = runs(dev, runIds=[run_id])
        assert run["status"] not in FAILED, f"run {run_id} of {run['jobName']}: {run['status']}"
        return run["status"] == "SUCCESS"

    dev.wait_for(f"run {run_id} to succeed", done, timeout=timeout, interval=0.5, describe=lambda: describe_runs(dev))


PID_MESSAGES = re.compile(
    r"Started process for run \(pid: (\d+)\)|Executing steps in process \(pid: (\d+)\)"
    r"|multiprocess executor: parent process \(pid: (\d+)\)"
)


def run_processes(instance: dg.DagsterInstance, run_id: str) -> dict[str, int]:
    """Where a run ran, from its own events: its process, its executor's, and each step's (STEP_WORKER_STARTED)."""
    where: dict[str, int] = {}
    for record in instance.all_logs(run_id):
        if m := PID_MESSAGES.search(record.user_message or ""):
            where.setdefault("run", int(next(g for g in m.groups() if g)))
        event = record.dagster_event
        if event is not None and event.event_type_value == "STEP_WORKER_STARTED":
            where[f"step {event.step_key}"] = int(event.event_specific_data.metadata["pid"].value)
    return where


def ray_jobs(url: str) -> list[dict[str, Any]]:
    """Ray's job list (what `ray job list` shows): the submitted jobs, with the driver of each."""
    resp = requests.get(f"{url}/api/jobs/", timeout=30)
    resp.raise_for_status()
    return resp.json()


def wait_for_ray_job(dev: DagsterDev, url: str, run_id: str) -> None:
    """The run's Ray job ends too (its process exits a moment after Dagster records the run's success)."""

    def ended() -> bool:
        resp = requests.get(f"{url}/api/jobs/dagster-run-{run_id}", timeout=30)
        assert resp.status_code != 404, f"Ray has no job dagster-run-{run_id}"
        status = resp.json()["status"]
        assert status in ("PENDING", "RUNNING", "SUCCEEDED"), f"Ray job dagster-run-{run_id}: {resp.json()}"
        return status == "SUCCEEDED"

    dev.wait_for(f"Ray job dagster-run-{run_id} to succeed", ended, timeout=60, interval=0.5)


def test_runs_launched_from_the_ui_run_on_the_ray_cluster_and_give_the_local_bytes(tmp_path: Path) -> None:
    start = time.monotonic()
    write_embedding_shards(tmp_path / "landing", n_shards=1, per_shard=200, d=16)
    env = platform_env(tmp_path, sensors=False, buckets=1, SEMDEDUP_ENGINE="ray", SEMDEDUP_EPS="0.001,0.01,0.1")
    home = Path(env["DAGSTER_HOME"])
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(instance_yaml(1) + launcher_yaml(f"http://127.0.0.1:{DASHBOARD_PORT}"))

    # The reference: a local `semdedup run` (engine local) on the same input, outside the namespace,
    # running while the Ray head starts and dg dev loads the code location.
    reference_env = {k: v for k, v in ray_env().items() if not k.startswith("SEMDEDUP_") and k != "DAGSTER_HOME"}
    reference = subprocess.Popen(
        semdedup_command(
            "run",
            "--input",
            str(tmp_path / "landing"),
            "--storage",
            str(tmp_path / "local"),
            "--modality",
            "embedding",
            "--clusters",
            "4",
            "--buckets",
            "1",
            "--eps",
            "0.001,0.01,0.1",
        ),
        cwd=REPO,
        env=reference_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ns = NetNamespace()
    log = ProcessLog(ns)
    cluster: RayCluster | None = None
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(RayCluster, ns, [{"num_cpus": 2}], dashboard=True)
        try:
            with (
                ns.joined(),
                dagster_dev(env, REPO / "test-artifacts" / "ray-launcher-dg-dev.log", stop_grace=3) as dev,
            ):
                cluster = starting.result(timeout=240)
                log.sample()
                raylets = log.find(r"\S*/raylet ")
                assert raylets, "no raylet in the namespace"
                setup = time.monotonic() - start
                added = dev.graphql(
                    ADD_PARTITION,
                    {"partitionsDefName": "shards", "partitionKey": SHARD, "repositorySelector": REPOSITORY},
                )["addDynamicPartition"]
                assert added["__typename"] == "AddDynamicPartitionSuccess", added
                run_ids = []
                for job, partition in LAUNCHES:
                    run_ids.append(launch(dev, job, partition))
                    wait_for_run(dev, run_ids[-1])
                    wait_for_ray_job(dev, cluster.dashboard_url, run_ids[-1])
                jobs = ray_jobs(cluster.dashboard_url)
                dev_pid = dev.process.pid
                assert "SupersessionWarning" not in dev.log_tail(100000)  # dg dev is the current command
            launched = time.monotonic() - start - setup
        finally:
            log.stop()
            try:  # a head still starting would go on spawning processes after the stop
                cluster = cluster or starting.result(timeout=240)
            except Exception:
                pass  # the body raised it already, or failed before it asked
            survivors = ns.stop(grace=3)
            if cluster is not None:
                shutil.rmtree(cluster.temp_dir, ignore_errors=True)
            try:
                reference_out, _ = reference.communicate(timeout=300)
            finally:
                if reference.poll() is None:
                    reference.kill()
                    reference.wait()
    assert survivors == [], f"processes left in the namespace: {survivors}"
    assert reference.returncode == 0, f"the reference semdedup run failed:\n{reference_out[-3000:]}"

    # (1) Each launched run is a Ray job (the launcher's submission id, succeeded). Every run (the two
    # launched and the per-stage runs of pipeline_job), its process and every step's process descend
    # from the Ray node's raylet, never from dg dev (its webserver, daemon and code server).
    ui_side = {pid for pid in log.parent if dev_pid in log.chain(pid)}
    for name in (r"\S+ -m dagster_webserver ", r"\S+ -m dagster._daemon run "):
        assert log.find(name) & ui_side, f"no {name!r} under dg dev: {log.describe(sorted(ui_side))}"
    by_submission = {j.get("submission_id"): j for j in jobs}
    with dg.DagsterInstance.from_config(str(home)) as instance:
        all_runs = instance.get_runs()
        assert len(all_runs) >= len(LAUNCHES) + 5, [r.job_name for r in all_runs]  # pipeline_job ran every stage
        for run in all_runs:
            where = run_processes(instance, run.run_id)
            assert "run" in where, f"{run.job_name}: no event names its process"
            for who, pid in where.items():
                chain = log.chain(pid)
                assert pid in log.parent, f"{run.job_name} {who}: pid {pid} was never seen in the namespace"
                assert raylets & set(chain), f"{run.job_name} {who} not under a raylet: {log.describe(chain)}"
                assert not ui_side & set(chain), f"{run.job_name} {who} runs under dg dev: {log.describe(chain)}"
        for run_id, (job, _) in zip(run_ids, LAUNCHES):
            ray_job = by_submission.get(f"dagster-run-{run_id}")
            assert ray_job and ray_job["status"] == "SUCCEEDED", (job, ray_job, list(by_submission))
            assert ray_job["metadata"]["dagster/run-id"] == run_id
            # The job's Ray driver (the step that connected with engine: ray) is a process of that run.
            driver = int(ray_job["driver_info"]["pid"])
            assert run_processes(instance, run_id)["run"] in log.chain(driver), log.describe(log.chain(driver))
        # Inside the step, Ray's runtime context named the same job, driver and node (the `ray` resource's log).
        connected = [
            m.groups()
            for r in instance.all_logs(run_ids[0])
            if (
                m := re.search(
                    r"connected to the Ray cluster at 127\.0\.0\.1:6379: Ray job (\w+), "
                    r"driver pid (\d+) on node (\w+)",
                    r.user_message or "",
                )
            )
        ]
        ray_job = by_submission[f"dagster-run-{run_ids[0]}"]
        assert connected == [(ray_job["job_id"], ray_job["driver_info"]["pid"], ray_job["driver_node_id"])], (
            connected,
            ray_job,
        )

        # The embedding actor that embedded the shard: a Ray worker process under the raylet.
        record = instance.fetch_materializations(dg.AssetKey("embeddings"), limit=1).records[0]
        worker = str(record.asset_materialization.metadata["worker"].value)
        actor = int(worker.split(" pid ")[1].split()[0])
        assert actor in log.find(r"ray::ShardEmbedder"), (actor, log.titles.get(actor))
        assert raylets & set(log.chain(actor))

    # (2) The keep-lists (and every stage file) equal the local run's, byte for byte.
    assert_same_results(tmp_path / "local", tmp_path / "storage")
    print(
        f"\nRayRunLauncher: setup (Ray head with dashboard and dg dev, beside the reference run) {setup:.1f} s, "
        f"{len(LAUNCHES)} launched runs {launched:.1f} s"
    )
