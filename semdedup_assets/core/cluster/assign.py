"""Assignment: every item to its nearest centroid by inner product, cluster buckets, and one shard's unit."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import assignments_schema
from semdedup_assets.core.io.tables import embedding_matrix, stored_dtype

SIM_BLOCK = 4096


def assign(
    embeddings: np.ndarray, centroids: np.ndarray, batch: int = 65536, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product: (cluster int32, sim_to_centroid float32, independent of batching).

    On `device` "cpu" faiss' flat index finds the nearest centroid; on a CUDA device a torch
    GEMM does (its scores can differ from faiss' BLAS in the last bit, so an item within an
    ulp of two centroids can go to the other one). `sim_to_centroid` is the same row-wise
    float64 kernel on either.
    """
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    c32 = np.ascontiguousarray(centroids, dtype=np.float32)
    nearest = _nearest_torch(c32, device) if device.startswith("cuda") else _nearest_faiss(c32)
    clusters = np.empty(len(x), dtype=np.int32)
    sims = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        i = nearest(chunk)
        clusters[start : start + batch] = i[:, 0]
        for s in range(0, len(chunk), SIM_BLOCK):  # bounded temporaries
            rows = chunk[s : s + SIM_BLOCK]
            sims[start + s : start + s + len(rows)] = sim_to_centroid(rows, c32[i[s : s + SIM_BLOCK, 0]])
    return clusters, sims


def _nearest_faiss(c32: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    index = faiss.IndexFlatIP(c32.shape[1])
    index.add(c32)
    return lambda chunk: index.search(chunk, 1)[1]


def _nearest_torch(c32: np.ndarray, device: str) -> Callable[[np.ndarray], np.ndarray]:
    import torch

    c = torch.from_numpy(c32).to(device)

    def nearest(chunk: np.ndarray) -> np.ndarray:
        scores = torch.from_numpy(chunk).to(device) @ c.T
        return scores.argmax(dim=1, keepdim=True).cpu().numpy()

    return nearest


def assign_device(settings: Settings) -> str:
    """Where the nearest-centroid search runs: the `device` knob resolved here ("cpu" or "cuda[:N]")."""
    from semdedup_assets.core.embed.encoders import resolve_device

    return str(resolve_device(settings.device))


def sim_to_centroid(rows: np.ndarray, row_centroids: np.ndarray) -> np.ndarray:
    """Each row's dot product with its own centroid, float64-accumulated and rounded to float32.

    faiss' BLAS scores move by an ulp with the batch's shape, which would make the order of
    identical items depend on how rows were batched; one row-wise kernel does not. A float32
    accumulation would be ~2x cheaper here, but it moves most sims by an ulp against this
    float64 one, so keep-lists would change on near-ties (bench/results/end_to_end.md): the
    float64 sum is kept. Both inputs stay float32 (the einsum casts in its buffer: the same
    float64 values as an explicit cast, without a float64 copy of the gathered centroids).
    """
    return np.einsum("ij,ij->i", rows, row_centroids, dtype=np.float64).astype(np.float32)


def bucket_keys(buckets: int) -> list[str]:
    """Partition keys of the cluster buckets: '000', '001', ..."""
    width = max(3, len(str(buckets - 1)))
    return [str(b).zfill(width) for b in range(buckets)]


def bucket_cluster_range(bucket: int, k: int, buckets: int) -> tuple[int, int]:
    """The contiguous cluster range [first, end) of one bucket."""
    return bucket * k // buckets, (bucket + 1) * k // buckets


def bucket_of(clusters: np.ndarray, k: int, buckets: int) -> np.ndarray:
    """The bucket of each cluster id (inverse of bucket_cluster_range)."""
    return ((np.asarray(clusters, dtype=np.int64) + 1) * buckets - 1) // k


def touched_buckets(clusters: np.ndarray, k: int, buckets: int) -> set[str]:
    """Bucket partition keys that hold any of these clusters."""
    keys = bucket_keys(buckets)
    return {keys[b] for b in np.unique(bucket_of(np.unique(clusters), k, buckets))}


def bucket_row_slices(sorted_clusters: np.ndarray, k: int, buckets: int) -> list[tuple[int, int]]:
    """(offset, length) of each bucket's run of rows in cluster-sorted rows (one Parquet row group each)."""
    b = bucket_of(sorted_clusters, k, buckets)
    if len(b) and (np.diff(b) < 0).any():
        raise ValueError("rows must be sorted by cluster")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(b)) + 1, [len(b)]]).astype(np.int64)
    return [(int(s), int(e - s)) for s, e in itertools.pairwise(bounds) if e > s]


def iter_cluster_ranges(k: int, buckets: int) -> Iterator[tuple[int, int, int]]:
    """(bucket, first cluster, end cluster) for contiguous cluster ranges per bucket."""
    for b in range(buckets):
        yield (b, *bucket_cluster_range(b, k, buckets))


@dataclass
class AssignShardResult:
    """What assigning one shard did; plain values only (it crosses process boundaries)."""

    key: str
    path: str
    rows: int
    clusters_touched: int
    mean_sim_to_centroid: float
    buckets_touched: list[str]  # bucket keys holding the shard's items, before and after this run
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)  # e.g. a damaged earlier file that was replaced


def assignment_problems(table: pa.Table, expected_rows: int, k: int) -> list[str]:
    """What is wrong with one shard's assignments (empty when every item is assigned once)."""
    problems = []
    if table.num_rows != expected_rows:
        problems.append(f"{table.num_rows} rows, expected {expected_rows}")
    if pc.count_distinct(table.column("id")).as_py() != table.num_rows:
        problems.append("an id is assigned more than once")
    clusters = table.column("cluster")
    if table.num_rows and (pc.min(clusters).as_py() < 0 or pc.max(clusters).as_py() >= k):
        problems.append(f"cluster outside [0, {k})")
    return problems


def keep_by_values(storage: st.Storage, key: str, ids: pa.ChunkedArray, settings: Settings) -> dict[str, pa.Array]:
    """The shard's keep-by columns from its raw file, aligned with `ids` (the embedded items, in raw order)."""
    names = [name for name, _ in settings.keep_by_columns]
    if not names:
        return {}
    raw_path = storage.shard_file(st.RAW, key)
    have = st.read_schema(raw_path).names
    if missing := [n for n in names if n not in have]:
        raise ValueError(
            f"shard {key!r}: its raw index {raw_path} has no keep-by column {missing[0]!r} "
            f"(columns: {', '.join(have)}); ingest it again with this --keep-by (`semdedup run`)"
        )
    raw = st.read_table(raw_path, columns=["id", *names])
    rows = pc.index_in(ids, value_set=raw.column("id"))  # rejected images are absent from `ids`, never extra
    return {n: raw.column(n).take(rows).combine_chunks() for n in names}


def item_files(storage: st.Storage, key: str, ids: pa.ChunkedArray, settings: Settings) -> pa.Array:
    """The input file key of every embedded item (`ids`, in raw order): the partition's key itself with one file
    per shard, else the raw index's `shard` column (a group's items name their own files)."""
    if settings.files_per_shard == 1:
        return pa.array([key] * len(ids), type=pa.string())
    raw = st.read_table(storage.shard_file(st.RAW, key), columns=["id", "shard"])
    rows = pc.index_in(ids, value_set=raw.column("id"))  # rejected items are absent from `ids`, never extra
    return raw.column("shard").take(rows).combine_chunks()


def assign_shard(
    settings: Settings, key: str, centroids: np.ndarray, k: int | None = None, warn: Callable[[str], None] | None = None
) -> AssignShardResult:
    """Assign one shard's embeddings to their nearest centroids; write `cluster_assignments/<key>.parquet`.

    Rows are sorted by (cluster, id) with one row group per bucket. `buckets_touched`
    also holds the buckets the shard's items leave when an earlier assignment is replaced
    (a damaged earlier file is just replaced: `warn` and the result's `warnings` name it).
    Both engines call this, in the run's process or in a Ray task, so both write the same bytes.
    """
    k = len(centroids) if k is None else k
    if k != len(centroids):
        raise ValueError(f"k={k} but {len(centroids)} centroids were given")
    start = time.perf_counter()
    storage = settings.storage_root()
    out = storage.shard_file(st.CLUSTER_ASSIGNMENTS, key)
    buckets: set[str] = set()
    warnings: list[str] = []

    def note(message: str) -> None:
        warnings.append(message)
        if warn is not None:
            warn(message)

    # A re-run: the buckets its items leave are touched too.
    old = st.usable(out, lambda p: st.read_table(p, columns=["cluster"]), note)
    if old is not None and old.num_rows and (old_clusters := old.column("cluster").to_numpy()).max() < k:
        buckets |= touched_buckets(old_clusters, k, settings.bucket_partitions)
    emb = st.read_table(storage.shard_file(st.EMBEDDINGS, key))
    vectors = embedding_matrix(emb.column("embedding"))
    dtype = stored_dtype(emb.schema.field("embedding"))
    device = assign_device(settings)
    clusters, sims = assign(vectors, centroids, device=device)
    schema = assignments_schema(vectors.shape[1], dtype)
    table = pa.table(
        {
            "id": emb.column("id"),
            "shard": item_files(storage, key, emb.column("id"), settings),
            "cluster": pa.array(clusters),
            "sim_to_centroid": pa.array(sims),
            "embedding": emb.column("embedding").cast(schema.field("embedding").type),
        },
        schema=schema,
    )
    for name, values in keep_by_values(storage, key, emb.column("id"), settings).items():
        table = table.append_column(name, values)  # after the fixed columns: without --keep-by, none
    table = table.sort_by([("cluster", "ascending"), ("id", "ascending")])
    problems = assignment_problems(table, emb.num_rows, k)
    # One row group per bucket: a bucket's read skips every other bucket's rows by footer stats.
    with st.publish_together([st.AtomicParquetWriter(out, table.schema)]) as (writer,):
        for offset, length in bucket_row_slices(table.column("cluster").to_numpy(), k, settings.bucket_partitions):
            writer.write(table.slice(offset, length))
    buckets |= touched_buckets(clusters, k, settings.bucket_partitions)
    if settings.probes > 1:  # a bucket's items probe clusters of other buckets: every bucket may change
        buckets = set(bucket_keys(settings.bucket_partitions))
    return AssignShardResult(
        key=key,
        path=str(out),
        rows=emb.num_rows,
        clusters_touched=len(np.unique(clusters)),
        mean_sim_to_centroid=round(float(sims.mean()), 4),
        buckets_touched=sorted(buckets),
        problems=problems,
        seconds=round(time.perf_counter() - start, 2),
        device=device,
        warnings=warnings,
    )
