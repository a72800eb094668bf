"""Batches of torch work on Python threads, each single-threaded: the same bits whatever the thread count.

Plain Python (no Dagster): encoders and the pairwise rule call it in the run's process and
in Ray workers alike.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch is imported on first use
    import torch

__all__ = ["map_batches", "worker_count"]

B = TypeVar("B")
R = TypeVar("R")

# One pool per worker count, kept for the process's life: a stage calls map_batches once per
# cluster group (thousands of times per bucket), and each new thread costs a start and, in
# GEMM libraries that keep per-thread scratch buffers (MKL), memory that a pool of long-lived
# threads pays once. Keyed by pid too: a forked child inherits the dict but not the threads.
_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_IN_BATCH = threading.local()  # set on a pool thread while it runs a batch: nested calls run inline


def _pool(workers: int) -> ThreadPoolExecutor:
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            for stale in [k for k in _POOLS if k[0] != key[0]]:
                del _POOLS[stale]  # a parent's pool: its threads do not exist in this process
            pool = _POOLS[key] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semdedup-batch")
        return pool


def worker_count(device: torch.device | str = "cpu") -> int:
    """How many batches map_batches runs at once on `device` by default (1 on CUDA or inside a batch)."""
    import torch

    if str(device).split(":")[0] != "cpu" or getattr(_IN_BATCH, "active", False):
        return 1
    return max(1, torch.get_num_threads())


def map_batches(
    forward: Callable[[B], R], batches: Iterable[B], device: torch.device, workers: int | None = None
) -> Iterator[R]:
    """Yield `forward(batch)` for each batch, in order, under `torch.inference_mode()`.

    On the CPU every call runs with torch's intra-op thread count at 1, and up to `workers`
    calls run at once on Python threads (torch releases the GIL inside its kernels);
    `workers` defaults to the thread count the process had (a Ray actor or task sets it to
    its CPU share). So a batch's floats never depend on how many threads there are: GEMM
    libraries may change a product's summation order with their thread count (MKL does on
    some Intel CPUs), which made a 1-CPU Ray actor's embeddings differ in the last bits from
    a 2-core process's. The thread count is restored afterwards. A call made inside another
    map_batches' batch runs its batches inline (no nested pools). On CUDA the calls run one
    after another on the calling thread. At most 2 x workers batches are pulled ahead; the
    threads are long-lived and shared by every call with the same worker count.
    """
    import torch

    def call(batch: B) -> R:
        with torch.inference_mode():  # thread-local: entered on the thread that runs the batch
            return forward(batch)

    def pooled(batch: B) -> R:
        _IN_BATCH.active = True
        try:
            return call(batch)
        finally:
            _IN_BATCH.active = False

    if device.type != "cpu":
        for batch in batches:
            yield call(batch)
        return
    previous = torch.get_num_threads()
    nested = getattr(_IN_BATCH, "active", False)
    workers = 1 if nested else max(1, previous if workers is None else int(workers))
    if previous != 1:  # already 1 inside another map_batches' batch: not set again from a worker thread
        torch.set_num_threads(1)
    try:
        if workers == 1:
            for batch in batches:
                yield call(batch)
            return
        pool = _pool(workers)
        pending: deque[Future[R]] = deque()
        try:
            for batch in batches:
                pending.append(pool.submit(pooled, batch))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an abandoned generator: queued batches are not run, running ones are awaited
            running = [future for future in pending if not future.cancel()]
            wait(running)
    finally:
        if previous != 1:
            torch.set_num_threads(previous)
