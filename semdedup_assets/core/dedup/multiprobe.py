"""Multi-probe SemDeDup (`--probes P`): compare each item also with the members of its P-1 next-nearest clusters.

k-means cuts groups of near-duplicates at cluster borders; the paper's rule never looks
across clusters. With P probes the rule becomes (P = 1 is exactly the paper's rule, and
`semantic_duplicates` then takes the unchanged single-cluster path):

- every item j has its own cluster c(j) (the nearest centroid, as assigned) and its probe
  set Q(j): c(j) plus the P - 1 other clusters whose centroids have the largest inner
  product with x_j (ties by cluster id);
- one *global* order of all items, the keep strategy's key without the cluster:
  `hard` = (sim_to_centroid ascending, id), `easy` = (sim_to_centroid descending, id),
  `random` = (seeded key, id), after the `--keep-by` columns when given; restricted to
  one cluster it is that cluster's order;
- M[j] = max cos(x_i, x_j) over the items i earlier than j in the global order whose own
  cluster c(i) is in Q(j); duplicate_of[j] is the earliest such i achieving it;
  M[j] = 0 and no duplicate_of when there is no such i;
- j is removed at eps iff M[j] > 1 - eps, as before.

The search is exact and tiled: per probed cluster, the queries that probe it are matched
against its members in `pairwise.max_over_earlier` tiles (only members earlier in the
global order count), and the best over the probed clusters is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa
import torch

from semdedup_assets.core.dedup.ordering import KeepByKey, cluster_order
from semdedup_assets.core.dedup.pairwise import max_over_earlier
from semdedup_assets.core.io.schemas import SEMANTIC_DUPLICATES_SCHEMA
from semdedup_assets.core.io.tables import unit_embeddings
from semdedup_assets.core.run.parallel import map_batches


def probe_clusters(x: np.ndarray, centroids: np.ndarray, own: np.ndarray, probes: int) -> np.ndarray:
    """(n, P) int64 probe clusters: the own cluster first, then the next-nearest centroids by inner product."""
    probes = min(int(probes), len(centroids))
    own = np.asarray(own, dtype=np.int64)
    if probes <= 1 or len(x) == 0:
        return own[:, None]
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, nearest = index.search(np.ascontiguousarray(x, dtype=np.float32), probes)
    out = np.empty((len(x), probes), dtype=np.int64)
    out[:, 0] = own
    for r in range(len(x)):  # the own cluster first, then the others in rank order
        others = [int(c) for c in nearest[r] if c != own[r] and c >= 0]
        out[r, 1:] = others[: probes - 1]
    return out


def global_rank(
    ids: Sequence[str] | np.ndarray | pa.Array,
    sims: np.ndarray,
    strategy: str,
    seed: int,
    keep_by: Sequence[KeepByKey] = (),
) -> np.ndarray:
    """Each item's position in the global order: `cluster_order` over all items (ids may be an Arrow array)."""
    order = cluster_order(ids, sims, strategy, seed, keep_by=keep_by)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def multiprobe_max_sim(
    vectors: np.ndarray,
    clusters: np.ndarray,
    rank: np.ndarray,
    queries: np.ndarray,
    probes: np.ndarray,
    block_size: int = 1024,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M and duplicate_of (an index into the pool, -1 for none) for the query rows of a pool.

    The pool (`vectors`, own `clusters`, global `rank`) must hold every member of every
    probed cluster; `queries` are pool indices and `probes` their (n, P) probe clusters.
    """
    n = len(queries)
    best = np.full(n, -np.inf, dtype=np.float32)
    best_idx = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.float64), best_idx
    # The pool sorted once by (cluster, global rank): each cluster's members are one contiguous slice.
    perm = np.lexsort((rank, clusters))
    sorted_clusters, sorted_rank = clusters[perm], rank[perm]
    at = np.empty(len(perm), dtype=np.int64)
    at[perm] = np.arange(len(perm))
    sets = _probe_sets(probes, clusters[queries], rank[queries], int(block_size))
    # What each set needs besides its tiles, for all sets at once, so that the loop below runs
    # the GEMMs back to back: between two small GEMMs torch's pool threads go to sleep, and
    # waking them on a shared CPU costs more than a small tile's maths.
    probed = np.array([c for c, _ in sets], dtype=np.int64)
    lengths = np.array([len(rows) for _, rows in sets], dtype=np.int64)
    rows_all = np.concatenate([rows for _, rows in sets])
    set_of = np.repeat(np.arange(len(sets)), lengths)
    starts, ends = np.searchsorted(sorted_clusters, probed), np.searchsorted(sorted_clusters, probed + 1)
    # How many members of its probed cluster precede each query in the global order (`max_over_earlier`
    # counts those only): a search on the (cluster, rank) key, rank < pool size, minus the cluster's start.
    key = sorted_clusters * len(perm) + sorted_rank
    pos_all = np.searchsorted(key, probed[set_of] * len(perm) + rank[queries[rows_all]]) - starts[set_of]
    pool_q = at[queries[rows_all]]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    done, vals, args = [], [], []
    xs = torch.from_numpy(np.array(np.asarray(vectors)[perm], dtype=np.float32, order="C")).to(device or "cpu")
    dev = xs.device

    def probe_set(s: int) -> tuple[np.ndarray, np.ndarray]:
        o0, o1, start, end = offsets[s], offsets[s + 1], starts[s], ends[s]
        val, arg, _ = max_over_earlier(
            xs[torch.from_numpy(pool_q[o0:o1]).to(dev)],
            torch.from_numpy(pos_all[o0:o1]).to(dev),
            xs[start:end],
            int(block_size),
        )
        return val.cpu().numpy(), arg.cpu().numpy()

    # Each set's tiles with one intra-op thread (parallel.map_batches, workers=1), so the bits do not depend on
    # torch's thread count (a 1-CPU Ray task and a 2-core process disagreed on small-M GEMMs). One set at a
    # time: most sets are a few rows against one cluster, and two Python threads over them were slower than
    # one (at 200k, P = 2, 16 buckets: 30-39 s against 25-27 s; the old 2-thread GEMMs took 21-24 s).
    live = [s for s in range(len(sets)) if ends[s] > starts[s] and pos_all[offsets[s] : offsets[s + 1]].any()]
    for s, (val, arg) in zip(live, map_batches(probe_set, live, dev, workers=1), strict=True):
        done.append(s)
        vals.append(val)
        args.append(arg)
    if done:
        picked = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in done])
        val, arg = np.concatenate(vals), np.concatenate(args)
        found = arg >= 0
        row = rows_all[picked][found]
        val, cand = val[found], perm[starts[set_of[picked]][found] + arg[found]]
        # Across clusters, the larger cosine wins; on an exact tie the earlier item in the global order
        # (candidates of different clusters are different items: their ranks differ, the winner is unique).
        order = np.lexsort((rank[cand], -val, row))
        first = order[np.concatenate([[True], row[order][1:] != row[order][:-1]])] if len(row) else order
        best[row[first]], best_idx[row[first]] = val[first], cand[first]
    none = best_idx < 0
    max_sim = np.where(none, 0.0, best.astype(np.float64))
    return max_sim, best_idx


def _probe_sets(probes: np.ndarray, own: np.ndarray, rank: np.ndarray, block: int) -> list[tuple[int, np.ndarray]]:
    """(probed cluster c, up to `block` queries of one own cluster that probe c, in global order), by (c, own cluster).

    Per own cluster, not per bucket: the query sets then do not depend on which other
    clusters share the bucket or the memory group, so neither do the tiles' shapes (a
    float32 GEMM's last bit can depend on them); `block` rows at a time, so a score tile
    holds at most block x block values however large the cluster.
    """
    n, width = probes.shape
    query = np.repeat(np.arange(n), width)
    probed, owner = probes.ravel(), np.repeat(own, width)
    order = np.lexsort((rank[query], owner, probed))
    probed, owner, query = probed[order], owner[order], query[order]
    cuts = np.flatnonzero((np.diff(probed) != 0) | (np.diff(owner) != 0)) + 1
    starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(order)]])
    return [(int(probed[s]), query[b : min(b + block, e)]) for s, e in zip(starts, ends) for b in range(s, e, block)]


def dense_multiprobe(
    vectors: np.ndarray, rank: np.ndarray, clusters: np.ndarray, probes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The same rule from the full n x n float64 matrix, for every item (test oracle)."""
    x = np.asarray(vectors, dtype=np.float64)
    sim = x @ x.T
    allowed = (rank[None, :] < rank[:, None]) & (clusters[None, :, None] == probes[:, None, :]).any(axis=2)
    masked = np.where(allowed, sim, -np.inf)
    # argmax over candidates in global order, so the earliest wins ties
    order = np.argsort(rank)
    arg_sorted = np.argmax(masked[:, order], axis=1)
    dup = order[arg_sorted]
    m = masked[np.arange(len(x)), dup]
    none = ~allowed.any(axis=1)
    return np.where(none, 0.0, m), np.where(none, -1, dup)


def multiprobe_bucket(
    table: pa.Table,
    read_clusters: Callable[[list[int]], pa.Table],
    centroids: np.ndarray,
    probes: int,
    strategy: str,
    seed: int,
    block_size: int = 1024,
    device: str | torch.device | None = None,
    keep_by: Sequence[tuple[str, bool]] = (),
    probe: np.ndarray | None = None,
) -> tuple[pa.Table, list[int]]:
    """The multi-probe rule for the items of one bucket (`table`, assignment rows sorted by cluster, id).

    `read_clusters(ids)` returns the assignment rows of other clusters that the bucket's
    items probe; `probe`, if given, their (n, P) probe clusters (else computed here). The
    result has the layout of the single-cluster path: rows grouped by cluster in cluster
    order, `rank` the position in the own cluster's order. The rows of any set of whole
    clusters give the same result rows as the bucket's (a query's M depends only on the
    members of its probe set), so a bucket can be done a few clusters at a time.
    """
    if table.num_rows == 0:
        return SEMANTIC_DUPLICATES_SCHEMA.empty_table(), []
    own = table.column("cluster").to_numpy().astype(np.int64)
    bucket_x = unit_embeddings(table)
    probe = probe_clusters(bucket_x, centroids, own, probes) if probe is None else probe
    extra = sorted(set(np.unique(probe).tolist()) - set(np.unique(own).tolist()))
    others = read_clusters(extra) if extra else table.schema.empty_table()
    pool = pa.concat_tables([table, others.select(table.column_names)]) if extra else table
    ids = pool.column("id").combine_chunks().cast(pa.string())  # Arrow, not Python strings: the pool can be large
    clusters = pool.column("cluster").to_numpy().astype(np.int64)
    sims = pool.column("sim_to_centroid").to_numpy()
    vectors = np.concatenate([bucket_x, unit_embeddings(others)]) if extra else bucket_x
    rank = global_rank(
        ids, sims, strategy, seed, [(pool.column(name).combine_chunks(), desc) for name, desc in keep_by]
    )
    queries = np.arange(table.num_rows)
    max_sim, dup = multiprobe_max_sim(vectors, clusters, rank, queries, probe, block_size, device)
    # Output rows: by cluster, then the cluster's own order (the global order restricted to it).
    order = np.lexsort((rank[queries], own))
    bounds = np.flatnonzero(np.diff(own[order])) + 1
    starts = np.concatenate([[0], bounds])
    ranks = np.arange(len(order)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(order)]])))
    result = pa.table(
        {
            "id": ids.take(pa.array(order)),
            "shard": table.column("shard").take(pa.array(order)),
            "cluster": pa.array(own[order].astype(np.int32)),
            "rank": pa.array(ranks.astype(np.int64)),
            "sim_to_centroid": pa.array(sims[order].astype(np.float64)),
            "max_sim": pa.array(max_sim[order].astype(np.float64)),
            "duplicate_of": ids.take(pa.array(dup[order], mask=dup[order] < 0)),
        },
        schema=SEMANTIC_DUPLICATES_SCHEMA,
    )
    sizes = np.diff(np.concatenate([starts, [len(order)]])).tolist()
    return result, [int(s) for s in sizes]
