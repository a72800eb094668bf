"""Assignment: every item to its nearest centroid by inner product, and cluster buckets."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import numpy as np


SIM_BLOCK = 4096


def assign(embeddings: np.ndarray, centroids: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product: (cluster int32, sim_to_centroid float32, independent of batching)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    clusters = np.empty(len(x), dtype=np.int32)
    sims = np.empty(len(x), dtype=np.float32)
    c64 = np.asarray(centroids, dtype=np.float64)
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        _, i = index.search(chunk, 1)
        clusters[start : start + batch] = i[:, 0]
        # faiss' BLAS scores move by an ulp with the batch's shape, which would make the order of
        # identical items depend on how rows were batched; a per-row float64 dot product does not.
        for s in range(0, len(chunk), SIM_BLOCK):  # bounded float64 temporaries
            rows = chunk[s : s + SIM_BLOCK]
            sims[start + s : start + s + len(rows)] = np.einsum("ij,ij->i", rows, c64[i[s : s + SIM_BLOCK, 0]],
                                                                dtype=np.float64)
    return clusters, sims


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
    return [(int(s), int(e - s)) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]


def iter_cluster_ranges(k: int, buckets: int) -> Iterator[tuple[int, int, int]]:
    """(bucket, first cluster, end cluster) for contiguous cluster ranges per bucket."""
    for b in range(buckets):
        yield (b, *bucket_cluster_range(b, k, buckets))
