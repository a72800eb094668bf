"""Keeping the Dagster instance healthy around in-process runs: stale runs, pool slots, signals.

A `semdedup run` killed with SIGKILL leaves its run `STARTED` for ever and, when it was
inside a `gpu`-pool step, that pool slot claimed: every later step in the pool then waits
without end. So every in-process run carries its process id and host in run tags, and
`recover_stale_runs` (called when `semdedup run` or `forget` starts, and again while a
step waits for a slot) marks the runs whose process is gone as failed and frees their
slots. `RunGuard` also makes SIGTERM and SIGINT stop a run promptly, even while a step
waits for a slot (Dagster defers interrupts there): the run is marked canceled, its slots
are freed, unpublished temporary files are deleted, and the process exits.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable

import dagster as dg

from semdedup_assets.core.io import storage as st

PID_TAG = "semdedup/pid"
HOST_TAG = "semdedup/host"
PID_START_TAG = "semdedup/pid_start"  # the process's start time: a reused pid is not the same process
UNFINISHED = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.CANCELING]
# How often a waiting step is reported (and the holder of its slot checked) while it waits.
WAIT_REPORT_INTERVAL_S = 5.0
POLL_INTERVAL_S = 1.0


def _process_start(pid: int) -> str | None:
    """The start time of a process in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[19]  # field 22 overall; the name may hold spaces


def process_tags() -> dict[str, str]:
    """Run tags that identify this process, so a later process can tell whether it is gone."""
    tags = {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}
    start = _process_start(os.getpid())
    if start is not None:
        tags[PID_START_TAG] = start
    return tags


def process_gone(tags: dict[str, str]) -> bool:
    """True when the tags name a process on this host that no longer runs (False when unknown)."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    pid = int(tags[PID_TAG])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    start = tags.get(PID_START_TAG)
    return start is not None and _process_start(pid) not in (None, start)


def _free_slots(instance: dg.DagsterInstance, run_id: str) -> None:
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        storage.free_concurrency_slots_for_run(run_id)


def recover_stale_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark every unfinished run whose process is gone as failed and free its pool slots.

    Also frees slots still claimed by runs that have already finished (a crash between a
    run's end and the slot's release). Returns the ids of the runs marked failed.
    """
    recovered = []
    for run in instance.get_runs(filters=dg.RunsFilter(statuses=UNFINISHED)):
        if not process_gone(dict(run.tags)):
            continue
        reason = (
            f"the process that ran it (pid {run.tags[PID_TAG]} on {run.tags[HOST_TAG]}) is gone: "
            "it was killed or crashed; marked failed by semdedup"
        )
        instance.report_run_failed(run, message=reason)
        _free_slots(instance, run.run_id)
        log(
            f"[semdedup] run {run.run_id} ({run.job_name}) was still {run.status.value} but {reason}; "
            "its pool slots are freed"
        )
        recovered.append(run.run_id)
    storage = instance.event_log_storage
    if storage.supports_global_concurrency_limits:
        holders = storage.get_concurrency_run_ids()
        if holders:
            for record in instance.get_run_records(dg.RunsFilter(run_ids=list(holders))):
                if record.dagster_run.is_finished:
                    storage.free_concurrency_slots_for_run(record.dagster_run.run_id)
                    log(f"[semdedup] freed the pool slots still held by finished run {record.dagster_run.run_id}")
    return recovered


def report_waiting_steps(
    instance: dg.DagsterInstance, run_ids: set[str], log: Callable[[str], None], now: float | None = None
) -> list[str]:
    """Log, for each step of `run_ids` waiting for a pool slot, which runs hold the pool and for how long."""
    storage = instance.event_log_storage
    if not run_ids or not storage.supports_global_concurrency_limits:
        return []
    now = time.time() if now is None else now
    lines = []
    for pool in sorted(storage.get_concurrency_keys()):
        info = storage.get_concurrency_info(pool)
        waiting = [p for p in info.pending_steps if p.run_id in run_ids and p.assigned_timestamp is None]
        if not waiting:
            continue
        since = {(p.run_id, p.step_key): p.assigned_timestamp for p in info.pending_steps if p.assigned_timestamp}
        holders = []
        for slot in info.claimed_slots:
            assigned = since.get((slot.run_id, slot.step_key))
            held = f" for {now - assigned.timestamp():.0f} s" if assigned is not None else ""
            run = instance.get_run_by_id(slot.run_id)
            state = f", {run.status.value}" if run is not None else ", unknown to this instance"
            holders.append(f"run {slot.run_id} (step {slot.step_key}{state}){held}")
        for step in waiting:
            line = (
                f"[semdedup] step {step.step_key} of run {step.run_id} waits for a slot of pool {pool!r} "
                f"(limit {info.slot_count}, waiting {now - step.enqueued_timestamp.timestamp():.0f} s); held by "
                + ("; ".join(holders) or "no run")
                + f". A holder whose process is gone is released automatically; to raise the limit: "
                f"`dagster instance concurrency set {pool} N`"
            )
            log(line)
            lines.append(line)
            waiting_run = instance.get_run_by_id(step.run_id)
            if waiting_run is not None:  # also in the run's own log (INFO), where the UI shows it
                instance.report_engine_event(line.removeprefix("[semdedup] "), waiting_run, step_key=step.step_key)
    return lines


class RunGuard:
    """While active: stale runs are recovered, waiting steps reported, SIGTERM/SIGINT stop the run.

    Signal handling uses a wakeup fd, which the interpreter writes from its C-level
    handler as soon as a signal arrives, so a watcher thread sees the signal even while
    Dagster has swapped the SIGINT handler or the main thread sits in a long C call.
    """

    def __init__(
        self,
        instance: dg.DagsterInstance,
        log: Callable[[str], None] = print,
        report_interval: float = WAIT_REPORT_INTERVAL_S,
        stop_on_signals: bool = False,
    ) -> None:
        self.instance = instance
        self.stop_on_signals = stop_on_signals  # only a command owns its process: a library caller keeps its handlers
        self.log = log
        self.report_interval = report_interval
        self.tags = process_tags()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._saved: dict[int, object] = {}
        self._saved_fd: int | None = None

    def own_run_ids(self) -> set[str]:
        """Unfinished runs started by this process."""
        runs = self.instance.get_runs(
            filters=dg.RunsFilter(
                statuses=[*UNFINISHED, dg.DagsterRunStatus.NOT_STARTED],
                tags={PID_TAG: self.tags[PID_TAG], HOST_TAG: self.tags[HOST_TAG]},
            )
        )
        return {r.run_id for r in runs}

    def __enter__(self) -> RunGuard:
        recover_stale_runs(self.instance, self.log)
        if self.stop_on_signals and threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            self._pipe = (read_fd, write_fd)
            self._saved_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            for signo in (signal.SIGTERM, signal.SIGINT):
                self._saved[signo] = signal.signal(signo, self._note_signal)
        self._thread = threading.Thread(target=self._watch, name="semdedup-run-guard", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._pipe is not None:
            signal.set_wakeup_fd(self._saved_fd if self._saved_fd is not None else -1)
            for signo, handler in self._saved.items():
                signal.signal(signo, handler)
            os.write(self._pipe[1], b"\0")  # wake the watcher
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)

    @staticmethod
    def _note_signal(signo: int, frame: object) -> None:
        """The Python-level handler: the watcher thread does the work (see the class docstring)."""

    def _watch(self) -> None:
        last_report = time.monotonic()
        while not self._stop.is_set():
            if self._pipe is not None:
                ready, _, _ = select.select([self._pipe[0]], [], [], POLL_INTERVAL_S)
                if ready:
                    data = os.read(self._pipe[0], 64)
                    signos = [b for b in data if b in (signal.SIGTERM, signal.SIGINT)]
                    if signos and not self._stop.is_set():
                        self.stop(signos[0])
            else:
                self._stop.wait(POLL_INTERVAL_S)
            if time.monotonic() - last_report >= self.report_interval and not self._stop.is_set():
                last_report = time.monotonic()
                try:
                    if report_waiting_steps(self.instance, self.own_run_ids(), self.log):
                        recover_stale_runs(self.instance, self.log)
                except Exception as err:  # reporting must never break a run
                    self.log(f"[semdedup] could not inspect the pools: {err}")

    def stop(self, signo: int) -> None:
        """Cancel this process's runs, free their slots, drop unpublished files, and exit."""
        name = signal.Signals(signo).name
        try:
            for run_id in sorted(self.own_run_ids()):
                run = self.instance.get_run_by_id(run_id)
                if run is not None:
                    self.instance.report_run_canceled(run, message=f"semdedup received {name}: run stopped")
                _free_slots(self.instance, run_id)
                self.log(f"[semdedup] {name}: run {run_id} marked canceled, its pool slots freed")
        finally:
            st.discard_temporary_files()
            self.log(f"[semdedup] stopped by {name}; nothing partial was published")
            os._exit(128 + signo)
