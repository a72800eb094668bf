"""Real Ray clusters for tests, inside a network namespace that holds only the loopback.

On these machines Ray advertises the eth0 address even when told 127.0.0.1, and probes
an outside address to find its own IP. So every Ray process of a test (head, extra
nodes, the driver) runs inside one `unshare --net` namespace with only `lo` up: there
every address is 127.0.0.1 and nothing can leave. A sleeping holder process keeps the
namespace alive; commands join it with `nsenter --net=/proc/<holder>/ns/net`.

Teardown stops exactly the processes inside the namespace (not `ray stop`, which ends
every Ray process on the machine, including other tests'), then the holder.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_PORT = 6379  # the namespace has its own ports: no clash with anything outside it
DASHBOARD_PORT = 8265  # the Ray Jobs API (dagster-ray's RayRunLauncher submits runs there)
CLONE_NEWNET = 0x40000000


def namespaces_available() -> str | None:
    """Why Ray tests cannot run here (None when they can): root, unshare, nsenter, ip and ss.

    Ray itself is not a reason to skip: `make test` installs it (the `ray` extra).
    """
    if os.geteuid() != 0:
        return "needs root for unshare --net"
    for tool in ("unshare", "nsenter", "ip", "ss"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def ray_env() -> dict[str, str]:
    """The environment of every process in the namespace: this checkout on the path, offline models."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        TOKENIZERS_PARALLELISM="false",
        # Explicit: otherwise a local ray.init writes ~/.ray/auth_token, and a later `ray start`
        # that finds it enables token auth for some processes of a cluster and not others.
        # Nothing outside the loopback-only namespace can reach these clusters anyway.
        RAY_AUTH_MODE="disabled",
    )
    env.pop("RAY_ADDRESS", None)
    return env


class NetNamespace:
    """A network namespace with only `lo` up, and the processes started in it."""

    def __init__(self) -> None:
        self.holder = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--fork",
                "--kill-child",
                "sh",
                "-c",
                "ip link set lo up && echo $$ && exec sleep infinity",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.holder.stdout.readline().strip()
        if not line.isdigit():
            self.holder.kill()
            raise RuntimeError(f"could not create a network namespace (got {line!r})")
        self.pid = int(line)
        self.netns = f"/proc/{self.pid}/ns/net"
        self._link = os.readlink(self.netns)

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` run inside the namespace."""
        return ["nsenter", f"--net={self.netns}", *args]

    def run(self, args: Sequence[str], timeout: float = 300, check: bool = False, **kw) -> subprocess.CompletedProcess:
        """Run a command inside the namespace and wait for it."""
        kw.setdefault("env", ray_env())
        return subprocess.run(self.command(args), capture_output=True, text=True, timeout=timeout, check=check, **kw)

    def popen(self, args: Sequence[str], **kw) -> subprocess.Popen:
        """Start a command inside the namespace."""
        kw.setdefault("env", ray_env())
        return subprocess.Popen(self.command(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)

    @contextmanager
    def joined(self) -> Iterator[None]:
        """Run the block with the calling thread inside the namespace (setns), then return it to its own.

        Sockets the block opens reach the namespace's 127.0.0.1 (its webserver, the Ray dashboard),
        and processes it starts (subprocess) are born inside the namespace, so `stop` ends them too.
        """
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.netns, os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.netns}: {os.strerror(err)}")
            try:
                yield
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:  # never leave the test's thread stranded inside
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns back to this thread's namespace: {os.strerror(err)}")
        finally:
            os.close(own)
            os.close(target)

    def members(self) -> list[int]:
        """Every process inside the namespace except the holder."""
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != self.pid:
                try:
                    if os.readlink(f"/proc/{entry}/ns/net") == self._link:
                        pids.append(int(entry))
                except OSError:
                    pass
        return pids

    def listening(self) -> list[tuple[str, str]]:
        """(local address, process) of every listening TCP and UDP socket inside the namespace."""
        out = self.run(["ss", "-H", "-ltunp"], timeout=30, check=True).stdout
        rows = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 5:
                process = re.search(r'"([^"]+)"', line)
                rows.append((parts[4], process.group(1) if process else "?"))
        return rows

    def stop(self, grace: float = 10.0) -> list[int]:
        """End every process in the namespace (TERM, then KILL), then the holder; returns survivors."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in self.members():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while self.members() and time.monotonic() < deadline:
                time.sleep(0.1)
        survivors = self.members()
        self.holder.kill()
        self.holder.wait(timeout=10)
        return survivors


class RayCluster:
    """A Ray head plus extra nodes (each its own raylet) on 127.0.0.1 inside a NetNamespace."""

    def __init__(self, ns: NetNamespace, nodes: Sequence[dict[str, int]], dashboard: bool = False) -> None:
        self.ns = ns
        self.address = f"127.0.0.1:{HEAD_PORT}"
        # The Ray Jobs API (with `dashboard`): where RayRunLauncher submits each run as a Ray job.
        self.dashboard_url = f"http://127.0.0.1:{DASHBOARD_PORT}" if dashboard else None
        # Short: Ray's Unix socket paths live below it and must stay under 108 bytes.
        self.temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        for i, resources in enumerate(nodes):
            args = [
                str(BIN / "ray"),
                "start",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                "--object-store-memory=200000000",
                *(f"--{name.replace('_', '-')}={value}" for name, value in resources.items()),
            ]
            if i == 0:
                args += [
                    "--head",
                    f"--port={HEAD_PORT}",
                    f"--temp-dir={self.temp_dir}",
                    *(
                        ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}"]
                        if dashboard
                        else ["--include-dashboard=false"]
                    ),
                ]
            else:
                args += [f"--address={self.address}"]
            started = ns.run(args, timeout=120)
            if started.returncode != 0:
                raise RuntimeError(f"ray start (node {i}) failed:\n{started.stdout[-2000:]}\n{started.stderr[-2000:]}")

    def semdedup(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """`semdedup ARGS` inside the namespace, waited for."""
        return run_semdedup(self.ns, *args, timeout=timeout)

    def popen_semdedup(self, *args: str) -> subprocess.Popen:
        """`semdedup ARGS` started inside the namespace (stdout and stderr together)."""
        return self.ns.popen(semdedup_command(*args), cwd=str(REPO))

    def stop(self) -> list[int]:
        """Stop every process of the cluster (and the namespace); returns survivors (should be none)."""
        try:
            return self.ns.stop()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def semdedup_command(*args: str) -> list[str]:
    """The `semdedup` command line of this checkout."""
    return [sys.executable, "-m", "semdedup_assets.cli", *args]


def run_semdedup(ns: NetNamespace, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`semdedup ARGS` inside a namespace, waited for."""
    return ns.run(semdedup_command(*args), timeout=timeout, cwd=str(REPO))


def start_cluster(nodes: Sequence[dict[str, int]], dashboard: bool = False) -> RayCluster:
    """A cluster in a fresh namespace (with the Ray Jobs API if `dashboard`); skips where namespaces are unavailable."""
    reason = namespaces_available()
    if reason:
        pytest.skip(reason)
    ns = NetNamespace()
    try:
        return RayCluster(ns, nodes, dashboard=dashboard)
    except BaseException:
        ns.stop()
        raise


# ---- The reference: the local engine in this process (the Ray runs must give its bytes) ----

STAGES = ("raw", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")


def stage_files(storage: Path) -> dict[str, bytes]:
    """Every Parquet file the stages wrote (relative path -> bytes); temporaries included, to catch leftovers."""
    return {
        str(p.relative_to(storage)): p.read_bytes()
        for stage in STAGES
        for p in sorted((storage / stage).rglob("*"))
        if p.is_file()
    }


def run_local(input_dir: Path, storage: Path, **settings: Any) -> None:
    """The reference: the whole graph with the local engine, in this process (4 clusters, 2 buckets unless given)."""
    import dagster as dg

    from semdedup_assets.core.config import Settings
    from semdedup_assets.pipeline import run_pipeline

    values: dict[str, Any] = {"clusters": 4, "buckets": 2, "eps": (0.001, 0.01, 0.1), **settings}
    with dg.instance_for_test() as instance:
        run_pipeline(Settings(storage=str(storage), input=str(input_dir), **values), instance, log=lambda m: None)


def assert_same_results(local: Path, ray: Path) -> None:
    """Both storages hold the same stage files, byte for byte, and the same `items` rows; no temporaries."""
    from semdedup_assets.core.config import Settings
    from semdedup_assets.core.io.catalog import query

    a, b = stage_files(local), stage_files(ray)
    assert sorted(a) == sorted(b)
    assert not [p for p in a if p.endswith(".tmp")]
    different = [p for p in a if a[p] != b[p]]
    assert not different, f"files differ between the engines: {different}"
    items = "SELECT id, shard, cluster, sim_to_centroid, max_sim, duplicate_of FROM items ORDER BY id"
    assert query(Settings(storage=str(local)).storage_root(), items) == query(
        Settings(storage=str(ray)).storage_root(), items
    )
