"""parallel.map_batches: long-lived batch threads, nested calls inline, safe after a fork."""

from __future__ import annotations

import multiprocessing
import threading

import torch

from semdedup_assets.core.run.parallel import map_batches, worker_count

CPU = torch.device("cpu")


def _ident(_: int) -> int:
    return threading.get_ident()


def test_calls_reuse_the_same_threads() -> None:
    """Thousands of calls per bucket (one per cluster group) must not start thousands of threads: a thread's
    start, and the scratch buffers a GEMM library keeps per thread, are paid once per process."""
    seen: set[int] = set()
    before = threading.active_count()
    for _ in range(30):
        seen |= set(map_batches(_ident, range(6), CPU, workers=2))
    assert len(seen) <= 2 and threading.get_ident() not in seen, seen
    assert threading.active_count() <= before + 2


def test_a_call_inside_a_batch_runs_inline_on_that_thread() -> None:
    """A nested call asking for workers must not wait on the pool its own batch occupies (a deadlock)."""

    def outer(i: int) -> tuple[int, set[int], int]:
        inner = set(map_batches(_ident, range(8), CPU, workers=2))
        return threading.get_ident(), inner, worker_count(CPU)

    for ident, inner, nested_workers in map_batches(outer, range(4), CPU, workers=2):
        assert inner == {ident} and nested_workers == 1


def _in_child(queue: multiprocessing.Queue) -> None:
    queue.put(list(map_batches(lambda i: i * i, range(6), CPU, workers=2)))


def test_a_forked_child_gets_its_own_threads() -> None:
    """The parent's pool object is inherited by a fork, its threads are not: the child must not hang on it."""
    assert list(map_batches(lambda i: i, range(4), CPU, workers=2)) == [0, 1, 2, 3]  # the parent's pool exists
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(queue,))
    child.start()
    child.join(60)
    try:
        assert child.exitcode == 0, "the forked child hung or failed on the inherited pool"
        assert queue.get(timeout=5) == [0, 1, 4, 9, 16, 25]
    finally:
        if child.is_alive():
            child.kill()


def test_an_abandoned_call_waits_for_its_running_batches() -> None:
    """An error stops the call: queued batches are cancelled, running ones finish before it returns (none is left
    running with the thread count restored under it)."""
    import time

    done: list[int] = []

    def forward(i: int) -> int:
        if i == 1:
            raise ValueError("batch 1 is bad")
        time.sleep(0.05)
        done.append(i)
        return i

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        try:
            list(map_batches(forward, range(50), CPU))
        except ValueError:
            pass
        settled = list(done)
        time.sleep(0.3)
        assert done == settled and len(done) < 10, done
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
