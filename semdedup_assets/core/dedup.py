"""One cluster bucket: read its assigned rows from every shard, run the pairwise rule, write the result."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from semdedup_assets.core import storage as st
from semdedup_assets.core.assign import bucket_cluster_range
from semdedup_assets.core.config import Settings
from semdedup_assets.core.encoders import resolve_device
from semdedup_assets.core.pairwise import cluster_semantic_duplicates
from semdedup_assets.core.schemas import SEMANTIC_DUPLICATES_SCHEMA
from semdedup_assets.core.tables import unit_embeddings

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


def read_bucket_rows(files: Sequence[st.UPath], first: int, end: int, clusters: list[int] | None = None,
                     keep_by: Sequence[str] = ()) -> pa.Table:
    """The assignments of clusters [first, end) (or of `clusters`) from every shard file (row groups skipped by stats).

    `keep_by` columns are read too; a file without one of them fails, naming the file.
    """
    if not files:
        return pa.table({})
    local = st.is_local(files[0])
    schema = None
    if keep_by:
        # A shard whose keep-by column held no value stores it as null-typed: unify to the others' type.
        schemas = [st.read_schema(p) for p in files]
        for path, file_schema in zip(files, schemas):
            if missing := [n for n in keep_by if n not in file_schema.names]:
                raise ValueError(f"{path} has no keep-by column {missing[0]!r} (columns: "
                                 f"{', '.join(file_schema.names)}): assign the shard again with this --keep-by")
        schema = pa.unify_schemas([s.remove_metadata() for s in schemas], promote_options="permissive")
    dataset = ds.dataset([str(p) if local else p.path for p in files], format="parquet", schema=schema,
                         filesystem=None if local else files[0].fs)
    flt = (pc.field("cluster") >= first) & (pc.field("cluster") < end) if clusters is None else \
        pc.field("cluster").isin(clusters)
    table = dataset.to_table(filter=flt, columns=["id", "shard", "cluster", "sim_to_centroid", "embedding", *keep_by])
    return table.sort_by([("cluster", "ascending"), ("id", "ascending")])


def dedup_table(table: pa.Table, strategy: str, seed: int, block_size: int, device: str, precision: str = "fp32",
                thresholds: tuple[float, ...] = (), stats: dict[str, float] | None = None,
                keep_by: Sequence[tuple[str, bool]] = ()) -> tuple[pa.Table, list[int]]:
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
    for s, e in zip(starts, ends):
        r = cluster_semantic_duplicates(ids[s:e], vectors[s:e], sims[s:e], strategy, seed, block_size, device,
                                        precision, thresholds, stats,
                                        keep_by=[(values.slice(s, e - s), desc) for values, desc in keys])
        order_parts.append(r["order"] + s)
        rank_parts.append(r["rank"])
        max_parts.append(r["max_sim"])
        dup_parts.append(np.where(r["duplicate_of"] >= 0, r["duplicate_of"] + s, -1))
    order = np.concatenate(order_parts)
    dup = np.concatenate(dup_parts)
    dup_ids = pa.array([ids[i] if i >= 0 else None for i in dup], type=pa.string())
    result = pa.table({
        "id": pa.array(ids[order], type=pa.string()),
        "shard": table.column("shard").take(pa.array(order)),
        "cluster": pa.array(clusters[order], type=pa.int32()),
        "rank": pa.array(np.concatenate(rank_parts)),
        "sim_to_centroid": pa.array(sims[order].astype(np.float64)),
        "max_sim": pa.array(np.concatenate(max_parts)),
        "duplicate_of": dup_ids,
    }, schema=SEMANTIC_DUPLICATES_SCHEMA)
    return result, [int(e - s) for s, e in zip(starts, ends)]


def top_pairs(table: pa.Table, n: int = TOP_PAIRS, below: float | None = None) -> list[Pair]:
    """The n most similar (max_sim, id, duplicate_of) pairs of a result table (max_sim < below, if given)."""
    dups = table.filter(pc.is_valid(table.column("duplicate_of")))
    if below is not None:
        dups = dups.filter(pc.less(dups.column("max_sim"), below))
    if dups.num_rows == 0:
        return []
    idx = pc.select_k_unstable(dups, n, [("max_sim", "descending")])
    dups = dups.take(idx)
    return sorted(zip(dups.column("max_sim").to_pylist(), dups.column("id").to_pylist(),
                      dups.column("duplicate_of").to_pylist()), key=lambda x: (-x[0], x[1]))


def dedup_bucket(settings: Settings, bucket: str, k: int, assignment_files: Sequence[st.UPath]) -> DedupBucketResult:
    """Deduplicate the clusters of one bucket across every shard's assignments file.

    Writes `semantic_duplicates/bucket-<bucket>.parquet` atomically; the result's
    `problems` is empty when every assigned item of the bucket appears exactly once.
    """
    storage = settings.storage_root()
    device = str(resolve_device(settings.device))
    first, end = bucket_cluster_range(int(bucket), k, settings.buckets)
    files = sorted(assignment_files, key=str)
    keep_by = settings.keep_by_columns
    names = [name for name, _ in keep_by]
    table = read_bucket_rows(files, first, end, keep_by=names)
    kernel: dict[str, float] = {"rechecked_rows": 0, "error_bound": 0.0}
    start = time.perf_counter()
    if settings.probes > 1:  # exact fp32 tiles over the probed clusters (core/multiprobe.py)
        from semdedup_assets.core.centroids import load_centroids
        from semdedup_assets.core.multiprobe import multiprobe_bucket

        result, sizes = multiprobe_bucket(table, lambda cs: read_bucket_rows(files, 0, 0, cs, keep_by=names),
                                          load_centroids(storage), settings.probes, settings.keep, settings.seed,
                                          settings.block_size, device, keep_by=keep_by)
    else:
        result, sizes = dedup_table(table, settings.keep, settings.seed, settings.block_size, device,
                                    settings.precision, settings.thresholds, kernel, keep_by=keep_by)
    seconds = round(time.perf_counter() - start, 2)
    problems = []
    if result.num_rows != table.num_rows or pc.count_distinct(result.column("id")).as_py() != result.num_rows:
        problems.append(f"bucket {bucket}: {result.num_rows} result rows for {table.num_rows} assigned items")
    path = storage.bucket_file(bucket)
    st.atomic_write_table(result, path)
    return DedupBucketResult(bucket=bucket, path=str(path), first_cluster=first, end_cluster=end, rows=result.num_rows,
                             assigned_rows=table.num_rows, cluster_sizes=sizes, top_pairs=top_pairs(result),
                             rechecked_rows=int(kernel["rechecked_rows"]), error_bound=float(kernel["error_bound"]),
                             device=device, seconds=seconds, problems=problems)
