"""The SemDeDup pairwise rule: M[j] = max_{i<j} cos(x_i, x_j) inside one ordered cluster.

`max_sim_tiled` is the production path: it walks the lower triangle of the similarity
matrix in block x block tiles, so memory is O(n*d + block^2) instead of the n x n matrix
that the reference code builds, and (unlike the reference's chunked variant) it still
compares every pair i < j. With `precision="fp16"|"bf16"` the tiles run in that dtype
(GPU tensor cores) and every row within the rounding error bound of a threshold is
recomputed in fp32, so decisions at the configured eps equal fp32's.
`dense_max_sim` and `rule_from_similarity` are the simple dense versions, kept as test
oracles and benchmark baselines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from semdedup_assets.core.dedup.ordering import KeepByKey, cluster_order
from semdedup_assets.core.run.parallel import map_batches

ArrayLike2D = np.ndarray | torch.Tensor


class RowFile:
    """An (n, d) float32 matrix in a raw file (row-major), read one block of rows at a time.

    The pairwise rule over a cluster larger than the memory budget reads its tiles from
    here: only the block being compared is in memory, never the cluster's n x d rows.
    """

    def __init__(self, path: str, n: int, d: int, device: str | torch.device | None = None) -> None:
        """Rows of `path` (n * d float32 values); blocks come back as tensors on `device`."""
        self.path, self.n, self.d = str(path), int(n), int(d)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    @property
    def shape(self) -> tuple[int, int]:
        """(n, d), like an array's."""
        return self.n, self.d

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """Rows [start, stop) as a float32 tensor (a fresh read; step must be 1)."""
        start, stop, step = rows.indices(self.n)
        if step != 1:
            raise ValueError("a RowFile reads contiguous blocks of rows only")
        count = max(0, stop - start)
        block = np.fromfile(self.path, dtype=np.float32, count=count * self.d, offset=start * self.d * 4)
        return torch.from_numpy(block.reshape(count, self.d)).to(self.device)


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
    # An fp32 copy always: low-precision tiles are re-checked against it near every 1 - eps.
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


_LOW = {"fp16": (torch.float16, 11), "bf16": (torch.bfloat16, 8)}  # dtype, significand bits
# The tiles' precisions: the `precision` knob's values (a test holds them equal to Settings' Literal).
TILE_PRECISIONS: tuple[str, ...] = ("fp32", *_LOW)


def low_precision_error_bound(precision: str, dim: int, max_norm: float = 1.0, fp32_output: bool = False) -> float:
    """Largest |s_low - s_fp32| for one dot product of rows with norm <= max_norm.

    Rounding each input to `precision` moves it by at most u*|x| (u = 2^-p), so the exact
    product of the rounded rows is off by at most (2u + u^2)|x||y|. The fp32 accumulation
    of d terms adds at most gamma_d |x||y| (gamma_d = d u32 / (1 - d u32)) on each side
    (the low-precision GEMM and the fp32 one we compare against), and a low-precision
    output (CPU kernels) rounds once more by u |s|.
    """
    if precision not in _LOW:
        raise ValueError(f"precision must be one of {', '.join(_LOW)}, got {precision!r}")
    u = 2.0 ** -_LOW[precision][1]
    u32 = 2.0**-24
    gamma = dim * u32 / (1.0 - dim * u32)
    n2 = float(max_norm) ** 2
    bound = (2 * u + u * u) * n2 + gamma * n2 * (1 + u) ** 2 + gamma * n2
    if not fp32_output:
        bound += u * (n2 + bound)
    return bound


def _matmul_fp32_out(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """a @ b with an fp32 result; True when the GEMM itself wrote fp32 (no output rounding)."""
    if a.dtype == torch.float32:
        return a @ b, True
    if a.is_cuda:
        try:  # fp16/bf16 inputs, fp32 accumulate and output (torch >= 2.8 on CUDA)
            return torch.mm(a, b, out_dtype=torch.float32), True
        except (TypeError, RuntimeError):
            pass
    return (a @ b).float(), False


def max_over_earlier(
    q: torch.Tensor, q_pos: torch.Tensor, x: torch.Tensor, bsz: int
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """For query rows q at ascending positions q_pos: max and first argmax of q . x[i] over i < q_pos.

    Returns (best, best_idx, fp32_output). Tiles are in (query, i) layout so the reduction
    runs along contiguous memory (several times faster than a column-wise max on CPU); at
    most bsz x bsz floats live at once.
    """
    dev = q.device
    best = torch.full((len(q),), float("-inf"), dtype=torch.float32, device=dev)
    best_idx = torch.full((len(q),), -1, dtype=torch.int64, device=dev)
    fp32_out = True
    if len(q) == 0:
        return best, best_idx, fp32_out
    first, last = int(q_pos[0]), int(q_pos[-1])
    # On the CPU the mask, max and running update run in numpy (one thread, in place): torch
    # hands each of those small ops to its thread pool, which costs up to milliseconds per op
    # when the cores are shared, and multi-probe runs thousands of small tiles. Only the
    # epilogue moves; the GEMM call and its operands are unchanged, so are its bits.
    host = dev.type == "cpu"
    if host:
        best_np, best_idx_np, pos_np = best.numpy(), best_idx.numpy(), q_pos.cpu().numpy()
    # Row blocks in ascending order, and only a strictly greater value replaces the running
    # max, so the earliest i wins exact ties across blocks; torch.max(dim) documents the
    # first index on ties within a tile, as does numpy's argmax.
    for i0 in range(0, last, bsz):
        i1 = min(i0 + bsz, last)
        tile, exact_out = _matmul_fp32_out(q, x[i0:i1].T)
        fp32_out = fp32_out and exact_out
        if host:
            _update_best_host(tile.numpy(), pos_np, i0, i1 > first, best_np, best_idx_np)
            continue
        if i1 > first:  # the tile reaches the diagonal: pairs with i >= j must not count
            cols = torch.arange(i0, i1, device=dev)
            tile.masked_fill_(cols[None, :] >= q_pos[:, None], float("-inf"))
        val, arg = tile.max(dim=1)
        better = val > best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, arg + i0, best_idx)
    return best, best_idx, fp32_out


def _update_best_host(
    tile: np.ndarray, pos: np.ndarray, i0: int, diagonal: bool, best: np.ndarray, best_idx: np.ndarray
) -> None:
    """One tile of `max_over_earlier` in numpy: mask i >= pos (if the tile reaches the diagonal), then a
    strictly greater max (the first argmax within the tile) replaces `best`/`best_idx` in place."""
    if diagonal:
        tile[np.arange(i0, i0 + tile.shape[1])[None, :] >= pos[:, None]] = -np.inf
    arg = tile.argmax(axis=1)
    val = tile[np.arange(len(tile)), arg]
    better = val > best
    best[better] = val[better]
    best_idx[better] = arg[better] + i0


def max_sim_tiled(
    embeddings: ArrayLike2D,
    block_size: int = 1024,
    device: str | torch.device | None = None,
    num_threads: int | None = None,
    precision: str = "fp32",
    thresholds: Sequence[float] = (),
    stats: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (max_sim float32, duplicate_of int64) for ordered, L2-normalised rows, tiled.

    `num_threads` (CPU only): how many query blocks run at once, each single-threaded (None:
    torch's thread count); the bits do not depend on it.

    `precision` "fp16"/"bf16" runs the tiles in that dtype (tensor cores on GPU) and then
    re-checks in fp32 every row whose approximate max lies within the error bound of one
    of `thresholds` (the configured 1 - eps values): those rows get the exact fp32 max and
    argmax, so every decision `max_sim > threshold` equals fp32's. Elsewhere max_sim is
    within the bound of fp32 and on the same side of every threshold. `stats`, if given,
    accumulates the number of re-checked rows and the largest bound used (over calls).
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if precision not in TILE_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(TILE_PRECISIONS)}, got {precision!r}")
    if precision != "fp32" and not thresholds:
        raise ValueError(f"precision {precision!r} needs the thresholds (1 - eps) whose decisions must equal fp32")
    n = int(embeddings.shape[0])
    if stats is not None:
        stats.setdefault("rechecked_rows", 0)
        stats.setdefault("error_bound", 0.0)
    if n == 0:
        return _empty_result()
    from_disk = isinstance(embeddings, RowFile)
    if from_disk and precision != "fp32":
        raise ValueError(f"precision {precision!r}: a cluster tiled from disk runs fp32 tiles only")
    x = embeddings if from_disk else _as_tensor(embeddings, device)
    dev = x.device
    bsz = int(block_size)
    with torch.inference_mode():
        low = x if precision == "fp32" else x.to(_LOW[precision][0])
        t = torch.tensor(sorted(float(v) for v in thresholds), dtype=torch.float32, device=dev)
        bound: float | None = None
        if precision != "fp32":  # before the blocks run: they share it, possibly on several threads
            norm = float(torch.linalg.vector_norm(x, dim=1).max())
            fp32_out = _matmul_fp32_out(low[:1], low[:1].T)[1]
            bound = low_precision_error_bound(precision, x.shape[1], norm, fp32_out)

    def query_block(j0: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Max and argmax over earlier rows for query rows [j0, j0 + bsz); the rows it re-checked in fp32."""
        j1 = min(j0 + bsz, n)
        pos = torch.arange(j0, j1, device=dev)
        best, best_idx, _ = max_over_earlier(low[j0:j1], pos, low, bsz)
        rechecked = 0
        if bound is not None:
            near = ((best[:, None] - t[None, :]).abs() <= bound).any(dim=1)
            rows = torch.nonzero(near).flatten()
            if len(rows):
                exact, exact_idx, _ = max_over_earlier(x[j0:j1][rows], pos[rows], x, bsz)
                best[rows], best_idx[rows] = exact, exact_idx
                rechecked = len(rows)
        return best, best_idx, rechecked

    max_sim = torch.empty(n, dtype=torch.float32, device=dev)
    dup = torch.empty(n, dtype=torch.int64, device=dev)
    rechecked = 0
    # On the CPU the query blocks run single-threaded, up to `num_threads` (default: torch's count) at once
    # (parallel.map_batches): a tile's GEMM then never depends on the thread count, so a 1-CPU Ray task and a
    # many-core process write the same bits. Inside dedup_table's per-cluster batches they run inline.
    starts = range(0, n, bsz)
    blocks = map_batches(query_block, starts, dev, workers=num_threads)
    for j0, (best, best_idx, count) in zip(starts, blocks, strict=True):
        j1 = min(j0 + bsz, n)
        max_sim[j0:j1] = best
        dup[j0:j1] = best_idx
        rechecked += count
    # M[0] is defined as 0 (nothing precedes it); every j > 0 keeps its true max,
    # which may be negative.
    max_sim[0] = 0.0
    dup[0] = -1
    if stats is not None:
        stats["rechecked_rows"] += rechecked
        stats["error_bound"] = max(stats["error_bound"], bound or 0.0)
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
    precision: str = "fp32",
    thresholds: Sequence[float] = (),
    stats: dict[str, float] | None = None,
    keep_by: Sequence[KeepByKey] = (),
) -> dict[str, np.ndarray]:
    """Order one cluster (`keep_by` columns first, see ordering.cluster_order), run the tiled rule,
    and return arrays in processing order."""
    n = len(ids)
    if int(embeddings.shape[0]) != n:
        raise ValueError(f"ids has {n} entries but embeddings has {embeddings.shape[0]} rows")
    order = cluster_order(ids, sim_to_centroid, strategy, seed=seed, keep_by=keep_by)
    if isinstance(embeddings, torch.Tensor):
        ordered: ArrayLike2D = embeddings[torch.from_numpy(order).to(embeddings.device)]
    else:
        ordered = np.asarray(embeddings)[order]
    max_sim, dup_pos = max_sim_tiled(
        ordered, block_size=block_size, device=device, precision=precision, thresholds=thresholds, stats=stats
    )
    # Map positions in processing order back to indices into the caller's inputs.
    dup_input = np.where(dup_pos >= 0, order[np.maximum(dup_pos, 0)], -1).astype(np.int64)
    return {
        "order": order,
        "rank": np.arange(n, dtype=np.int64),
        "max_sim": max_sim.astype(np.float64),
        "duplicate_of": dup_input,
    }
