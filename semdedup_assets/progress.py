"""Terminal progress for the long stages: tqdm bars on a TTY, periodic one-line updates elsewhere.

The stages run inside Dagster runs in the same process, so the command line installs one
`Reporter` for the process (`set_reporter`) and the per-shard / per-bucket loops open a
task through `task(...)`. Without a reporter (``dagster dev``, library use, tests that
call the assets directly) a task is silent, so nothing below the CLI needs to know
whether a terminal is attached. The run's event log keeps its own progress lines
(`assets.common.ProgressLog`); this module only draws on the terminal.

Usage, e.g. in an export loop::

    from semdedup_assets import progress

    with progress.task("export", total=len(shards), unit="shards") as bar:
        for shard in shards:
            ...
            bar.update(1, f"wrote {shard}")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

# One line per update on a non-TTY: what CI logs show. tqdm's own formatter, so the
# rate and ETA read the same as on the bar.
LINE_FORMAT = "[semdedup] {desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}]"
NOTE_WIDTH = 60  # the bar's note (last item done) is cut to this many characters


class Task:
    """Progress of one loop: `update` after each item; closes itself after the last one."""

    def __init__(self, reporter: Reporter | None, label: str, total: int, unit: str) -> None:
        self.reporter, self.label, self.total, self.unit = reporter, label, total, unit
        self.done = 0
        self.closed = reporter is None
        self._start = time.monotonic()
        self._last_line: float | None = None
        self._bar: tqdm | None = None
        if reporter is None:
            return
        try:
            if reporter.tty:
                self._bar = tqdm(
                    total=total,
                    desc=label,
                    unit=unit,
                    file=reporter.stream,
                    dynamic_ncols=True,
                    mininterval=0.1,
                    leave=True,
                )
            else:
                self._line("")
        except (OSError, ValueError):
            self.closed = True

    def update(self, n: int = 1, note: str = "") -> None:
        """Count `n` more items done; `note` says what the last one was."""
        if self.closed:
            return
        self.done += n
        try:
            if self._bar is not None:
                if note:
                    self._bar.set_postfix_str(_cut(note), refresh=False)
                self._bar.update(n)
            else:
                now = time.monotonic()
                if (
                    self.done >= self.total
                    or self._last_line is None
                    or now - self._last_line >= self.reporter.interval
                ):
                    self._line(note)
        except (OSError, ValueError):  # the terminal went away (closed pipe): never fail the work for it
            self._bar = None
            self.close()
        if self.done >= self.total:
            self.close()

    def close(self) -> None:
        """End the task (idempotent); a bar stays on screen with its final figures."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            try:
                self._bar.close()
            except (OSError, ValueError):
                pass
        if self.reporter is not None:
            self.reporter._closed(self)

    def _line(self, note: str) -> None:
        elapsed = time.monotonic() - self._start
        line = tqdm.format_meter(
            self.done, self.total, elapsed, unit=self.unit, prefix=self.label, bar_format=LINE_FORMAT
        )
        print(line + (f"  {_cut(note)}" if note else ""), file=self.reporter.stream, flush=True)
        self._last_line = time.monotonic()

    def __enter__(self) -> Task:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _cut(note: str) -> str:
    note = " ".join(note.split())
    return note if len(note) <= NOTE_WIDTH else note[: NOTE_WIDTH - 1] + "…"


class Reporter:
    """Where the tasks of this process draw: a stream, TTY or not, and the line interval off a TTY."""

    def __init__(self, stream: TextIO | None = None, interval: float = 10.0, tty: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self._open: list[tuple[Task, bool]] = []  # (task, outer)

    def task(self, label: str, total: int, unit: str = "items", outer: bool = False) -> Task:
        """A new task. Inside an open `outer` task (a loop over runs, e.g. `forget`'s buckets) it is
        silent, so the outer bar is the one shown; a task left open by a failed loop is closed."""
        if any(o for t, o in self._open if not t.closed):
            return Task(None, label, total, unit)
        for t, _ in list(self._open):
            t.close()
        t = Task(self, label, total, unit)
        if total <= 0:
            t.close()
        else:
            self._open.append((t, outer))
        return t

    def close(self) -> None:
        """Close every open task (end of a command)."""
        for t, _ in list(self._open):
            t.close()

    def _closed(self, task: Task) -> None:
        self._open = [(t, o) for t, o in self._open if t is not task]


_reporter: Reporter | None = None


def set_reporter(reporter: Reporter | None) -> Reporter | None:
    """Install the process's reporter (None: silent); returns the previous one."""
    global _reporter
    previous, _reporter = _reporter, reporter
    return previous


def reporter() -> Reporter | None:
    """The process's reporter, if the command line installed one."""
    return _reporter


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Install `reporter` for the duration of a command; close its tasks and restore the previous one after."""
    previous = set_reporter(reporter)
    try:
        yield reporter
    finally:
        reporter.close()
        set_reporter(previous)


def task(label: str, total: int, unit: str = "items", outer: bool = False) -> Task:
    """A task on the process's reporter; silent when none is installed."""
    return _reporter.task(label, total, unit, outer) if _reporter is not None else Task(None, label, total, unit)
