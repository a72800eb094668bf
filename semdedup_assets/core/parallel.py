"""Batches of torch work on Python threads, each single-threaded: the same bits whatever the thread count.

Plain Python (no Dagster): encoders and the pairwise rule call it in the run's process and
in Ray workers alike.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # torch is imported on first use
    import torch

__all__ = ["map_batches"]

B = TypeVar("B")
R = TypeVar("R")


def map_batches(forward: Callable[[B], R], batches: Iterable[B], device: torch.device,
                workers: int | None = None) -> Iterator[R]:
    """Yield `forward(batch)` for each batch, in order, under `torch.inference_mode()`.

    On the CPU every call runs with torch's intra-op thread count at 1, and up to `workers`
    calls run at once on Python threads (torch releases the GIL inside its kernels);
    `workers` defaults to the thread count the process had (a Ray actor or task sets it to
    its CPU share). So a batch's floats never depend on how many threads there are: GEMM
    libraries may change a product's summation order with their thread count (MKL does on
    some Intel CPUs), which made a 1-CPU Ray actor's embeddings differ in the last bits from
    a 2-core process's. The thread count is restored afterwards. A call made inside another
    map_batches' batch finds one thread and runs its batches inline (no nested pools). On
    CUDA the calls run one after another on the calling thread. At most 2 x workers batches
    are pulled ahead.
    """
    import torch

    def call(batch: B) -> R:
        with torch.inference_mode():  # thread-local: entered on the thread that runs the batch
            return forward(batch)

    if device.type != "cpu":
        for batch in batches:
            yield call(batch)
        return
    previous = torch.get_num_threads()
    workers = max(1, previous if workers is None else int(workers))
    if previous != 1:  # already 1 inside another map_batches' batch: not set again from a worker thread
        torch.set_num_threads(1)
    try:
        if workers == 1:
            for batch in batches:
                yield call(batch)
            return
        pending: deque[Future[R]] = deque()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semdedup-batch") as pool:
            try:
                for batch in batches:
                    pending.append(pool.submit(call, batch))
                    if len(pending) >= 2 * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # an error or an abandoned generator: queued batches are not run
                for future in pending:
                    future.cancel()
    finally:
        if previous != 1:
            torch.set_num_threads(previous)
