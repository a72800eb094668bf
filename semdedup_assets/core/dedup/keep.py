"""Turning max_sim into keep decisions: thresholds, eps curves, fixed-size targets, and the keep-list files."""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.buckets import TOP_PAIRS, Pair, top_pairs
from semdedup_assets.core.dedup.groups import GroupsBuilder, build_groups_out_of_core, prune_groups
from semdedup_assets.core.dedup.ordering import ids_as_str
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import BUCKET_GLOB, refresh_catalog, scan, stage_source
from semdedup_assets.core.io.schemas import EPS_CURVE_SCHEMA, KEEP_LIST_SCHEMA

# Pairs below this are near-duplicates rather than exact copies (shown separately).
NEAR_EXACT = 0.9999
MAX_SIM_BINS = np.linspace(-1.0, 1.0, 81)


def _as_float64(max_sim: np.ndarray) -> np.ndarray:
    """Return max_sim as a flat float64 array (all comparisons are made in float64)."""
    return np.asarray(max_sim, dtype=np.float64).reshape(-1)


def duplicate_mask(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """Return True where the item is a semantic duplicate: max_sim > 1 - eps (strict)."""
    # 1 - eps in float64 matches the SQL `max_sim <= 1 - eps` on DOUBLE columns bit for bit.
    return _as_float64(max_sim) > (1.0 - float(eps))


def keep_mask(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """Return True where the item is kept: max_sim <= 1 - eps."""
    return _as_float64(max_sim) <= (1.0 - float(eps))


def _kept_counts(sorted_max_sim: np.ndarray, eps_values: Sequence[float]) -> list[int]:
    """Return, per eps, how many entries of an ascending array satisfy max_sim <= 1 - eps."""
    thresholds = np.asarray([1.0 - float(e) for e in eps_values], dtype=np.float64)
    # side="right" counts values equal to the threshold as kept (the <= rule); NaNs sort
    # last and are never counted, exactly like keep_mask.
    return np.searchsorted(sorted_max_sim, thresholds, side="right").astype(np.int64).tolist()


def _curve_rows(eps_values: Sequence[float], kept: Sequence[int], total: int) -> list[dict]:
    """Return the eps-curve rows for the given kept counts."""
    rows = []
    for eps, k in zip(eps_values, kept):
        rows.append(
            {
                "eps": float(eps),
                "kept": int(k),
                "removed": int(total - k),
                "kept_fraction": (k / total) if total else 1.0,
            }
        )
    return rows


def eps_curve(max_sim: np.ndarray, eps_values: Sequence[float]) -> list[dict]:
    """Return one row {eps, kept, removed, kept_fraction} per eps, in the given order."""
    values = np.sort(_as_float64(max_sim))
    return _curve_rows(list(eps_values), _kept_counts(values, eps_values), len(values))


class EpsCurveAccumulator:
    """Streaming eps_curve: feed max_sim chunks (e.g. one per bucket), read rows at the end."""

    def __init__(self, eps_values: Sequence[float]) -> None:
        """Start with zero items for the given eps values."""
        self.eps_values: list[float] = [float(e) for e in eps_values]
        self.total: int = 0
        self._kept: list[int] = [0] * len(self.eps_values)

    def update(self, max_sim_chunk: np.ndarray) -> None:
        """Add the counts of one chunk of max_sim values."""
        values = np.sort(_as_float64(max_sim_chunk))
        for k, count in enumerate(_kept_counts(values, self.eps_values)):
            self._kept[k] += count
        self.total += len(values)

    def rows(self) -> list[dict]:
        """Return the same rows as eps_curve over everything fed so far."""
        return _curve_rows(self.eps_values, self._kept, self.total)


def keep_for_target(
    ids: Sequence[str] | np.ndarray,
    max_sim: np.ndarray,
    n: int | None = None,
    fraction: float | None = None,
) -> np.ndarray:
    """Return the ascending indices of the n (or round(fraction*total)) items with smallest max_sim."""
    values = _as_float64(max_sim)
    id_arr = ids_as_str(ids)
    total = len(values)
    if len(id_arr) != total:
        raise ValueError(f"ids has {len(id_arr)} entries but max_sim has {total}")
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n or fraction")
    if fraction is not None:
        f = float(fraction)
        if not (0.0 <= f <= 1.0):
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        target = round(f * total)
    else:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"n must be an integer, got {n!r}")
        target = int(n)
        if not (0 <= target <= total):
            raise ValueError(f"n must be in [0, {total}], got {n}")
    # Primary key max_sim (least duplicated first), ties by id so the cut is deterministic.
    ranked = np.lexsort((id_arr, values))
    return np.sort(ranked[:target]).astype(np.int64)


def parse_eps_list(text: str) -> list[float]:
    """Parse "0.001,0.01,0.05" into a sorted, de-duplicated list of eps with 0 < eps < 1."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("eps list is empty; expected e.g. '0.001,0.01,0.05'")
    out: set[float] = set()
    for part in parts:
        if not part:
            raise ValueError(f"empty entry in eps list {text!r}")
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a number in eps list: {part!r}") from None
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(f"eps must satisfy 0 < eps < 1, got {part!r}")
        out.add(value)
    return sorted(out)


@dataclass
class KeepListsResult:
    """What writing the keep-lists did: the eps curve and what the asset shows about the result."""

    eps_curve: list[dict]  # one {eps, kept, removed, kept_fraction} per configured eps
    items: int  # bucket rows read
    distinct_ids: int
    cluster_sizes: list[int]  # members per non-empty cluster, in cluster order
    max_sim_counts: list[int]  # histogram over MAX_SIM_BINS of non-first members' max_sim
    top_pairs: list[Pair]
    near_pairs: list[Pair]  # the top pairs with max_sim below NEAR_EXACT
    texts: dict[str, str]  # text payload of the pairs' ids (text modality only)
    keep_list_paths: list[str]
    seconds: float
    groups_paths: list[str] = field(default_factory=list)  # groups/eps=<e>.parquet per configured eps


def build_keep_lists(
    settings: Settings, bucket_files: Sequence[st.UPath], log: Callable[[str], None] | None = None
) -> KeepListsResult:
    """Write one keep-list and one groups file per configured eps and the eps curve from the bucket results, then
    refresh the catalog.

    Buckets are read in the given order (bucket order), so the keep-lists and groups are
    byte-identical run to run; all files are published together or not at all. The duplicate
    groups (core/dedup/groups.py) are resolved in the same pass with --probes 1, and by an
    out-of-core DuckDB pass afterwards with --probes > 1 (duplicate_of may then cross clusters).
    `log`, if given, is called once per bucket read.
    """
    storage = settings.storage_root()
    curve = EpsCurveAccumulator(settings.eps)
    # Fixed row groups: the files' bytes do not depend on --buckets or on how buckets were read.
    writers = [
        st.AtomicParquetWriter(storage.keep_list_file(e), KEEP_LIST_SCHEMA, st.STREAM_ROW_GROUP) for e in settings.eps
    ]
    pairs: list[Pair] = []
    near_pairs: list[Pair] = []
    max_sim_counts = np.zeros(len(MAX_SIM_BINS) - 1, dtype=np.int64)  # streamed: no per-item array
    # --probes 1: a cluster's duplicate_of chains stay in the cluster, so its groups are resolved as it streams past.
    groups = GroupsBuilder(storage, settings.eps) if settings.probes <= 1 else None
    start = time.perf_counter()
    with st.publish_together(writers + (groups.writers if groups is not None else [])):
        for path, table in _bucket_chunks(bucket_files):  # a row group at a time: O(row group), never O(bucket)
            if groups is not None:
                groups.feed(table)
            max_sim = table.column("max_sim").to_numpy()
            curve.update(max_sim)
            max_sim_counts += np.histogram(max_sim[table.column("rank").to_numpy() > 0], bins=MAX_SIM_BINS)[0]
            for eps, writer in zip(settings.eps, writers):
                writer.write(table.filter(pa.array(keep_mask(max_sim, eps))).select(KEEP_LIST_SCHEMA.names))
            pairs = heapq.nsmallest(TOP_PAIRS, pairs + top_pairs(table), key=lambda x: (-x[0], x[1]))
            near_pairs = heapq.nsmallest(
                TOP_PAIRS, near_pairs + top_pairs(table, below=NEAR_EXACT), key=lambda x: (-x[0], x[1])
            )
            if log is not None and path is not None:
                log(f"read {path.name}: {st.parquet_num_rows(path)} items")
        if groups is not None:
            groups.finish()
    if groups is None:
        build_groups_out_of_core(storage, settings.eps)
    prune_groups(storage, settings.eps)
    seconds = round(time.perf_counter() - start, 2)
    rows = curve.rows()
    st.atomic_write_table(pa.Table.from_pylist(rows, schema=EPS_CURVE_SCHEMA), storage.eps_curve_file)
    refresh_catalog(storage)
    results = stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)
    # count(DISTINCT id) is an O(N) aggregate: DuckDB gets the storage's scan memory and spills beyond it.
    distinct = int(scan(storage, f"SELECT count(DISTINCT id) FROM {results}")[0][0])
    sizes = [int(r[0]) for r in scan(storage, f"SELECT count(*) FROM {results} GROUP BY cluster ORDER BY cluster")]
    texts = payload_texts(storage, sorted({i for _, a, b in pairs + near_pairs for i in (a, b)}), settings.modality)
    return KeepListsResult(
        eps_curve=rows,
        items=curve.total,
        distinct_ids=distinct,
        cluster_sizes=sizes,
        max_sim_counts=max_sim_counts.tolist(),
        top_pairs=pairs,
        near_pairs=near_pairs,
        texts=texts,
        keep_list_paths=[str(storage.keep_list_file(e)) for e in settings.eps],
        seconds=seconds,
        groups_paths=[str(storage.groups_file(e)) for e in settings.eps],
    )


def _bucket_chunks(bucket_files: Sequence[st.UPath]) -> Iterator[tuple[st.UPath | None, pa.Table]]:
    """Each bucket file's rows in batches; the path comes with a bucket's last batch (None before it)."""
    for path in bucket_files:
        last = None
        for batch in st.iter_batches(path, batch_size=st.STREAM_ROW_GROUP):
            if last is not None:
                yield None, pa.Table.from_batches([last])
            last = batch
        table = pa.Table.from_batches([last]) if last is not None else st.read_schema(path).empty_table()
        yield path, table


def payload_texts(storage: st.Storage, ids: list[str], modality: str) -> dict[str, str]:
    """Payload text of a few ids, for showing duplicate pairs side by side."""
    if modality != "text" or not ids or not storage.stage_files(st.RAW):
        return {}
    return dict(
        scan(storage, f"SELECT id, text FROM {stage_source(storage, st.RAW)} WHERE id IN (SELECT unnest(?))", [ids])
    )
