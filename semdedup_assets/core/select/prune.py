"""Pruning to a target size with the stored embeddings and clusters: SSL prototypes, D4 and DBP.

Three selections beyond the paper's eps rule (docs/pruning.md):

- `prototypes:keep-fraction=F` (Sorscher et al. 2022): an item's difficulty is its cosine
  distance to its nearest centroid, 1 - sim_to_centroid; keep the N = ceil(F * items) items
  farthest from their centroid (the most prototypical go first), ties by id.
- `d4:eps=E,keep-fraction=F[,clusters=K]` (Tirumala et al. 2023): SemDeDup at eps E, then
  spherical k-means with K clusters on the survivors only, then SSL prototypes on the
  survivors with the new centroids, down to N items of the whole dataset.
- `dbp:eps=E,keep-fraction=F[,temperature=T,neighbours=L]` (Abbas, Rusak et al. 2024):
  SemDeDup at eps E; per cluster j (the run's clusters, survivors only) d_intra = mean
  cosine distance of its members to its centroid, d_inter = mean cosine distance of its
  centroid to its L nearest other centroids, complexity C = d_inter * d_intra; the budget N
  goes to clusters in proportion to softmax(C / T), capped by each cluster's size (the
  authors' quadratic program, solved exactly), and each cluster keeps its hardest members.
- `outliers:fraction=F[,neighbours=K]`: an item's typicality is its mean cosine similarity to
  its K nearest other members of its cluster (all of them in a smaller cluster); remove the
  ceil(F * items) least typical, ties by id.
- `representatives:size=N[,diversity=L]`: per-cluster quotas proportional to cluster size
  (largest remainders), each filled by Maximal Marginal Relevance (relevance = similarity to
  the centroid, diversity L), N items in all.

Every step reads the bucket results one bucket at a time (and D4 the assignments' stored
embeddings of one bucket at a time, plus a k-means sample of at most K *
max_points_per_centroid rows, and outliers and representatives one memory group of clusters,
`plan_bucket`, at a time); global cuts run in DuckDB. Sums that decide a budget are
exactly rounded (math.fsum), so results do not depend on file layout. Output under
`<storage>/pruned/<label>/`: `kept.parquet` (the kept items), `budget.parquet` (one row per
cluster), and for D4 and outliers per-bucket `scores/` (D4 also its new `centroids.parquet`).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_assets.core.checks.lineage import mismatch, read_made_from, results_fingerprint, write_made_from
from semdedup_assets.core.cluster.assign import assign, bucket_cluster_range, bucket_keys
from semdedup_assets.core.cluster.centroids import load_centroids
from semdedup_assets.core.cluster.kmeans import sample_rows, train_spherical_kmeans
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.buckets import cluster_counts, plan_bucket, read_bucket_rows
from semdedup_assets.core.dedup.ordering import ids_as_str
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import scan, sql_quote
from semdedup_assets.core.io.schemas import BUDGET_SCHEMA, KEPT_SCHEMA, TYPICALITY_SCHEMA
from semdedup_assets.core.io.schemas import PRUNE_SCORES_SCHEMA as SCORES_SCHEMA
from semdedup_assets.core.io.tables import embedding_array, unit_embeddings
from semdedup_assets.core.select.typical import knn_typicality, mmr_select, proportional_quotas

PRUNED = st.PRUNED
METHODS = ("prototypes", "d4", "dbp", "outliers", "representatives")
DEFAULT_TEMPERATURE = 0.5  # the authors' prune.py default (--temperature)
DEFAULT_NEIGHBOURS = 20  # the authors' compute_centroid_distances.py default (--num_NNs); outliers' K too
DEFAULT_DIVERSITY = 0.5  # representatives' lambda; SemHash's self_find_representative default
CENTROID_BLOCK = 512  # centroid rows per block of the d_inter dot products (bounded memory)
SCORE_ROWS = 65_536  # rows per row group of the outliers' score files


class PruneError(ValueError):
    """A pruning selection that cannot be parsed or computed; the message names the value or the file."""


@dataclass(frozen=True)
class Pruning:
    """One pruning selection with every parameter resolved (defaults filled in)."""

    method: str
    keep_fraction: float = 1.0  # prototypes, d4, dbp (outliers and representatives size by fraction, size)
    eps: float | None = None  # SemDeDup first (d4, dbp)
    clusters: int | None = None  # d4: k of the re-clustering (None: the run's k)
    temperature: float = DEFAULT_TEMPERATURE  # dbp
    neighbours: int = DEFAULT_NEIGHBOURS  # dbp; outliers: K of the typicality
    fraction: float | None = None  # outliers: the share removed
    size: int | None = None  # representatives: N
    diversity: float = DEFAULT_DIVERSITY  # representatives: MMR's lambda

    @property
    def label(self) -> str:
        """The canonical text, also the folder name under `pruned/` and `deduplicated/`."""
        if self.method == "outliers":
            return f"outliers:fraction={st.format_eps(float(self.fraction or 0.0))},neighbours={self.neighbours}"
        if self.method == "representatives":
            return f"representatives:size={self.size},diversity={st.format_eps(self.diversity)}"
        parts = [] if self.eps is None else [f"eps={st.format_eps(self.eps)}"]
        parts.append(f"keep-fraction={st.format_eps(self.keep_fraction)}")
        if self.method == "d4" and self.clusters is not None:
            parts.append(f"clusters={self.clusters}")
        if self.method == "dbp":
            parts += [f"temperature={st.format_eps(self.temperature)}", f"neighbours={self.neighbours}"]
        return f"{self.method}:{','.join(parts)}"


_ALLOWED = {
    "prototypes": ("keep-fraction",),
    "d4": ("eps", "keep-fraction", "clusters"),
    "dbp": ("eps", "keep-fraction", "temperature", "neighbours"),
    "outliers": ("fraction", "neighbours"),
    "representatives": ("size", "diversity"),
}
_REQUIRED = {
    "prototypes": ("keep-fraction",),
    "d4": ("eps", "keep-fraction"),
    "dbp": ("eps", "keep-fraction"),
    "outliers": ("fraction",),
    "representatives": ("size",),
}


def is_pruning(text: str) -> bool:
    """True when a selection names one of the pruning methods (`METHOD:...`)."""
    head, sep, _ = str(text).strip().partition(":")
    return bool(sep) and head.strip().lower() in METHODS


def parse_pruning(text: str, configured_eps: Sequence[float]) -> Pruning:
    """Parse `prototypes:keep-fraction=F`, `d4:eps=E,keep-fraction=F[,clusters=K]`,
    `dbp:eps=E,keep-fraction=F[,temperature=T,neighbours=L]` (E must be a configured eps),
    `outliers:fraction=F[,neighbours=K]` or `representatives:size=N[,diversity=L]`."""
    head, _, rest = str(text).strip().partition(":")
    method = head.strip().lower()
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {head.strip()!r}; methods: {', '.join(METHODS)}")
    values: dict[str, str] = {}
    for part in [p.strip() for p in rest.split(",") if p.strip()]:
        name, sep, raw = part.partition("=")
        name = name.strip().lower().replace("_", "-")
        if name == "neighbors":
            name = "neighbours"
        if not sep or name not in _ALLOWED[method]:
            raise PruneError(f"{text!r}: {method} takes {', '.join(_ALLOWED[method])}, got {part!r}")
        if name in values:
            raise PruneError(f"{text!r}: {name} is given twice")
        values[name] = raw.strip()
    missing = [r for r in _REQUIRED[method] if r not in values]
    if missing:
        raise PruneError(f"{text!r}: {method} needs {', '.join(f'{m}=...' for m in missing)}")

    def number(name: str, kind: type = float) -> float:
        try:
            value = kind(values[name])
        except ValueError:
            raise PruneError(
                f"{text!r}: {name}={values[name]!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not math.isfinite(value):
            raise PruneError(f"{text!r}: {name} must be finite")
        return value

    if method == "outliers":
        share = number("fraction")
        if not 0.0 < share < 1.0:
            raise PruneError(f"{text!r}: fraction must lie in (0, 1), got {values['fraction']}")
        k = int(number("neighbours", int)) if "neighbours" in values else DEFAULT_NEIGHBOURS
        if k < 1:
            raise PruneError(f"{text!r}: neighbours must be >= 1, got {k}")
        return Pruning(method, neighbours=k, fraction=share)
    if method == "representatives":
        size = int(number("size", int))
        if size < 1:
            raise PruneError(f"{text!r}: size must be >= 1, got {values['size']}")
        diversity = number("diversity") if "diversity" in values else DEFAULT_DIVERSITY
        if not 0.0 <= diversity <= 1.0:
            raise PruneError(f"{text!r}: diversity must lie in [0, 1], got {values['diversity']}")
        return Pruning(method, size=size, diversity=diversity)
    fraction = number("keep-fraction")
    if not 0.0 < fraction <= 1.0:
        raise PruneError(f"{text!r}: keep-fraction must lie in (0, 1], got {values['keep-fraction']}")
    eps = None
    if "eps" in values:
        eps = number("eps")
        configured = sorted(float(e) for e in configured_eps)
        if not any(eps == e for e in configured):
            raise PruneError(
                f"{text!r}: eps={values['eps']} is not configured; configured eps: "
                f"{', '.join(st.format_eps(e) for e in configured)}"
            )
    clusters = int(number("clusters", int)) if "clusters" in values else None
    if clusters is not None and clusters < 1:
        raise PruneError(f"{text!r}: clusters must be >= 1, got {clusters}")
    temperature = number("temperature") if "temperature" in values else DEFAULT_TEMPERATURE
    if temperature <= 0.0:
        raise PruneError(f"{text!r}: temperature must be > 0, got {values['temperature']}")
    neighbours = int(number("neighbours", int)) if "neighbours" in values else DEFAULT_NEIGHBOURS
    if neighbours < 1:
        raise PruneError(f"{text!r}: neighbours must be >= 1, got {neighbours}")
    return Pruning(method, fraction, eps, clusters, temperature, neighbours)


def parse_prune_list(text: str | None, configured_eps: Sequence[float]) -> list[Pruning]:
    """The `prune` knob: pruning selections separated by ';' (duplicates dropped, order kept)."""
    out: dict[str, Pruning] = {}
    for part in [p.strip() for p in str(text or "").split(";") if p.strip()]:
        p = parse_pruning(part, configured_eps)
        out.setdefault(p.label, p)
    return list(out.values())


def keep_count(fraction: float, total: int) -> int:
    """N = ceil(F * total), F taken as the exact decimal it was written as (as `keep-fraction=F`)."""
    return min(total, math.ceil(Fraction(repr(float(fraction))) * total))


def selection_dir(storage: st.Storage, pruning: Pruning) -> st.UPath:
    """`<storage>/pruned/<label>/`."""
    return storage.stage_dir(PRUNED) / pruning.label


def kept_file(storage: st.Storage, pruning: Pruning) -> st.UPath:
    """The kept items of a pruning selection."""
    return selection_dir(storage, pruning) / "kept.parquet"


# ---- the budget: DBP's per-cluster quotas ------------------------------------------------------


def softmax(values: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(values / T) in float64, max-shifted, normalised by an exactly rounded sum."""
    z = (np.asarray(values, dtype=np.float64) - np.max(values)) / float(temperature)
    w = np.exp(z)
    return w / math.fsum(w.tolist())


def qp_quotas(n: int, share: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """The real quotas x minimising sum (x_j - n * share_j)^2 with sum x = n and 0 <= x_j <= sizes_j.

    The authors solve this quadratic program with OSQP; its exact solution is
    x_j = clip(n * share_j + lam, 0, sizes_j) for the one lam that makes the sum n (what a small
    cluster cannot use goes to the others in equal parts). The sum is piecewise linear and
    nondecreasing in lam, so lam is found exactly between two breakpoints.
    """
    t = float(n) * np.asarray(share, dtype=np.float64)
    cap = np.asarray(sizes, dtype=np.float64)
    if n >= cap.sum():
        return cap.copy()
    points = np.unique(np.concatenate([-t, cap - t]))

    def total(lam: float) -> float:
        return math.fsum(np.clip(t + lam, 0.0, cap).tolist())

    sums = np.array([total(p) for p in points])
    i = int(np.searchsorted(sums, n))  # first breakpoint whose sum reaches n
    if sums[i] == n:
        lam = float(points[i])
    else:  # linear between points[i-1] and points[i]: the clusters free there move together
        lo = float(points[i - 1])
        free = (t + lo >= 0.0) & (t + lo < cap)
        lam = lo + (n - sums[i - 1]) / int(free.sum())
    return np.clip(t + lam, 0.0, cap)


def integer_quotas(n: int, real: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Whole quotas summing to n: floor(x_j), then one more for the largest remainders (ties by cluster)."""
    base = np.minimum(np.floor(real), sizes).astype(np.int64)
    left = int(n - base.sum())
    if left > 0:
        frac = real - base
        eligible = np.flatnonzero(base < sizes)
        order = eligible[np.lexsort((eligible, -frac[eligible]))]
        base[order[:left]] += 1
    return base


# ---- reading the bucket results ----------------------------------------------------------------


def bucket_files(storage: st.Storage, settings: Settings) -> list[st.UPath]:
    """The configured bucket results, in bucket order; missing ones are an error naming them."""
    files = [storage.bucket_file(b) for b in bucket_keys(settings.bucket_partitions)]
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise PruneError(f"{len(missing)} bucket result(s) missing (e.g. {missing[:3]}): run the pipeline first")
    return files


def _read_bucket(path: st.UPath) -> pa.Table:
    return st.read_table(path, columns=["id", "shard", "cluster", "sim_to_centroid", "max_sim"])


def _survivors(table: pa.Table, eps: float | None) -> pa.Table:
    """SemDeDup's keep rule at eps (max_sim <= 1 - eps, in float64), or every row."""
    if eps is None:
        return table
    return table.filter(pc.less_equal(table.column("max_sim"), pa.scalar(1.0 - float(eps), pa.float64())))


def _source(files: Sequence[st.UPath]) -> str:
    return f"read_parquet([{', '.join(sql_quote(str(p)) for p in files)}])"


def _prototype_cut(
    storage: st.Storage, files: Sequence[st.UPath], n: int, where: str = "true", params: Sequence[object] = ()
) -> tuple[float, str] | None:
    """The n-th item ranked by (sim_to_centroid, id) ascending: the last one kept (None: keep none)."""
    if n <= 0:
        return None
    [(sim, id_)] = scan(
        storage,
        f"SELECT sim_to_centroid, id FROM {_source(files)} WHERE {where} ORDER BY sim_to_centroid, id LIMIT 1 OFFSET ?",
        [*params, n - 1],
    )
    return float(sim), str(id_)


def _within_cut(table: pa.Table, cut: tuple[float, str] | None) -> pa.Table:
    """The rows ranked at or before the cut: sim < s, or sim == s and id <= the cut's id."""
    if cut is None:
        return table.slice(0, 0)
    sim, id_ = cut
    s = table.column("sim_to_centroid")
    mask = pc.or_(pc.less(s, sim), pc.and_(pc.equal(s, sim), pc.less_equal(table.column("id"), id_)))
    return table.filter(mask)


@dataclass
class PruneResult:
    """What computing one pruning selection did; plain values only."""

    label: str
    method: str
    items: int  # every item of the dataset
    survivors: int  # after SemDeDup at eps (prototypes: every item)
    target: int  # N = ceil(F * items); representatives: size; outliers: items - ceil(F * items), the kept
    kept: int
    budget: list[dict] = field(default_factory=list)  # one row per cluster (BUDGET_SCHEMA without selection)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0
    note: str = ""


def _kept_rows(label: str, table: pa.Table) -> pa.Table:
    """Rows of the kept file: the selection, then the item's id, shard, cluster and similarity."""
    return pa.table(
        {
            "selection": pa.array([label] * table.num_rows, pa.string()),
            "id": table.column("id"),
            "shard": table.column("shard"),
            "cluster": table.column("cluster").cast(pa.int32()),
            "sim_to_centroid": table.column("sim_to_centroid").cast(pa.float64()),
        },
        schema=KEPT_SCHEMA,
    )


def _budget_rows(counts: dict[int, list[int]], extra: dict[int, dict] | None = None) -> list[dict]:
    """Per-cluster rows {cluster, members, kept, d_intra, ...} in cluster order."""
    extra = extra or {}
    empty = {"d_intra": None, "d_inter": None, "complexity": None, "share": None, "target": None}
    return [
        {"cluster": int(c), "members": int(m), "kept": int(k), **{**empty, **extra.get(c, {})}}
        for c, (m, k) in sorted(counts.items())
    ]


def _count(counts: dict[int, list[int]], clusters: np.ndarray, slot: int) -> None:
    values, n = np.unique(clusters, return_counts=True)
    for c, k in zip(values.tolist(), n.tolist()):
        counts.setdefault(int(c), [0, 0])[slot] += int(k)


def _publish(
    storage: st.Storage, pruning: Pruning, write: Callable[[st.AtomicParquetWriter], list[dict]]
) -> tuple[list[str], list[dict]]:
    """Write kept.parquet (streamed by `write`, which returns the budget rows) and budget.parquet together."""
    folder = selection_dir(storage, pruning)
    kept = st.AtomicParquetWriter(folder / "kept.parquet", KEPT_SCHEMA)
    budget_writer = st.AtomicParquetWriter(folder / "budget.parquet", BUDGET_SCHEMA)
    with st.publish_together([kept, budget_writer]):
        budget = write(kept)
        budget_writer.write(
            pa.Table.from_pylist([{"selection": pruning.label, **row} for row in budget], schema=BUDGET_SCHEMA)
        )
    return [str(kept.path), str(budget_writer.path)], budget


def _publish_cut(
    storage: st.Storage,
    pruning: Pruning,
    files: Sequence[st.UPath],
    cut: tuple[float, str] | None,
    read: Callable[[st.UPath], pa.Table],
) -> tuple[list[str], list[dict]]:
    """SSL prototypes' keep rule over scored files (id, shard, cluster, sim_to_centroid): the rows at or before
    the global cut are kept, streamed file by file; the budget counts members and kept per cluster."""
    counts: dict[int, list[int]] = {}

    def write(writer: st.AtomicParquetWriter) -> list[dict]:
        for path in files:
            table = read(path)
            kept = _within_cut(table, cut)
            _count(counts, table.column("cluster").to_numpy(), 0)
            _count(counts, kept.column("cluster").to_numpy(), 1)
            writer.write(_kept_rows(pruning.label, kept))
        return _budget_rows(counts)

    return _publish(storage, pruning, write)


# ---- the three methods -------------------------------------------------------------------------


def _prototypes(storage: st.Storage, settings: Settings, pruning: Pruning, log: Callable[[str], None]) -> PruneResult:
    files = bucket_files(storage, settings)
    total = sum(st.parquet_num_rows(p) for p in files)
    n = keep_count(pruning.keep_fraction, total)
    log(f"{pruning.label}: keeping the {n} of {total} items farthest from their centroid")
    written, budget = _publish_cut(storage, pruning, files, _prototype_cut(storage, files, n), _read_bucket)
    return PruneResult(pruning.label, pruning.method, total, total, n, sum(r["kept"] for r in budget), budget, written)


def cluster_complexity(
    centroids: np.ndarray, members: np.ndarray, sim_sums: np.ndarray, neighbours: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DBP's (d_intra, d_inter, complexity) of clusters given their centroids, member counts and sum of sims.

    d_intra = 1 - mean sim_to_centroid (the mean cosine distance to the centroid);
    d_inter = 1 - mean of the L largest inner products with the *other* centroids (the mean
    cosine distance to the L nearest), L = min(neighbours, clusters - 1); a lone cluster has 0.
    """
    c = np.asarray(centroids, dtype=np.float64)
    k = len(c)
    d_intra = 1.0 - np.asarray(sim_sums, dtype=np.float64) / np.asarray(members, dtype=np.float64)
    d_inter = np.zeros(k, dtype=np.float64)
    nn = min(int(neighbours), k - 1)
    if nn > 0:
        for start in range(0, k, CENTROID_BLOCK):
            g = c[start : start + CENTROID_BLOCK] @ c.T
            g[np.arange(len(g)), np.arange(start, start + len(g))] = -np.inf  # never itself
            top = -np.partition(-g, nn - 1, axis=1)[:, :nn]
            d_inter[start : start + len(g)] = [1.0 - math.fsum(np.sort(row).tolist()) / nn for row in top]
    return d_intra, d_inter, d_inter * d_intra


def _dbp(storage: st.Storage, settings: Settings, pruning: Pruning, log: Callable[[str], None]) -> PruneResult:
    files = bucket_files(storage, settings)
    total = sum(st.parquet_num_rows(p) for p in files)
    n = keep_count(pruning.keep_fraction, total)
    # Pass 1: survivors per cluster and their similarities' exact sum (bucket by bucket).
    sizes: dict[int, int] = {}
    sums: dict[int, float] = {}
    for path in files:
        table = _survivors(_read_bucket(path), pruning.eps)
        clusters = table.column("cluster").to_numpy()
        sims = table.column("sim_to_centroid").to_numpy()
        order = np.argsort(clusters, kind="stable")
        values, starts = np.unique(clusters[order], return_index=True)
        for c, s, e in zip(values.tolist(), starts.tolist(), [*starts[1:].tolist(), len(order)]):
            sizes[int(c)] = sizes.get(int(c), 0) + (e - s)
            sums[int(c)] = math.fsum([sums.get(int(c), 0.0), math.fsum(sims[order[s:e]].tolist())])
    cl = np.array(sorted(sizes), dtype=np.int64)
    members = np.array([sizes[c] for c in cl.tolist()], dtype=np.int64)
    survivors = int(members.sum())
    centroids = load_centroids(storage)
    d_intra, d_inter, complexity = cluster_complexity(
        centroids[cl], members, np.array([sums[c] for c in cl.tolist()]), pruning.neighbours
    )
    share = softmax(complexity, pruning.temperature)
    quotas = integer_quotas(n, qp_quotas(n, share, members), members) if n < survivors else members.copy()
    quota_of = dict(zip(cl.tolist(), quotas.tolist()))
    log(
        f"{pruning.label}: {survivors} of {total} items survive eps; spreading {min(n, survivors)} over "
        f"{len(cl)} clusters by softmax(d_inter * d_intra / {st.format_eps(pruning.temperature)})"
    )
    extra = {
        int(c): {
            "d_intra": float(a),
            "d_inter": float(b),
            "complexity": float(x),
            "share": float(p),
            "target": float(n) * float(p),
        }
        for c, a, b, x, p in zip(cl.tolist(), d_intra, d_inter, complexity, share)
    }
    counts: dict[int, list[int]] = {int(c): [int(m), 0] for c, m in zip(cl.tolist(), members.tolist())}

    def write(writer: st.AtomicParquetWriter) -> list[dict]:
        # Pass 2: each cluster keeps its quota of hardest members (smallest sim_to_centroid, ties by id).
        for path in files:
            table = _survivors(_read_bucket(path), pruning.eps)
            if not table.num_rows:
                continue
            clusters = table.column("cluster").to_numpy()
            order = np.lexsort(
                (
                    ids_as_str(table.column("id").to_numpy(zero_copy_only=False)),
                    table.column("sim_to_centroid").to_numpy(),
                    clusters,
                )
            )
            sorted_clusters = clusters[order]
            values, starts = np.unique(sorted_clusters, return_index=True)
            take = np.concatenate([order[s : s + quota_of[int(c)]] for c, s in zip(values.tolist(), starts.tolist())])
            kept = table.take(pa.array(np.sort(take), pa.int64()))
            _count(counts, kept.column("cluster").to_numpy(), 1)
            writer.write(_kept_rows(pruning.label, kept))
        return _budget_rows(counts, extra)

    written, budget = _publish(storage, pruning, write)
    return PruneResult(
        pruning.label, pruning.method, total, survivors, n, sum(r["kept"] for r in budget), budget, written
    )


def _d4(storage: st.Storage, settings: Settings, pruning: Pruning, log: Callable[[str], None]) -> PruneResult:
    files = bucket_files(storage, settings)
    total = sum(st.parquet_num_rows(p) for p in files)
    n = keep_count(pruning.keep_fraction, total)
    run_k = len(load_centroids(storage))
    assignment_files = storage.stage_files(st.CLUSTER_ASSIGNMENTS)
    keys = bucket_keys(settings.bucket_partitions)
    folder = selection_dir(storage, pruning)

    def bucket_survivors(b: int, path: st.UPath) -> tuple[pa.Table, np.ndarray]:
        """The survivors of one bucket with their stored embeddings (unit rows), by (cluster, id)."""
        ids = _survivors(_read_bucket(path), pruning.eps).column("id")
        first, end = bucket_cluster_range(b, run_k, settings.bucket_partitions)
        rows = read_bucket_rows(assignment_files, first, end)
        if rows.num_rows == 0:
            return rows, np.empty((0, 0), dtype=np.float32)
        rows = rows.filter(pc.is_in(rows.column("id"), value_set=ids))
        return rows, unit_embeddings(rows)

    survivors = sum(_survivors(st.read_table(p, columns=["max_sim"]), pruning.eps).num_rows for p in files)
    k = min(pruning.clusters or run_k, survivors)
    # Pass 1: the k-means sample, a Bernoulli draw per bucket seeded by (seed, bucket), in id order.
    fraction = min(1.0, k * settings.max_points_per_centroid / max(survivors, 1))
    sample_ids: list[np.ndarray] = []
    sample_vectors: list[np.ndarray] = []
    for b, path in enumerate(files):
        rows, vectors = bucket_survivors(b, path)
        pick = sample_rows(rows.num_rows, fraction, settings.seed, f"d4:{keys[b]}")
        if len(pick):
            sample_ids.append(ids_as_str(rows.column("id").to_numpy(zero_copy_only=False))[pick])
            sample_vectors.append(vectors[pick])
    if not sample_vectors:
        raise PruneError(f"{pruning.label}: no item survives eps={st.format_eps(pruning.eps)}")
    ids = np.concatenate(sample_ids)
    by_id = np.argsort(ids, kind="stable")
    sample = np.concatenate(sample_vectors)[by_id]
    log(
        f"{pruning.label}: {survivors} of {total} items survive eps; re-clustering them with k={k} "
        f"on a sample of {len(sample)}"
    )
    km = train_spherical_kmeans(sample, k, settings.kmeans_iterations, settings.seed, settings.max_points_per_centroid)
    st.atomic_write_table(
        pa.table({"cluster": pa.array(np.arange(k, dtype=np.int32)), "centroid": embedding_array(km.centroids)}),
        folder / "centroids.parquet",
    )
    # Pass 2: every survivor's nearest new centroid and its similarity, one scores file per bucket.
    score_files = []
    for b, path in enumerate(files):
        rows, vectors = bucket_survivors(b, path)
        clusters, sims = assign(vectors, km.centroids) if rows.num_rows else (np.empty(0, np.int32), np.empty(0))
        scores = pa.table(
            {
                "id": rows.column("id") if rows.num_rows else pa.array([], pa.string()),
                "shard": rows.column("shard") if rows.num_rows else pa.array([], pa.string()),
                "cluster": pa.array(clusters, pa.int32()),
                "sim_to_centroid": pa.array(np.asarray(sims, dtype=np.float64)),
            },
            schema=SCORES_SCHEMA,
        )
        score_files.append(folder / "scores" / f"bucket-{keys[b]}.parquet")
        st.atomic_write_table(scores.sort_by([("cluster", "ascending"), ("id", "ascending")]), score_files[-1])
    cut = _prototype_cut(storage, score_files, min(n, survivors))
    written, budget = _publish_cut(storage, pruning, score_files, cut, st.read_table)
    return PruneResult(
        pruning.label,
        pruning.method,
        total,
        survivors,
        n,
        sum(r["kept"] for r in budget),
        budget,
        [str(folder / "centroids.parquet"), *map(str, score_files), *written],
        note=f"re-clustered {survivors} survivors into k={k} (objective {km.objective:.4g})",
    )


# ---- outliers and representatives: one cluster's embeddings at a time ----------------------------


def _cluster_slices(settings: Settings, k: int, b: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
    """The clusters of bucket b, one at a time: its rows (id order) and their unit embeddings.

    The rows are read in `plan_bucket`'s memory groups (consecutive clusters whose rows fit the
    pairwise memory budget; a larger cluster is a group of its own), so at most one group is
    in memory, and each cluster is sliced from it.
    """
    files = settings.storage_root().stage_files(st.CLUSTER_ASSIGNMENTS)
    first, end = bucket_cluster_range(b, k, settings.bucket_partitions)
    for a, z, _ in plan_bucket(settings, files, first, end):
        rows = read_bucket_rows(files, a, z)  # sorted by (cluster, id): no dependence on shard order
        clusters = rows.column("cluster").to_numpy()
        _, starts = np.unique(clusters, return_index=True)
        for s, e in zip(starts.tolist(), [*starts[1:].tolist(), len(clusters)]):
            part = rows.slice(s, e - s)
            yield part, unit_embeddings(part)


def _outliers(storage: st.Storage, settings: Settings, pruning: Pruning, log: Callable[[str], None]) -> PruneResult:
    files = bucket_files(storage, settings)
    total = sum(st.parquet_num_rows(p) for p in files)
    if not total:
        raise PruneError(f"{pruning.label}: the stored results hold no item")
    n = keep_count(float(pruning.fraction or 0.0), total)  # removed
    k = len(load_centroids(storage))
    folder = selection_dir(storage, pruning)
    log(
        f"{pruning.label}: removing the {n} of {total} items least typical of their cluster "
        f"(mean similarity to their {pruning.neighbours} nearest members)"
    )
    # Pass 1: every item's typicality, one scores file per bucket (cluster by cluster, id order).
    # Streamed cluster by cluster into row groups of SCORE_ROWS (not one per cluster: k may be large);
    # only the pending rows' id and shard columns are held, never a group's embeddings.
    score_files = []
    for b, key in enumerate(bucket_keys(settings.bucket_partitions)):
        score_files.append(folder / "scores" / f"bucket-{key}.parquet")
        scores = st.AtomicParquetWriter(score_files[-1], TYPICALITY_SCHEMA, row_group_rows=SCORE_ROWS)
        with st.publish_together([scores]) as [writer]:
            for rows, x in _cluster_slices(settings, k, b):
                writer.write(
                    pa.table(
                        {
                            "id": rows.column("id"),
                            "shard": rows.column("shard"),
                            "cluster": rows.column("cluster").cast(pa.int32()),
                            "sim_to_centroid": rows.column("sim_to_centroid").cast(pa.float64()),
                            "typicality": pa.array(knn_typicality(x, pruning.neighbours), pa.float64()),
                        },
                        schema=TYPICALITY_SCHEMA,
                    )
                )
    scored = sum(st.parquet_num_rows(p) for p in score_files)
    if scored != total:
        raise PruneError(
            f"{pruning.label}: the assignments hold {scored} items but the bucket results {total}: "
            "the stored results are out of step; run the pipeline again"
        )
    # The n-th least typical item, by (typicality, id): it and every item before it go.
    [(value, last)] = scan(
        storage,
        f"SELECT typicality, id FROM {_source(score_files)} ORDER BY typicality, id LIMIT 1 OFFSET ?",
        [n - 1],
    )
    counts: dict[int, list[int]] = {}

    def write(writer: st.AtomicParquetWriter) -> list[dict]:
        for path in score_files:
            table = st.read_table(path)
            t = table.column("typicality")
            after = pc.or_(
                pc.greater(t, float(value)),
                pc.and_(pc.equal(t, float(value)), pc.greater(table.column("id"), str(last))),
            )
            kept = table.filter(after)
            _count(counts, table.column("cluster").to_numpy(), 0)
            _count(counts, kept.column("cluster").to_numpy(), 1)
            writer.write(_kept_rows(pruning.label, kept))
        return _budget_rows(counts)

    written, budget = _publish(storage, pruning, write)
    kept = sum(r["kept"] for r in budget)
    return PruneResult(
        pruning.label,
        pruning.method,
        total,
        total,
        total - n,
        kept,
        budget,
        [*map(str, score_files), *written],
        note=f"removed {total - kept} least typical items (typicality up to {float(value):.4f})",
    )


def _representatives(
    storage: st.Storage, settings: Settings, pruning: Pruning, log: Callable[[str], None]
) -> PruneResult:
    files = bucket_files(storage, settings)
    total = sum(st.parquet_num_rows(p) for p in files)
    n = int(pruning.size or 0)
    if n > total:
        raise PruneError(f"{pruning.label}: size={n} is more than the {total} items of the dataset")
    k = len(load_centroids(storage))
    assignment_files = storage.stage_files(st.CLUSTER_ASSIGNMENTS)
    # Pass 1: cluster sizes from the cluster column alone, then quotas proportional to them.
    sizes = np.concatenate(
        [
            cluster_counts(assignment_files, *bucket_cluster_range(b, k, settings.bucket_partitions))
            for b in range(len(files))
        ]
    )
    if int(sizes.sum()) != total:
        raise PruneError(
            f"{pruning.label}: the assignments hold {int(sizes.sum())} items but the bucket results {total}: "
            "the stored results are out of step; run the pipeline again"
        )
    quotas = proportional_quotas(n, sizes)
    log(
        f"{pruning.label}: choosing {n} of {total} items, quotas proportional to size over "
        f"{int(np.count_nonzero(quotas))} of {int(np.count_nonzero(sizes))} clusters, MMR with diversity "
        f"{st.format_eps(pruning.diversity)}"
    )
    extra = {
        int(c): {"share": float(m) / total, "target": float(n) * float(m) / total}
        for c, m in enumerate(sizes.tolist())
        if m
    }
    counts: dict[int, list[int]] = {int(c): [int(m), 0] for c, m in enumerate(sizes.tolist()) if m}

    def write(writer: st.AtomicParquetWriter) -> list[dict]:
        # Pass 2: each cluster fills its quota by MMR (relevance: similarity to the centroid).
        for b in range(len(files)):
            first, end = bucket_cluster_range(b, k, settings.bucket_partitions)
            if not int(quotas[first:end].sum()):
                continue  # no pick here: the bucket's embeddings are never read
            for rows, x in _cluster_slices(settings, k, b):
                c = int(rows.column("cluster")[0].as_py())
                q = int(quotas[c])
                if q == 0:
                    continue
                sims = rows.column("sim_to_centroid").to_numpy()
                pick = mmr_select(x, sims, q, pruning.diversity)
                kept = rows.take(pa.array(np.sort(pick), pa.int64()))
                counts[c][1] += kept.num_rows
                writer.write(_kept_rows(pruning.label, kept))
        return _budget_rows(counts, extra)

    written, budget = _publish(storage, pruning, write)
    return PruneResult(pruning.label, pruning.method, total, total, n, sum(r["kept"] for r in budget), budget, written)


def compute_pruning(settings: Settings, pruning: Pruning, log: Callable[[str], None] | None = None) -> PruneResult:
    """Compute one pruning selection from the stored results and write its files (atomically, deterministic)."""
    storage = settings.storage_root()
    start = time.perf_counter()
    # Taken before reading the results: if they change meanwhile, the record is already stale, never wrongly fresh.
    made_from = results_fingerprint(storage)
    run = {
        "prototypes": _prototypes,
        "d4": _d4,
        "dbp": _dbp,
        "outliers": _outliers,
        "representatives": _representatives,
    }[pruning.method]
    result = run(storage, settings, pruning, log or (lambda m: None))
    write_made_from(selection_dir(storage, pruning), made_from)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def stale_prunings(storage: st.Storage, fingerprint: str | None = None) -> dict[str, str]:
    """The pruning selections (by label) not made from the current results, with the reason.

    `fingerprint`: the storage's results_fingerprint, when the caller has it already.
    """
    root = storage.stage_dir(PRUNED)
    if not root.exists():
        return {}
    folders = [p for p in sorted(root.iterdir(), key=str) if p.is_dir()]
    if not folders:
        return {}
    current = fingerprint or results_fingerprint(storage)
    out = {}
    for folder in folders:
        why = mismatch(read_made_from(folder).get("results"), current)
        if why is not None:
            out[folder.name] = why
    return out


def remove_pruning_folder(storage: st.Storage, label: str) -> None:
    """Delete one selection's folder under `pruned/`."""
    folder = storage.stage_dir(PRUNED) / label
    if st.is_local(folder):
        shutil.rmtree(str(folder), ignore_errors=True)
    elif folder.exists():
        folder.fs.rm(folder.path, recursive=True)


def prune_stale(storage: st.Storage, method: str, keep: Sequence[Pruning]) -> list[str]:
    """Delete the `pruned/` folders of one method that are not among `keep`; returns what went."""
    root = storage.stage_dir(PRUNED)
    if not root.exists():
        return []
    wanted = {p.label for p in keep}
    removed = []
    for folder in sorted(root.iterdir(), key=lambda p: str(p)):
        if folder.name.partition(":")[0] == method and folder.name not in wanted:
            remove_pruning_folder(storage, folder.name)
            removed.append(folder.name)
    return removed
