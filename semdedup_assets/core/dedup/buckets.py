"""One cluster bucket: read its assigned rows from every shard, run the pairwise rule, write the result."""

from __future__ import annotations

import heapq
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from semdedup_assets.core.cluster.assign import bucket_cluster_range
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.ordering import cluster_order
from semdedup_assets.core.embed.encoders import resolve_device
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import SEMANTIC_DUPLICATES_SCHEMA
from semdedup_assets.core.io.tables import unit_embeddings
from semdedup_assets.core.run.parallel import map_batches, worker_count

TOP_PAIRS = 10

Pair = tuple[float, str, str]  # (max_sim, id, duplicate_of)


@dataclass
class DedupBucketResult:
    """What deduplicating one bucket did; plain values only (it crosses process boundaries)."""

    bucket: str
    path: str
    first_cluster: int
    end_cluster: int  # the bucket holds clusters [first_cluster, end_cluster)
    rows: int
    assigned_rows: int
    cluster_sizes: list[int]  # of the non-empty clusters, in cluster order
    top_pairs: list[Pair]
    rechecked_rows: int  # low-precision kernel: rows recomputed in fp32 near a threshold
    error_bound: float
    device: str
    seconds: float  # the pairwise rule alone (reading and writing excluded)
    problems: list[str] = field(default_factory=list)
    groups: int = 1  # reads of the bucket: more than one when its clusters exceed the memory budget
    clusters_from_disk: list[int] = field(default_factory=list)  # clusters larger than the budget, tiled from disk


def _assignments_dataset(files: Sequence[st.UPath], keep_by: Sequence[str] = ()) -> ds.Dataset:
    """The shards' assignment files as one dataset; `keep_by` columns must exist in each (else fail naming the file)."""
    local = st.is_local(files[0])
    schema = None
    if keep_by:
        # A shard whose keep-by column held no value stores it as null-typed: unify to the others' type.
        schemas = [st.read_schema(p) for p in files]
        for path, file_schema in zip(files, schemas):
            if missing := [n for n in keep_by if n not in file_schema.names]:
                raise ValueError(
                    f"{path} has no keep-by column {missing[0]!r} (columns: "
                    f"{', '.join(file_schema.names)}): assign the shard again with this --keep-by"
                )
        schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    return ds.dataset(
        [str(p) if local else p.path for p in files],
        format="parquet",
        schema=schema,
        filesystem=None if local else files[0].fs,
    )


def _cluster_filter(first: int, end: int, clusters: list[int] | None = None) -> pc.Expression:
    """Rows of clusters [first, end), or of `clusters` (row groups skipped by stats).

    `clusters` as one set lookup within their [min, max] span: an OR over one range per run
    of consecutive ids costs several times the read itself when the clusters are scattered
    (multi-probe reads a bucket's probed clusters, spread over all of k); Arrow still prunes
    row groups by the span and by the set.
    """
    if clusters is None:
        return (pc.field("cluster") >= first) & (pc.field("cluster") < end)
    ids = np.unique(np.asarray(clusters, dtype=np.int64))
    if not len(ids):
        return pc.scalar(False)
    return (
        (pc.field("cluster") >= int(ids[0]))
        & (pc.field("cluster") <= int(ids[-1]))
        & pc.field("cluster").isin(pa.array(ids, type=pa.int32()))
    )


def read_bucket_rows(
    files: Sequence[st.UPath],
    first: int,
    end: int,
    clusters: list[int] | None = None,
    keep_by: Sequence[str] = (),
    embeddings: bool = True,
    ordered: bool = True,
) -> pa.Table:
    """The assignments of clusters [first, end) (or of `clusters`) from every shard file (row groups skipped by stats).

    `keep_by` columns are read too; a file without one of them fails, naming the file.
    `embeddings=False` leaves the embedding column out; `ordered=False` skips the sort by
    (cluster, id), for callers whose result does not depend on the row order.
    """
    if not files:
        return pa.table({})
    columns = ["id", "shard", "cluster", "sim_to_centroid", *(["embedding"] if embeddings else []), *keep_by]
    # Few files in flight at once: a shard file's row group of this bucket is read whole before filtering.
    table = _assignments_dataset(files, keep_by).to_table(
        filter=_cluster_filter(first, end, clusters), columns=columns, fragment_readahead=2, batch_readahead=2
    )
    return table.sort_by([("cluster", "ascending"), ("id", "ascending")]) if ordered else table


def cluster_counts(files: Sequence[st.UPath], first: int, end: int) -> np.ndarray:
    """Members of each cluster in [first, end), from the cluster column alone (streamed: O(end - first))."""
    counts = np.zeros(max(0, end - first), dtype=np.int64)
    if not files or end <= first:
        return counts
    for batch in _assignments_dataset(files).to_batches(
        filter=_cluster_filter(first, end), columns=["cluster"], fragment_readahead=2, batch_readahead=2
    ):
        if batch.num_rows:
            counts += np.bincount(batch.column("cluster").to_numpy() - first, minlength=end - first)
    return counts


def row_bytes(files: Sequence[st.UPath]) -> int:
    """What one assigned row costs while its bucket is deduplicated (bytes, an upper estimate).

    The stored vector, its fp32 unit copy, the cluster's ordered fp32 copy and a
    normalisation temporary (float16 storage), plus the id, shard and result columns.
    """
    field_type = st.read_schema(files[0]).field("embedding").type
    stored = 2 if pa.types.is_float16(field_type.value_type) else 4
    return field_type.list_size * (stored + 12) + 256


def cluster_groups(sizes: np.ndarray, first: int, per_row: int, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive cluster ranges [a, b) whose rows together fit the budget (a lone cluster may not)."""
    a, rows = first, 0
    for c, n in enumerate(sizes.tolist(), start=first):
        if rows and (rows + n) * per_row > budget:
            yield a, c
            a, rows = c, 0
        rows += n
    if rows or a < first + len(sizes):
        yield a, first + len(sizes)


def dedup_table(
    table: pa.Table,
    strategy: str,
    seed: int,
    block_size: int,
    device: str,
    precision: str = "fp32",
    thresholds: tuple[float, ...] = (),
    stats: dict[str, float] | None = None,
    keep_by: Sequence[tuple[str, bool]] = (),
) -> tuple[pa.Table, list[int]]:
    """Run the pairwise rule on every cluster of a bucket's rows; returns the result and cluster sizes.

    `stats`, if given, accumulates the low-precision kernel's re-checked rows and bound;
    `keep_by` (column, descending) pairs order each cluster before the strategy's key.
    """
    if table.num_rows == 0:
        return SEMANTIC_DUPLICATES_SCHEMA.empty_table(), []
    clusters = table.column("cluster").to_numpy()
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    sims = table.column("sim_to_centroid").to_numpy()
    vectors = unit_embeddings(table)
    bounds = np.flatnonzero(np.diff(clusters)) + 1
    starts = np.concatenate([[0], bounds])
    ends = np.concatenate([bounds, [len(clusters)]])
    order_parts, rank_parts, max_parts, dup_parts = [], [], [], []
    keys = [(table.column(name).combine_chunks(), desc) for name, desc in keep_by]

    import torch  # here, not at import: the code location and its run workers load without torch (~2 s)

    from semdedup_assets.core.dedup.pairwise import cluster_semantic_duplicates

    def cluster(bounds: tuple[int, int]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        s, e = bounds
        own: dict[str, float] = {}  # per cluster, merged below in cluster order: no shared counter across threads
        return cluster_semantic_duplicates(
            ids[s:e],
            vectors[s:e],
            sims[s:e],
            strategy,
            seed,
            block_size,
            device,
            precision,
            thresholds,
            own,
            keep_by=[(values.slice(s, e - s), desc) for values, desc in keys],
        ), own

    # Clusters run single-threaded, torch's thread count of them at once (parallel.map_batches): the same bits
    # whatever that count (a 1-CPU Ray task or a many-core process); most clusters are one tile or a few.
    spans = list(zip(starts.tolist(), ends.tolist()))
    for (s, _e), (r, own) in zip(spans, map_batches(cluster, spans, torch.device(device)), strict=True):
        if stats is not None:
            stats["rechecked_rows"] = stats.get("rechecked_rows", 0) + own["rechecked_rows"]
            stats["error_bound"] = max(stats.get("error_bound", 0.0), own["error_bound"])
        order_parts.append(r["order"] + s)
        rank_parts.append(r["rank"])
        max_parts.append(r["max_sim"])
        dup_parts.append(np.where(r["duplicate_of"] >= 0, r["duplicate_of"] + s, -1))
    result = _result_table(
        table,
        ids,
        clusters,
        sims,
        np.concatenate(order_parts),
        np.concatenate(rank_parts),
        np.concatenate(max_parts),
        np.concatenate(dup_parts),
    )
    return result, [int(e - s) for s, e in zip(starts, ends)]


def _result_table(
    table: pa.Table,
    ids: np.ndarray,
    clusters: np.ndarray,
    sims: np.ndarray,
    order: np.ndarray,
    rank: np.ndarray,
    max_sim: np.ndarray,
    dup: np.ndarray,
) -> pa.Table:
    """The bucket result rows in processing order; `dup` holds input indices (-1: none)."""
    dup_ids = pa.array([ids[i] if i >= 0 else None for i in dup], type=pa.string())
    return pa.table(
        {
            "id": pa.array(ids[order], type=pa.string()),
            "shard": table.column("shard").take(pa.array(order)),
            "cluster": pa.array(clusters[order], type=pa.int32()),
            "rank": pa.array(rank),
            "sim_to_centroid": pa.array(sims[order].astype(np.float64)),
            "max_sim": pa.array(max_sim),
            "duplicate_of": dup_ids,
        },
        schema=SEMANTIC_DUPLICATES_SCHEMA,
    )


def dedup_cluster_from_disk(
    files: Sequence[st.UPath],
    cluster: int,
    strategy: str,
    seed: int,
    block_size: int,
    device: str,
    keep_by: Sequence[tuple[str, bool]] = (),
    read_rows: int = 8192,
) -> pa.Table:
    """The pairwise rule over one cluster larger than the memory budget, its tiles streamed from disk.

    The cluster's ids, sims and keep-by values are read (no vectors), ordered as in memory;
    its unit vectors are then written in that order to a scratch file, `read_rows` at a
    time, and the tiled rule reads block x block tiles back. The result equals the
    in-memory rule's bit for bit (same rows, same tiles, fp32).
    """
    from semdedup_assets.core.dedup.pairwise import RowFile, max_sim_tiled  # torch: loaded where the rule runs

    names = [name for name, _ in keep_by]
    table = read_bucket_rows(files, cluster, cluster + 1, keep_by=names, embeddings=False)
    n = table.num_rows
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    sims = table.column("sim_to_centroid").to_numpy()
    order = cluster_order(
        ids, sims, strategy, seed=seed, keep_by=[(table.column(name).combine_chunks(), desc) for name, desc in keep_by]
    )
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n, dtype=np.int64)
    id_values = table.column("id").combine_chunks()
    d = st.read_schema(files[0]).field("embedding").type.list_size
    with tempfile.TemporaryDirectory(prefix=f"semdedup-cluster-{cluster}-") as scratch:
        path = os.path.join(scratch, "rows.f32")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, n * d * 4)
            batches = _assignments_dataset(files).to_batches(
                filter=_cluster_filter(cluster, cluster + 1), columns=["id", "embedding"], batch_size=read_rows
            )
            for batch in batches:
                if not batch.num_rows:
                    continue
                rows = position[pc.index_in(batch.column("id"), value_set=id_values).to_numpy()]
                vectors = np.ascontiguousarray(unit_embeddings(pa.Table.from_batches([batch])), dtype=np.float32)
                for row, vector in zip(rows.tolist(), vectors):
                    os.pwrite(fd, vector.tobytes(), row * d * 4)
        finally:
            os.close(fd)
        max_sim, dup_pos = max_sim_tiled(RowFile(path, n, d, device), block_size=block_size, device=device)
    dup = np.where(dup_pos >= 0, order[np.maximum(dup_pos, 0)], -1).astype(np.int64)
    clusters = np.full(n, cluster, dtype=np.int32)
    return _result_table(
        table, ids, clusters, sims, order, np.arange(n, dtype=np.int64), max_sim.astype(np.float64), dup
    )


def top_pairs(table: pa.Table, n: int = TOP_PAIRS, below: float | None = None) -> list[Pair]:
    """The n most similar (max_sim, id, duplicate_of) pairs of a result table (max_sim < below, if given)."""
    dups = table.filter(pc.is_valid(table.column("duplicate_of")))
    if below is not None:
        dups = dups.filter(pc.less(dups.column("max_sim"), below))
    if dups.num_rows == 0:
        return []
    idx = pc.select_k_unstable(dups, n, [("max_sim", "descending")])
    dups = dups.take(idx)
    return sorted(
        zip(dups.column("max_sim").to_pylist(), dups.column("id").to_pylist(), dups.column("duplicate_of").to_pylist()),
        key=lambda x: (-x[0], x[1]),
    )


def dedup_bucket(settings: Settings, bucket: str, k: int, assignment_files: Sequence[st.UPath]) -> DedupBucketResult:
    """Deduplicate the clusters of one bucket across every shard's assignments file.

    The bucket's clusters are planned into groups that fit the memory budget from the
    assignment counts (`plan_bucket`); each group is read and deduplicated on its own and
    `semantic_duplicates/bucket-<bucket>.parquet` is streamed group by group and published
    atomically. The result's `problems` is empty when every assigned item of the bucket
    appears exactly once.
    """
    storage = settings.storage_root()
    device = str(resolve_device(settings.device))
    first, end = bucket_cluster_range(int(bucket), k, settings.bucket_partitions)
    files = sorted(assignment_files, key=str)
    kernel: dict[str, float] = {"rechecked_rows": 0, "error_bound": 0.0}
    path = storage.bucket_file(bucket)
    tally = _Tally()
    # Fixed row groups: the file's bytes do not depend on how the bucket was split.
    with st.publish_together([st.AtomicParquetWriter(path, SEMANTIC_DUPLICATES_SCHEMA, st.STREAM_ROW_GROUP)]) as (
        writer,
    ):
        if settings.probes > 1:  # exact fp32 tiles over the probed clusters (core/dedup/multiprobe.py)
            _multiprobe_in_groups(settings, files, first, end, k, device, writer, tally)
        else:
            _dedup_in_groups(settings, files, first, end, device, kernel, writer, tally)
    problems = []
    if tally.rows != tally.assigned or tally.ids_seen != tally.rows:
        problems.append(f"bucket {bucket}: {tally.rows} result rows for {tally.assigned} assigned items")
    return DedupBucketResult(
        bucket=bucket,
        path=str(path),
        first_cluster=first,
        end_cluster=end,
        rows=tally.rows,
        assigned_rows=tally.assigned,
        cluster_sizes=tally.sizes,
        top_pairs=tally.pairs,
        rechecked_rows=int(kernel["rechecked_rows"]),
        error_bound=float(kernel["error_bound"]),
        device=device,
        seconds=round(tally.seconds, 2),
        problems=problems,
        groups=max(tally.groups, 1),
        clusters_from_disk=tally.from_disk,
    )


@dataclass
class _Tally:
    """What the groups of one bucket added up to."""

    sizes: list[int] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    rows: int = 0
    assigned: int = 0
    ids_seen: int = 0
    groups: int = 0
    seconds: float = 0.0
    from_disk: list[int] = field(default_factory=list)

    def add(
        self, writer: st.AtomicParquetWriter, result: pa.Table, sizes: list[int], read: int, seconds: float
    ) -> None:
        """Write one group's result (groups come in cluster order) and count it."""
        writer.write(result)
        self.groups += 1
        self.seconds += seconds
        self.sizes += sizes
        self.rows += result.num_rows
        self.assigned += read
        self.ids_seen += pc.count_distinct(result.column("id")).as_py()
        self.pairs = heapq.nsmallest(TOP_PAIRS, self.pairs + top_pairs(result), key=lambda x: (-x[0], x[1]))


def pairwise_budget(settings: Settings) -> int:
    """The bytes a bucket's rows may take: the memory budget less the kernel's tiles (a block x block score tile
    and its temporaries, one per cluster running at once: `parallel.worker_count`), at least a quarter of it."""
    tiles = 4 * 4 * settings.block_size**2 * worker_count(resolve_device(settings.device))
    return max(settings.memory_budget_bytes - tiles, settings.memory_budget_bytes // 4)


def spill_groups(
    files: Sequence[st.UPath],
    groups: Sequence[tuple[int, int, int]],
    keep_by: Sequence[str],
    folder: str,
    buffer_bytes: int,
) -> dict[int, str]:
    """Split the rows of planned cluster groups into one Arrow IPC file per group, in one pass (memory: the buffers).

    `groups` are (first, end, rows) cluster ranges in ascending order. Each shard file is
    read once, batch by batch; a batch's rows go to their group's buffer, written out when
    the buffers together pass `buffer_bytes`. Returns {first cluster of a group: its file}.
    The files hold the rows as `read_bucket_rows` would return them, unsorted.
    """
    if not groups or not files:
        return {}
    columns = ["id", "shard", "cluster", "sim_to_centroid", "embedding", *keep_by]
    dataset = _assignments_dataset(files, keep_by)
    schema = pa.schema([dataset.schema.field(name) for name in columns])
    starts = np.array([a for a, _, _ in groups], dtype=np.int64)
    ends = np.array([b for _, b, _ in groups], dtype=np.int64)
    paths = {int(a): os.path.join(folder, f"group-{a}.arrow") for a in starts}
    writers = {a: pa.ipc.new_file(path, schema) for a, path in paths.items()}
    pending: dict[int, list[pa.RecordBatch]] = {a: [] for a in paths}
    held = 0

    def flush() -> None:
        nonlocal held
        for a, batches in pending.items():
            if batches:
                writers[a].write_table(pa.Table.from_batches(batches, schema).combine_chunks())
                batches.clear()
        held = 0

    try:
        for batch in dataset.to_batches(
            filter=_cluster_filter(int(starts[0]), int(ends[-1])),
            columns=columns,
            fragment_readahead=2,
            batch_readahead=2,
        ):
            if not batch.num_rows:
                continue
            cluster = batch.column("cluster").to_numpy()
            group = np.searchsorted(ends, cluster, side="right")
            group[starts[np.minimum(group, len(starts) - 1)] > cluster] = len(starts)  # in no group: not spilled
            for g in np.unique(group[group < len(starts)]).tolist():
                part = batch.filter(pa.array(group == g))
                pending[int(starts[g])].append(part)
                held += part.nbytes
            if held >= buffer_bytes:
                flush()
        flush()
    finally:
        for writer in writers.values():
            writer.close()
    return paths


def read_spilled(path: str) -> pa.Table:
    """A group's spilled rows (`spill_groups`), sorted by (cluster, id) as `read_bucket_rows` returns them."""
    with pa.OSFile(path) as source:  # read, not memory-mapped: the group's bytes count where they are used
        table = pa.ipc.open_file(source).read_all()
    return table.sort_by([("cluster", "ascending"), ("id", "ascending")])


def plan_bucket(settings: Settings, files: Sequence[st.UPath], first: int, end: int) -> list[tuple[int, int, int]]:
    """The memory buckets of clusters [first, end): (first, end, rows) of consecutive cluster ranges that fit.

    Computed from the assignment counts (the `cluster` column only), never guessed: each
    range's rows, at the stored dtype with their working copies (`row_bytes`), fit
    `pairwise_budget`; a cluster larger than that is a range of its own (tiled from disk).
    Ranges without rows are left out.
    """
    counts = cluster_counts(files, first, end)
    per_row = row_bytes(files) if files else 1
    plan = [
        (a, b, int(counts[a - first : b - first].sum()))
        for a, b in cluster_groups(counts, first, per_row, pairwise_budget(settings))
    ]
    return [(a, b, n) for a, b, n in plan if n]


def _dedup_in_groups(
    settings: Settings,
    files: Sequence[st.UPath],
    first: int,
    end: int,
    device: str,
    kernel: dict[str, float],
    writer: st.AtomicParquetWriter,
    tally: _Tally,
) -> None:
    """Deduplicate clusters [first, end) a planned group of consecutive clusters at a time, each within the budget.

    A cluster that alone exceeds the budget is tiled from disk (fp32), or refused with a
    message naming it, its size and the k that would fit when the precision is not fp32.
    """
    keep_by = settings.keep_by_columns
    names = [name for name, _ in keep_by]
    budget = pairwise_budget(settings)
    per_row = row_bytes(files) if files else 1
    plan = plan_bucket(settings, files, first, end)
    alone = [b - a == 1 and size * per_row > budget for a, b, size in plan]  # one cluster beyond the budget
    with tempfile.TemporaryDirectory(prefix=f"semdedup-bucket-{first}-") as scratch:
        # More than one group in memory: one pass over the bucket spills each group's rows to its own file, so
        # the bucket is decoded once, not once per group (G groups would read G x the bucket: N^2 / budget).
        spilled = (
            spill_groups(files, [g for g, big in zip(plan, alone) if not big], names, scratch, budget // 4)
            if sum(not big for big in alone) > 1
            else {}
        )
        for (a, b, size), big in zip(plan, alone):
            if big:
                if settings.precision != "fp32":
                    raise ValueError(
                        f"cluster {a} has {size} members ({size * per_row / 2**20:.0f} MiB "
                        f"to deduplicate), more than the memory budget of {budget / 2**20:.0f} MiB, "
                        f"and precision {settings.precision} cannot tile it from disk: use --precision "
                        f"fp32, a larger --memory-budget, or a k of at least "
                        f"{_k_that_fits(settings, files, size, budget // per_row)}"
                    )
                start = time.perf_counter()
                result = dedup_cluster_from_disk(
                    files, a, settings.keep, settings.seed, settings.block_size, device, keep_by
                )
                tally.from_disk.append(a)
                tally.add(writer, result, [result.num_rows], result.num_rows, time.perf_counter() - start)
                continue
            table = read_spilled(spilled[a]) if a in spilled else read_bucket_rows(files, a, b, keep_by=names)
            start = time.perf_counter()
            result, sizes = dedup_table(
                table,
                settings.keep,
                settings.seed,
                settings.block_size,
                device,
                settings.precision,
                settings.thresholds,
                kernel,
                keep_by=keep_by,
            )
            read = table.num_rows
            del table
            if a in spilled:
                os.unlink(spilled[a])  # the scratch holds at most the bucket, and less as groups are done
            tally.add(writer, result, sizes, read, time.perf_counter() - start)


def _multiprobe_in_groups(
    settings: Settings,
    files: Sequence[st.UPath],
    first: int,
    end: int,
    k: int,
    device: str,
    writer: st.AtomicParquetWriter,
    tally: _Tally,
) -> None:
    """The multi-probe rule over clusters [first, end), a group of consecutive clusters at a time within the budget.

    A group's pool is its own rows plus every member of the clusters they probe; groups are
    read with a (P + 1)-th of the budget and then cut so that each pool fits the rest
    (`probe_groups`). A single cluster whose pool exceeds the budget is refused, naming it:
    the probed clusters cannot be tiled from disk. Each query's M depends only on its own
    probe set, so the groups give the same rows as one read of the bucket.
    """
    from semdedup_assets.core.cluster.centroids import load_centroids
    from semdedup_assets.core.dedup.multiprobe import multiprobe_bucket, probe_clusters

    keep_by = settings.keep_by_columns
    names = [name for name, _ in keep_by]
    centroids = load_centroids(settings.storage_root())
    budget = pairwise_budget(settings)
    per_row = row_bytes(files) if files else 1
    counts = cluster_counts(files, 0, k)  # every cluster's size: a probed cluster is read whole
    for a, b in cluster_groups(counts[first:end], first, per_row, budget // (settings.probes + 1)):
        if not counts[a:b].sum():
            continue
        table = read_bucket_rows(files, a, b, keep_by=names)
        own = table.column("cluster").to_numpy().astype(np.int64)
        probe = probe_clusters(unit_embeddings(table), centroids, own, settings.probes)
        for c0, c1 in probe_groups(
            own, probe, a, b, counts, per_row, budget - table.num_rows * per_row, settings.probes
        ):
            s, e = (int(i) for i in np.searchsorted(own, [c0, c1]))
            start = time.perf_counter()
            result, sizes = multiprobe_bucket(
                table.slice(s, e - s),
                # Called inside this iteration, before `del table`: the loop variables are the current ones.
                lambda cs: _probed_rows(table, own, a, b, cs, files, names),  # noqa: B023, F821
                centroids,
                settings.probes,
                settings.keep,
                settings.seed,
                settings.block_size,
                device,
                keep_by=keep_by,
                probe=probe[s:e],
            )
            tally.add(writer, result, sizes, e - s, time.perf_counter() - start)
        del table


def _probed_rows(
    table: pa.Table,
    own: np.ndarray,
    a: int,
    b: int,
    clusters: list[int],
    files: Sequence[st.UPath],
    names: Sequence[str],
) -> pa.Table:
    """The rows of `clusters`: those of the group in memory (clusters [a, b) of `table`) taken from it, the rest read."""
    inside = [c for c in clusters if a <= c < b]
    outside = [c for c in clusters if not a <= c < b]
    parts = [table.take(pa.array(np.flatnonzero(np.isin(own, inside))))] if inside else []
    if outside:
        # Unsorted: the pool's row order changes nothing (the global rank is a total order on unique ids).
        parts.append(read_bucket_rows(files, 0, 0, outside, keep_by=names, ordered=False).select(table.column_names))
    return pa.concat_tables(parts) if parts else table.schema.empty_table()


def probe_groups(
    own: np.ndarray, probe: np.ndarray, first: int, end: int, counts: np.ndarray, per_row: int, budget: int, probes: int
) -> Iterator[tuple[int, int]]:
    """Consecutive cluster ranges of [first, end) whose pools (own members plus every member of the clusters
    they probe) fit the budget; `own` is sorted, `probe` its (n, P) probe clusters, `counts` every cluster's size.

    Raises ValueError naming a cluster whose pool alone exceeds the budget.
    """
    bounds = np.searchsorted(own, np.arange(first, end + 1))
    a, pool = first, set()

    def rows(clusters: set[int]) -> int:
        return int(counts[sorted(clusters)].sum())

    for c in range(first, end):
        s, e = bounds[c - first], bounds[c - first + 1]
        if e == s:
            continue
        mine = {c, *np.unique(probe[s:e]).tolist()}
        if pool and rows(pool | mine) * per_row > budget:
            yield a, c
            a, pool = c, set()
        if not pool and rows(mine) * per_row > budget:
            raise ValueError(
                f"cluster {c} and the clusters its members probe hold {rows(mine)} rows "
                f"({rows(mine) * per_row / 2**20:.0f} MiB), more than the memory budget leaves for "
                f"them ({max(budget, 0) / 2**20:.0f} MiB) with --probes {probes}: use a larger "
                f"--memory-budget, fewer --probes, or a larger k"
            )
        pool |= mine
    if pool:
        yield a, end


def _k_that_fits(settings: Settings, files: Sequence[st.UPath], size: int, fits: int) -> int:
    """A k whose average cluster holds `fits` rows, scaled by how far this cluster exceeds that."""
    items = sum(st.parquet_num_rows(p) for p in files)
    k = settings.n_clusters(items) if items else 1
    return max(k, -(-k * size // max(fits, 1)))
