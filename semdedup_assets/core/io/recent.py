"""Embedding matrices this process just wrote, held in memory for the later stages of the same run.

A run in one process (the library, `core.run.loop.run_units` on the local engine) embeds a shard,
writes `embeddings/<key>.parquet`, and a moment later reads the file back to draw the k-means
sample: at 50,000 x 384 the read-back cost about a tenth of the run (bench/results/library.md).
Inside `holding(limit)`, the embed stage hands each float32 matrix it writes to `remember`, and
`recall` gives it back instead of a read, as long as the file is still the one written (same size,
modification time and inode; anything else is read from the file as before). The values are the
stored ones exactly (a float32 file holds the float32 matrix), so nothing computed from them changes.

Memory bound: at most `limit` bytes of matrices (a matrix that would exceed it is not held; run_units
gives a quarter of the memory budget), and only inside `holding`: the Dagster assets, which run each
stage in its own step, never hold anything. Ray workers are other processes: they read the files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from semdedup_assets.core.io import storage as st

_lock = threading.Lock()
_limit = 0  # bytes; 0: not holding (outside `holding`)
_held: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}


@contextmanager
def holding(limit: int) -> Iterator[None]:
    """Hold up to `limit` bytes of just-written matrices for the block; all are dropped when it ends."""
    global _limit
    with _lock:
        previous, _limit = _limit, max(0, int(limit))
    try:
        yield
    finally:
        with _lock:
            _limit = previous
            if not _limit:
                _held.clear()


def _stamp(path: st.UPath) -> tuple[int, int, int] | None:
    """What identifies the file's current version (None: not a local file, or gone)."""
    if not st.is_local(path):
        return None
    try:
        info = os.stat(str(path))
    except OSError:
        return None
    return (info.st_size, info.st_mtime_ns, info.st_ino)


def accepting(nbytes: int) -> bool:
    """True when a matrix of `nbytes` would be held now (so a writer knows whether to keep its chunks)."""
    with _lock:
        return bool(_limit) and sum(m.nbytes for _, m in _held.values()) + nbytes <= _limit


def remember(path: st.UPath, matrix: np.ndarray) -> None:
    """Hold `matrix` as the float32 contents of the file just published at `path` (if it fits the limit)."""
    stamp = _stamp(path)
    if stamp is None or not accepting(matrix.nbytes):
        return
    with _lock:
        _held[str(path)] = (stamp, matrix)


def recall(path: st.UPath) -> np.ndarray | None:
    """The matrix held for `path`, if the file is still the one written; else None (read the file)."""
    with _lock:
        entry = _held.get(str(path))
    if entry is None:
        return None
    if _stamp(path) != entry[0]:
        with _lock:
            _held.pop(str(path), None)
        return None
    return entry[1]


__all__ = ["accepting", "holding", "recall", "remember"]
