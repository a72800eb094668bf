"""`make ui`: `dg dev` (webserver, daemon, code server) on one storage, stopped cleanly by SIGINT or SIGTERM.

`dagster dev` alone, sent SIGTERM and then SIGINT, left its webserver and code server
running for 45 s and more. So `dg dev` runs here in its own process group, and the first
SIGINT or SIGTERM this process gets goes on to that whole group; whatever is still
alive after `GRACE_S` is killed, so the UI is gone, with every process it started,
within 10 s.

    python -m semdedup_assets.ui --storage .demo/storage [--host 127.0.0.1] [--port 3000]
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

GRACE_S = 3.0  # SIGTERM -> SIGKILL: the group is gone in under 10 s, even on a busy machine


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(proc: subprocess.Popen, grace: float = GRACE_S) -> None:
    """SIGTERM the process group led by `proc`, then SIGKILL what is left after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader: its zombie would keep the group alive
            if not _group_alive(proc.pid):
                return
            time.sleep(0.1)


def dg_dev_command(host: str, port: int) -> list[str]:
    """`dg dev` of this environment, bound to host:port."""
    return [str(Path(sys.executable).parent / "dg"), "dev", "--host", host, "--port", str(port)]


def source_checkout(package_dir: Path | None = None) -> Path | None:
    """The source checkout this package runs from (its Makefile has a `ui` target), or None for a pip install."""
    root = (package_dir or Path(__file__).resolve().parent).parent
    makefile = root / "Makefile"
    try:
        has_ui = makefile.is_file() and any(line.startswith("ui:") for line in makefile.read_text().splitlines())
    except OSError:
        return None
    return root if has_ui else None


def ui_command(storage: str, dagster_home: str, package_dir: Path | None = None, cwd: Path | None = None) -> str:
    """The command that opens the Dagster UI on `storage`'s run history, for how this package was installed.

    In a source checkout whose `make ui` would open this run history (`<storage>/dagster_home`):
    `make ui` (with `DEMO_STORAGE=` when the storage is not the demo's, after a `cd` from another folder).
    Otherwise (a pip install, or another DAGSTER_HOME): `dagster dev` on the package's code location,
    with the environment it needs; `dg dev` needs a project folder, which a pip install does not have.
    """
    checkout = source_checkout(package_dir)
    local = "://" not in storage
    storage_abs = os.path.abspath(storage) if local else storage
    if checkout is not None and local and os.path.abspath(dagster_home) == os.path.join(storage_abs, "dagster_home"):
        command = "make ui"
        if storage_abs != str(checkout / ".demo" / "storage"):
            command += " DEMO_STORAGE=" + shlex.quote(storage_abs)
        if Path(cwd or os.getcwd()).resolve() != checkout.resolve():
            command = f"cd {shlex.quote(str(checkout))} && {command}"
        return command
    return (
        f"DAGSTER_HOME={shlex.quote(dagster_home)} SEMDEDUP_STORAGE={shlex.quote(storage_abs)} "
        "dagster dev -m semdedup_assets.definitions"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m semdedup_assets.ui", description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True, help="storage root (its dagster_home holds the run history)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    args = parser.parse_args(argv)
    storage = os.path.abspath(args.storage)
    home = os.path.join(storage, "dagster_home")
    from semdedup_assets.instance import ensure_instance_config  # Dagster: only once the arguments are fine

    ensure_instance_config(home)
    # VIRTUAL_ENV: dg compares it with the project's .venv and warns when they differ.
    env = dict(os.environ, SEMDEDUP_STORAGE=storage, DAGSTER_HOME=home, VIRTUAL_ENV=sys.prefix)
    proc = subprocess.Popen(dg_dev_command(args.host, args.port), env=env, start_new_session=True)

    def stop(signum: int, _frame: object) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_group(proc)
        # Nothing left to flush; skip the interpreter's teardown (seconds with Dagster imported).
        os._exit(128 + signum)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None or _group_alive(proc.pid):
            stop_group(proc)


if __name__ == "__main__":
    sys.exit(main())
