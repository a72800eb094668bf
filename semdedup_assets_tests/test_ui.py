"""`make ui` for real: `dg dev` serves the code location and stops, with every process it started, within 10 s.

`make ui` runs in its own session (as from a terminal); the test records every process
below it once the UI is up (make, semdedup_assets.ui, dg dev, the daemon, the webserver
and the code servers), sends the signal a user sends (SIGTERM to make, or Ctrl-C's SIGINT
to its process group), and fails unless every one of them is gone within 10 s.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import requests

from semdedup_assets_tests.webserver import LOCATION_QUERY, REPO, free_port, graphql, wait_for

STOP_WITHIN_S = 10.0


def _children() -> dict[int, list[int]]:
    """Every live process's children, from /proc (zombies count as gone)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            out.setdefault(int(fields[1]), []).append(int(entry))
    return out


def _tree(pid: int) -> set[int]:
    """`pid` and every live process below it."""
    children, seen, todo = _children(), set(), [pid]
    while todo:
        p = todo.pop()
        seen.add(p)
        todo += children.get(p, [])
    return seen


def _alive(pids: set[int]) -> set[int]:
    live = {p for kids in _children().values() for p in kids}
    return pids & live


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGTERM and SIGINT handled by default and not blocked, as a shell leaves them.

    An ignored or blocked signal is inherited through exec, and GNU make keeps ignoring a
    SIGTERM it inherited ignored (it then never passes it on): the test process's own state
    after earlier tests must not decide what `make ui` does with the signal.
    """
    for signo in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signo, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


def _signal_state(pids: list[int]) -> dict[int, str]:
    """Each process's blocked, ignored and pending signal masks (why a signal did nothing), from /proc."""
    out = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        name = next((line.split()[1] for line in status if line.startswith("Name:")), "?")
        masks = " ".join(
            line.replace("\t", "") for line in status if line.startswith(("SigBlk", "SigIgn", "SigPnd", "ShdPnd"))
        )
        out[pid] = f"{name} {masks}"
    return out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["SIGTERM to make", "SIGINT to the group"])
def test_make_ui_serves_the_location_and_stops_within_10_s(tmp_path: Path, how: str) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMDEDUP_") and k != "DAGSTER_HOME"}
    log = open(tmp_path / "make-ui.log", "wb")  # noqa: SIM115  `make ui` writes it until it is stopped
    # -o: never re-install from here (the stamp may be older than pyproject.toml in a checkout).
    proc = subprocess.Popen(
        ["make", "-o", ".venv/.stamp-demo", "ui", f"UI_PORT={port}", f"DEMO_STORAGE={tmp_path / 'storage'}"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_as_from_a_terminal,
    )
    url = f"http://127.0.0.1:{port}"

    def loaded() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"make ui exited with {proc.returncode}")
        entries = graphql(url, LOCATION_QUERY)["workspaceOrError"].get("locationEntries") or []
        return [(e["name"], e["loadStatus"]) for e in entries] == [("semdedup", "LOADED")]

    tree: set[int] = set()
    try:
        wait_for(
            "make ui to serve the semdedup code location",
            loaded,
            timeout=240,
            interval=1,
            log=lambda: (tmp_path / "make-ui.log").read_text(errors="replace")[-3000:],
        )
        tree = _tree(proc.pid)
        assert len(tree) >= 5, f"expected make, the launcher, dg dev, daemon and code server; got {sorted(tree)}"
        sent = time.monotonic()
        if how == "SIGTERM to make":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        while _alive(tree) and time.monotonic() - sent < STOP_WITHIN_S + 5:
            proc.poll()
            time.sleep(0.2)
        took = time.monotonic() - sent
        left = _alive(tree)
        assert not left and took <= STOP_WITHIN_S, (
            f"{how}: {sorted(left)} still alive after {took:.1f} s; signal state: {_signal_state(sorted(left))}"
        )
        with pytest.raises(requests.ConnectionError):  # nothing listens on the port any more
            requests.get(f"{url}/server_info", timeout=2)
        print(f"\n{how}: {len(tree)} processes gone in {took:.1f} s")
    finally:
        for pid in _alive(tree | {proc.pid}):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        log.close()
