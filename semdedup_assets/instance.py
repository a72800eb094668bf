"""The Dagster instance of the commands: where DAGSTER_HOME is, its dagster.yaml, opening it.

`semdedup run`, `forget`, `status` and `make ui` (ui.py) share one instance per storage:
`<storage>/dagster_home` unless DAGSTER_HOME is set.
"""

from __future__ import annotations

import fcntl
import os
import tempfile

import dagster as dg

from semdedup_assets.core.config import Settings


class PipelineError(RuntimeError):
    """A stage failed; the message says which step and why (also: the instance cannot be set up)."""


def visible_gpus() -> int:
    """CUDA devices torch can see (0 without a GPU or a CUDA build)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install must not stop a CPU run
        return 0


def instance_yaml(gpu_limit: int) -> str:
    """dagster.yaml: the `gpu` pool's limit (one step per visible GPU), telemetry off."""
    return (
        "# Written by semdedup; edit freely (it is not overwritten).\n"
        "telemetry:\n  enabled: false\n"
        "concurrency:\n  pools:\n"
        f"    # Steps in a pool with no explicit limit (our only pool is `gpu`): one per visible GPU.\n"
        f"    default_limit: {gpu_limit}\n"
        "# Daemon-launched runs (the UI, sensors): fail runs stuck starting or canceling, and free the\n"
        "# pool slots of runs that ended without releasing them. `semdedup run` and `forget` also\n"
        "# mark their own killed runs failed when they start (see semdedup_assets/run_guard.py).\n"
        "run_monitoring:\n  enabled: true\n  start_timeout_seconds: 180\n  cancel_timeout_seconds: 180\n"
        "  poll_interval_seconds: 30\n  free_slots_after_run_end_seconds: 30\n"
    )


def ensure_instance_config(home: str) -> None:
    """Create DAGSTER_HOME with a dagster.yaml (gpu pool limit, telemetry off) when it is missing.

    The file appears whole or not at all (written aside, then linked into place, never over an
    existing one): a command that read it half-written got an instance without the pool's default
    limit, and its first step then deleted the pool's limit row as Dagster does for a pool whose
    default is gone; another run's next claim failed inside Dagster (`NOT NULL constraint failed:
    concurrency_limits.concurrency_key`), seen with two `semdedup run` starting together.
    """
    os.makedirs(home, exist_ok=True)
    path = os.path.join(home, "dagster.yaml")
    if os.path.exists(path):
        return
    fd, tmp = tempfile.mkstemp(dir=home, prefix=".dagster.yaml.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(instance_yaml(max(1, visible_gpus())))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)  # fails if another command put its (same) file there first
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: replace (the same content either way)
            if not os.path.exists(path):
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:  # replaced into place
            pass


def default_dagster_home(settings: Settings) -> str:
    """DAGSTER_HOME: the environment's, else the one the storage's graph recorded (a component's project
    instance, names.record_graph), else a folder inside a local storage root."""
    from semdedup_assets.names import recorded_graph

    if os.environ.get("DAGSTER_HOME"):
        return os.environ["DAGSTER_HOME"]
    storage = settings.storage_root()
    recorded = recorded_graph(storage).dagster_home
    if recorded and ("://" in recorded or os.path.isfile(os.path.join(recorded, "dagster.yaml"))):
        return recorded
    if not storage.local:
        raise PipelineError("set DAGSTER_HOME when the storage root is not a local folder")
    return str(storage.root / "dagster_home")


def open_instance(settings: Settings) -> dg.DagsterInstance:
    """The Dagster instance of a command: DAGSTER_HOME (created with its dagster.yaml when missing)."""
    home = default_dagster_home(settings)
    os.environ["DAGSTER_HOME"] = os.path.abspath(home) if "://" not in home else home
    ensure_instance_config(os.environ["DAGSTER_HOME"])
    # Two commands starting on a fresh home would both create the SQLite schema ("table
    # already exists"): the first one to hold the lock creates it, the other then opens it.
    with open(os.path.join(os.environ["DAGSTER_HOME"], ".semdedup-instance.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return dg.DagsterInstance.get()
