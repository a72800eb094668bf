"""The kernels of the `outliers` and `representatives` selections, on one cluster's unit embeddings.

Plain NumPy on one cluster at a time (the callers in core/select/prune.py stream the clusters
bucket by bucket), so each function's memory is that cluster's rows plus one tile:

- `knn_typicality`: how typical each member is of its cluster, the mean cosine similarity to
  its `neighbours` nearest other members (fewer in a smaller cluster; docs/pruning.md).
  Work m^2 * d per cluster of m members, the pairwise rule's own cost; memory one tile of
  at most TILE_ELEMENTS similarities (two float32 copies of 16 MiB), whatever m.
- `mmr_select`: Maximal Marginal Relevance within a cluster, relevance = similarity to the
  centroid, diversity = lambda. Work q * m * d for a quota of q; memory O(m).
- `proportional_quotas`: per-cluster quotas proportional to cluster size, exactly N in all
  (largest remainders in exact integer arithmetic, ties by cluster).
"""

from __future__ import annotations

import numpy as np

TYPICALITY_BLOCK = 1024  # rows per similarity tile, at most
TILE_ELEMENTS = 1 << 22  # similarities per tile (float32: 16 MiB), so a huge cluster takes fewer rows per tile


def knn_typicality(x: np.ndarray, neighbours: int, block: int | None = None) -> np.ndarray:
    """Each row's mean cosine similarity to its `neighbours` nearest other rows (float64).

    `x` holds one cluster's unit rows in a fixed order (by id). In a cluster of m <= neighbours
    members the mean is over the m - 1 others: how many members k-means put in a cluster is
    partly an artefact of k, and a tight small cluster (a blob k-means split) is typical of
    itself. A lone member has no neighbour and scores 0 (as if orthogonal to everything): it
    goes first. The top values are summed in ascending order in float64; with the rows in a
    fixed order and a fixed tile, the result is the same bytes run to run. `block`: rows per
    tile (default: TYPICALITY_BLOCK, fewer when m is so large that the tile would pass
    TILE_ELEMENTS; it depends on m only, so the same cluster always gets the same tiles).
    """
    m = len(x)
    k = int(neighbours)
    if k < 1:
        raise ValueError(f"neighbours must be >= 1, got {neighbours}")
    out = np.zeros(m, dtype=np.float64)
    take = min(k, m - 1)
    if take <= 0:
        return out
    rows = np.ascontiguousarray(x, dtype=np.float32)
    if block is None:
        block = max(1, min(TYPICALITY_BLOCK, TILE_ELEMENTS // m))
    for start in range(0, m, block):
        stop = min(m, start + block)
        # One row at a time against the whole cluster would be slow; a tile keeps BLAS busy and
        # memory at block * m floats.
        g = rows[start:stop] @ rows.T  # float32: the float64 copy is made of the top `take` columns only
        g[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # never itself
        top = np.sort(np.partition(g, m - take, axis=1)[:, m - take :].astype(np.float64), axis=1)
        out[start:stop] = top.sum(axis=1) / take
    return out


def mmr_select(x: np.ndarray, relevance: np.ndarray, quota: int, diversity: float) -> np.ndarray:
    """The indices (in pick order) of `quota` rows chosen by Maximal Marginal Relevance.

    Each step picks the row maximising (1 - diversity) * relevance - diversity * (its largest
    cosine similarity to the rows picked so far); the first pick is the most relevant row.
    Ties go to the lowest index (the rows come in id order). diversity 0 is the `quota` most
    relevant rows; diversity 1 is farthest-point traversal from the most relevant row.
    """
    m = len(x)
    q = min(int(quota), m)
    if q <= 0:
        return np.empty(0, dtype=np.int64)
    rel = np.asarray(relevance, dtype=np.float64)
    lam = float(diversity)
    rows = np.ascontiguousarray(x, dtype=np.float32)
    closest = np.full(m, -np.inf)  # largest similarity to a picked row (-inf: none picked yet)
    picked = np.zeros(m, dtype=bool)
    order = np.empty(q, dtype=np.int64)
    score = rel.copy()
    for step in range(q):
        score[picked] = -np.inf
        i = int(np.argmax(score))  # first maximum: the lowest index among ties
        order[step] = i
        picked[i] = True
        np.maximum(closest, (rows @ rows[i]).astype(np.float64), out=closest)
        score = (1.0 - lam) * rel - lam * closest
    return order


def proportional_quotas(total: int, sizes: np.ndarray) -> np.ndarray:
    """Whole quotas q_j proportional to `sizes` with sum q_j = total and q_j <= sizes_j (Hamilton's method).

    q_j = floor(total * s_j / n), then one more for the largest remainders (total * s_j mod n),
    ties by the lower index; all in integers, so no float rounding decides a quota.
    """
    s = np.asarray(sizes, dtype=np.int64)
    n = int(s.sum())
    if total > n:
        raise ValueError(f"cannot take {total} of {n} items")
    if n == 0:
        return np.zeros(len(s), dtype=np.int64)
    scaled = [int(total) * int(v) for v in s.tolist()]  # Python ints: no overflow at any scale
    quotas = np.array([v // n for v in scaled], dtype=np.int64)
    remainder = np.array([v % n for v in scaled], dtype=np.int64)
    left = int(total) - int(quotas.sum())
    order = np.lexsort((np.arange(len(s)), -remainder))
    quotas[order[:left]] += 1
    return quotas
