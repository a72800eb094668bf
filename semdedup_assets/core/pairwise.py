"""The SemDeDup pairwise rule: M[j] = max_{i<j} cos(x_i, x_j) inside one ordered cluster.

`max_sim_tiled` is the production path: it walks the lower triangle of the similarity
matrix in block x block tiles, so memory is O(n*d + block^2) instead of the n x n matrix
that the reference code builds, and (unlike the reference's chunked variant) it still
compares every pair i < j. `dense_max_sim` and `rule_from_similarity` are the simple
dense versions, kept as test oracles and benchmark baselines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from semdedup_assets.core.ordering import cluster_order

ArrayLike2D = np.ndarray | torch.Tensor


def _empty_result() -> tuple[np.ndarray, np.ndarray]:
    """Return the (max_sim, duplicate_of) pair for an empty cluster."""
    return np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int64)


def _as_tensor(embeddings: ArrayLike2D, device: str | torch.device | None) -> torch.Tensor:
    """Return a 2-d float32 tensor on the target device, copying only when needed."""
    if isinstance(embeddings, torch.Tensor):
        x = embeddings.detach()
    else:
        # from_numpy shares memory with a C-contiguous float32 array: no extra n*d copy.
        x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    if x.dim() != 2:
        raise ValueError(f"embeddings must be 2-d (n, d), got shape {tuple(x.shape)}")
    target = torch.device(device) if device is not None else x.device
    # fp32 everywhere: fp16/bf16 would blur the 1 - eps thresholds (eps down to 1e-4).
    return x.to(device=target, dtype=torch.float32).contiguous()


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to num_threads, then restore it.

    None leaves the count alone. On CPU every tile is a separate matmul whose threads
    join at its end; where other processes hold some of the cores, fewer threads than
    cores can be faster (bench/pairwise.py measures both in the same run).
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def max_sim_tiled(
    embeddings: ArrayLike2D,
    block_size: int = 1024,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (max_sim float32, duplicate_of int64) for ordered, L2-normalised rows, tiled.

    `num_threads` (CPU only) sets torch's thread count for this call only; None keeps it.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = int(embeddings.shape[0])
    if n == 0:
        return _empty_result()
    with torch.inference_mode(), torch_threads(num_threads):
        x = _as_tensor(embeddings, device)
        dev = x.device
        bsz = int(block_size)
        # Diagonal-tile mask, in (j, i) layout: True where i >= j (pairs that must not
        # count). Built once per call; every column block's diagonal tile shares it.
        rows = torch.arange(min(bsz, n), device=dev)
        diag_mask = rows[None, :] >= rows[:, None]
        max_sim = torch.empty(n, dtype=torch.float32, device=dev)
        dup = torch.empty(n, dtype=torch.int64, device=dev)
        for j0 in range(0, n, bsz):
            j1 = min(j0 + bsz, n)
            xj = x[j0:j1]
            best = torch.full((j1 - j0,), float("-inf"), dtype=torch.float32, device=dev)
            best_idx = torch.full((j1 - j0,), -1, dtype=torch.int64, device=dev)
            # Only row blocks up to and including the diagonal: the i < j lower triangle.
            # Row blocks go in ascending order and only a strictly greater value replaces
            # the running max, so the earliest i wins exact ties across blocks.
            for i0 in range(0, j1, bsz):
                i1 = min(i0 + bsz, j1)
                # (j, i) layout so the reduction runs along contiguous memory (several
                # times faster than a column-wise max on CPU); at most block^2 floats.
                tile = xj @ x[i0:i1].T
                if i0 == j0:
                    tile.masked_fill_(diag_mask[: j1 - j0, : i1 - i0], float("-inf"))
                # torch.max(dim) documents the first index on ties (within the tile).
                val, arg = tile.max(dim=1)
                better = val > best
                best = torch.where(better, val, best)
                best_idx = torch.where(better, arg + i0, best_idx)
            max_sim[j0:j1] = best
            dup[j0:j1] = best_idx
        # M[0] is defined as 0 (nothing precedes it); every j > 0 keeps its true max,
        # which may be negative.
        max_sim[0] = 0.0
        dup[0] = -1
        return max_sim.cpu().numpy(), dup.cpu().numpy()


def rule_from_similarity(sim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (max_sim float64, duplicate_of int64) from a precomputed n x n similarity matrix."""
    s = np.asarray(sim, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"sim must be a square matrix, got shape {s.shape}")
    n = s.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.float64), np.empty(0, dtype=np.int64)
    # Column j may only look at rows i < j: blank out the diagonal and below.
    masked = np.where(np.triu(np.ones((n, n), dtype=bool), k=1), s, -np.inf)
    dup = np.argmax(masked, axis=0).astype(np.int64)  # first occurrence on ties
    max_sim = masked[dup, np.arange(n)]
    max_sim[0] = 0.0
    dup[0] = -1
    return max_sim, dup


def dense_max_sim(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (max_sim float32, duplicate_of int64) via the full n x n float64 matrix (oracle)."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-d (n, d), got shape {x.shape}")
    if x.shape[0] == 0:
        return _empty_result()
    max_sim, dup = rule_from_similarity(x @ x.T)
    return max_sim.astype(np.float32), dup


def cluster_semantic_duplicates(
    ids: Sequence[str] | np.ndarray,
    embeddings: ArrayLike2D,
    sim_to_centroid: np.ndarray,
    strategy: str = "hard",
    seed: int = 0,
    block_size: int = 1024,
    device: str | torch.device | None = None,
) -> dict[str, np.ndarray]:
    """Order one cluster, run the tiled rule, and return arrays in processing order."""
    n = len(ids)
    if int(embeddings.shape[0]) != n:
        raise ValueError(f"ids has {n} entries but embeddings has {embeddings.shape[0]} rows")
    order = cluster_order(ids, sim_to_centroid, strategy, seed=seed)
    if isinstance(embeddings, torch.Tensor):
        ordered: ArrayLike2D = embeddings[torch.from_numpy(order).to(embeddings.device)]
    else:
        ordered = np.asarray(embeddings)[order]
    max_sim, dup_pos = max_sim_tiled(ordered, block_size=block_size, device=device)
    # Map positions in processing order back to indices into the caller's inputs.
    dup_input = np.where(dup_pos >= 0, order[np.maximum(dup_pos, 0)], -1).astype(np.int64)
    return {
        "order": order,
        "rank": np.arange(n, dtype=np.int64),
        "max_sim": max_sim.astype(np.float64),
        "duplicate_of": dup_input,
    }
