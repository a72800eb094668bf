"""Test helper: a real `dg dev` (webserver + daemon + code server) in a subprocess, and raw GraphQL.

`dagster_dev(...)` starts `dg dev --host 127.0.0.1 --port PORT` from the project root (what
`make ui` runs, see semdedup_assets/ui.py) in its own process group with the given
environment, waits until `/server_info` answers and the code location has loaded, yields a
`DagsterDev` handle (base URL, log file), and always kills the whole process group at the
end (webserver, daemon, code servers and the runs they launched). Not named gql.py on
purpose: that would shadow the `gql` package.
`daemon_loop_s` (the tests pass it; benchmarks, which time the daemon, do not) cuts the daemon's
fixed idle sleeps between iterations (daemon_loop/sitecustomize.py) and the run queue's dequeue
interval, so a test waits for the work and not for the daemon's clock.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import requests

from semdedup_assets.ui import dg_dev_command, stop_group

REPO = Path(__file__).resolve().parents[1]
DAEMON_LOOP = Path(__file__).resolve().parent / "daemon_loop"  # its sitecustomize.py shortens the daemon's sleeps
TEST_DAEMON_LOOP_S = 2  # the tests' daemon sleep between iterations (Dagster's: 30 s backfills, 5 s sensors)
T = TypeVar("T")


class GraphQLError(RuntimeError):
    """The server answered a GraphQL request with errors."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def graphql(url: str, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
    """POST one GraphQL request to `<url>/graphql`; returns `data`, raises on transport or GraphQL errors."""
    resp = requests.post(f"{url}/graphql", json={"query": query, "variables": variables or {}}, timeout=timeout)
    resp.raise_for_status()
    body = resp.json()
    if body.get("errors"):
        raise GraphQLError(str(body["errors"]))
    return body["data"]


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    interval: float = 1.0,
    log: Callable[[], str] | None = None,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; on timeout fail with `what` and the log tail.

    An exception from the probe is retried (the server may be busy), except AssertionError,
    which fails at once (the process died, a run failed). `describe` adds the state seen
    (runs, statuses) to the failure message.
    """

    def context() -> str:
        parts = []
        if describe:
            try:
                parts.append(f"--- state ---\n{describe()}")
            except Exception as err:
                parts.append(f"--- state --- (unavailable: {err!r})")
        if log:
            parts.append(f"--- dg dev log (tail) ---\n{log()}")
        return ("\n" + "\n".join(parts)) if parts else ""

    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except AssertionError as err:
            raise AssertionError(f"{err}{context()}") from None
        except Exception as err:  # keep polling; report the last error on timeout
            last_error = err
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}{context()}")
        time.sleep(interval)


@dataclass
class DagsterDev:
    """A running `dg dev`."""

    url: str
    log_path: Path
    process: subprocess.Popen

    def log_tail(self, lines: int = 80) -> str:
        """The last lines of the combined stdout/stderr of `dg dev`."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError as err:
            return f"(no log: {err})"

    def graphql(self, query: str, variables: dict[str, Any] | None = None, timeout: float = 60) -> dict[str, Any]:
        """Raw GraphQL against this server."""
        return graphql(self.url, query, variables, timeout)

    def wait_for(
        self,
        what: str,
        probe: Callable[[], T | None],
        timeout: float,
        interval: float = 1.0,
        describe: Callable[[], str] | None = None,
    ) -> T:
        """Poll `probe` (see `wait_for`); a failure shows this server's log tail."""
        return wait_for(what, probe, timeout, interval, log=self.log_tail, describe=describe)


LOCATION_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries {
  name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def _location_loaded(dev: DagsterDev) -> bool:
    data = dev.graphql(LOCATION_QUERY)["workspaceOrError"]
    entries = data.get("locationEntries") or []
    for entry in entries:
        error = entry.get("locationOrLoadError") or {}
        if error.get("__typename") == "PythonError":
            raise AssertionError(f"code location {entry['name']} failed to load: {error.get('message')}")
    return bool(entries) and all(e["loadStatus"] == "LOADED" for e in entries)


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the whole process group, wait up to `grace` s, then SIGKILL whatever is left of it."""
    stop_group(proc, grace)  # start_new_session=True: the group id is the leader's pid, even after it exits
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def fast_daemon_env(env: dict[str, str], loop_s: float) -> dict[str, str]:
    """`env` for a `dg dev` whose daemon sleeps `loop_s` between iterations, its run queue 1 s.

    Dagster's backfill daemon sleeps a fixed 30 s between iterations and the sensor and asset
    daemons at least 5 s; no dagster.yaml setting changes them, so daemon_loop/sitecustomize.py
    does it inside the daemon process only. The run queue's dequeue interval (5 s by default) is
    an instance setting: it is added to DAGSTER_HOME's dagster.yaml.
    """
    from semdedup_assets.instance import ensure_instance_config

    home = Path(env["DAGSTER_HOME"])
    ensure_instance_config(str(home))
    config = home / "dagster.yaml"
    text = config.read_text()
    if "run_queue:" not in text:
        config.write_text(
            text + "# Tests (semdedup_assets_tests/webserver.py): dequeue every second.\n"
            "run_queue:\n  dequeue_interval_seconds: 1\n"
        )
    path = [p for p in (env.get("PYTHONPATH"), str(DAEMON_LOOP)) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(path), SEMDEDUP_TESTS_DAEMON_LOOP_S=str(loop_s))


@contextmanager
def dagster_dev(
    env: dict[str, str],
    log_path: Path,
    port: int | None = None,
    startup_timeout: float = 180.0,
    stop_grace: float = 10.0,
    daemon_loop_s: float | None = None,
) -> Iterator[DagsterDev]:
    """Run `dg dev` with `env` (must hold DAGSTER_HOME); yield once the code location is loaded.

    At the end its process group gets SIGTERM, then SIGKILL after `stop_grace` seconds.
    `daemon_loop_s`: the daemon's idle sleep between iterations (see `fast_daemon_env`); None
    keeps Dagster's own (30 s for backfills, 5 s for sensors), as a benchmark needs.
    """
    assert env.get("DAGSTER_HOME"), "dg dev needs DAGSTER_HOME"
    if daemon_loop_s is not None:
        env = fast_daemon_env(env, daemon_loop_s)
    port = port or free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "wb")  # noqa: SIM115  `dg dev` writes it until it is stopped
    # VIRTUAL_ENV: dg compares it with the project's .venv and warns when they differ (as ui.py sets it).
    proc = subprocess.Popen(
        dg_dev_command("127.0.0.1", port),
        cwd=REPO,
        env={**env, "VIRTUAL_ENV": sys.prefix},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: one killpg ends webserver, daemon and runs
    )
    dev = DagsterDev(url=f"http://127.0.0.1:{port}", log_path=log_path, process=proc)
    try:

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dg dev exited with {proc.returncode}")
            return requests.get(f"{dev.url}/server_info", timeout=5).ok

        def alive_and_loaded() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dg dev exited with {proc.returncode}")
            return _location_loaded(dev)

        dev.wait_for("dg dev /server_info", up, startup_timeout, interval=0.5)
        dev.wait_for("the code location to load", alive_and_loaded, startup_timeout, interval=0.5)
        yield dev
    finally:
        _kill_group(proc, stop_grace)
        log.close()


def platform_env(
    tmp: Path, *, sensors: bool, interval: int = 5, clusters: int = 4, buckets: int = 2, **extra: str
) -> dict[str, str]:
    """The environment of the code location for a test platform under `tmp` (storage, landing, home)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMDEDUP_") and k != "DAGSTER_HOME"}
    env.update(
        {
            "SEMDEDUP_STORAGE": str(tmp / "storage"),
            "SEMDEDUP_INPUT": str(tmp / "landing"),
            "SEMDEDUP_MODALITY": "embedding",
            "SEMDEDUP_CLUSTERS": str(clusters),
            "SEMDEDUP_BUCKETS": str(buckets),
            "SEMDEDUP_SENSORS": "on" if sensors else "off",
            "SEMDEDUP_SENSOR_INTERVAL": str(interval),
            "DAGSTER_HOME": str(tmp / "home"),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


# ---- GraphQL documents the tests use (Dagster 1.13 schema, as the UI sends them) ----

RUNS_QUERY = """
query Runs($filter: RunsFilter) { runsOrError(filter: $filter) {
  __typename
  ... on Runs { results { runId jobName status creationTime assetSelection { path } tags { key value } } }
  ... on PythonError { message }
} }
"""

LAUNCH_BACKFILL = """
mutation LaunchPartitionBackfill($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message stack }
    ... on PartitionKeysNotFoundError { message }
    ... on InvalidSubsetError { message }
    ... on UnauthorizedError { message }
    ... on RunConflict { message }
  }
}
"""

BACKFILL_QUERY = """
query Backfill($backfillId: String!) { partitionBackfillOrError(backfillId: $backfillId) {
  __typename
  ... on PartitionBackfill { id status isAssetBackfill numPartitions partitionNames
    assetSelection { path } error { message } runs { runId status tags { key value } } }
  ... on BackfillNotFoundError { message }
  ... on PythonError { message }
} }
"""

PARTITION_STATUS_QUERY = """
query PartitionStatus($assetKey: AssetKeyInput!) { assetNodeOrError(assetKey: $assetKey) {
  __typename
  ... on AssetNode { partitionStats { numMaterialized numPartitions numFailed numMaterializing }
    assetPartitionStatuses { __typename ... on DefaultPartitionStatuses {
      materializedPartitions failedPartitions unmaterializedPartitions materializingPartitions } } }
} }
"""

FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}
FAILED = {"FAILURE", "CANCELED"}


def runs(dev: DagsterDev, **filter_: Any) -> list[dict[str, Any]]:
    """Every run (newest first) with `tags` as a dict and `assets` as a list of asset key strings."""
    data = dev.graphql(RUNS_QUERY, {"filter": filter_ or None})["runsOrError"]
    if data["__typename"] != "Runs":
        raise GraphQLError(str(data))
    out = []
    for r in data["results"]:
        r = dict(
            r,
            tags={t["key"]: t["value"] for t in r["tags"]},
            assets=sorted("/".join(a["path"]) for a in (r.get("assetSelection") or [])),
        )
        out.append(r)
    return out


def run_partitions(run: dict[str, Any]) -> str:
    """A run's partition or partition range, as text."""
    tags = run["tags"]
    if "dagster/partition" in tags:
        return tags["dagster/partition"]
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    return f"{start}...{end}" if start else "-"


def describe_runs(dev: DagsterDev) -> str:
    """One line per run: id, job, assets, partitions, who launched it, status."""
    lines = []
    for r in reversed(runs(dev)):
        who = r["tags"].get("dagster/sensor_name") or (
            f"backfill {r['tags']['dagster/backfill']}"
            if "dagster/backfill" in r["tags"]
            else "ui"
            if r["tags"].get("dagster/from_ui")
            else "other"
        )
        lines.append(
            f"{r['runId'][:8]} {r['jobName']} {','.join(r['assets']) or '-'} [{run_partitions(r)}] by {who}: {r['status']}"
        )
    return "\n".join(lines) or "(no runs)"
