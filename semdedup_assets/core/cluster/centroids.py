"""The centroids file: train spherical k-means on a per-shard sample, write it, read it back."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semdedup_assets.core.cluster.kmeans import (
    collect_sample,
    kmeans_device_note,
    sample_target,
    train_spherical_kmeans,
)
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import recent
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.schemas import centroids_schema
from semdedup_assets.core.io.tables import embedding_array, embedding_matrix


class MissingCentroidsError(FileNotFoundError):
    """No centroids file yet: `centroids` must be materialized first."""


@dataclass
class CentroidsResult:
    """What training the centroids did; plain values only."""

    path: str
    clusters: int
    dim: int
    items: int
    shards: int
    sample_rows: int
    train_rows: int
    objective: float
    gpu: bool
    sample_seconds: float
    train_seconds: float
    device: str = "cpu"  # "cuda" where faiss-gpu trained
    device_note: str = ""  # why that device (e.g. CUDA not available in the worker)


def clusters_warning(settings: Settings, items: int) -> str | None:
    """Why k is not the --clusters asked for (more clusters than items), or None."""
    if settings.clusters is None or settings.clusters <= items:
        return None
    return (
        f"--clusters {settings.clusters} is more than the {items} items: using k={settings.n_clusters(items)} "
        "(one cluster per item)"
    )


def train_centroids(
    settings: Settings,
    embedding_files: Mapping[str, st.UPath],
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
) -> CentroidsResult:
    """Train k centroids on a sample of the shards' embeddings (by shard key) and write the centroids file.

    `warn` is told when k differs from the configured `clusters` (more clusters than items).
    """
    storage = settings.storage_root()
    counts = {k: st.parquet_num_rows(p) for k, p in embedding_files.items()}
    total = sum(counts.values())
    k = settings.n_clusters(total)
    if warn is not None and (why := clusters_warning(settings, total)) is not None:
        warn(why)

    def read_rows(key: str, rows: np.ndarray) -> np.ndarray:
        held = recent.recall(embedding_files[key])  # written by this process's embed stage: the stored values
        if held is not None:
            return held[rows]
        table = st.read_table(embedding_files[key], columns=["embedding"])
        return embedding_matrix(table.take(pa.array(rows, type=pa.int64())).column("embedding"))

    target = sample_target(k, settings.max_points_per_centroid)
    dim = _embedding_dim(embedding_files)
    cap = sample_cap(settings.memory_budget_bytes, dim)
    if target > cap:
        # Deterministic all the same: the per-shard draw only sees the smaller target.
        warnings.warn(
            f"the k-means training sample of {target} rows ({target * dim * 4 / 2**20:.2f} MiB) exceeds "
            f"what half the memory budget of {settings.memory_budget_bytes / 2**20:.2f} MiB holds: "
            f"training on a sample of {max(cap, k)} rows ({max(cap, k) // k} per centroid) instead",
            stacklevel=2,
        )
        if log is not None:
            log(f"k-means sample capped by the memory budget: {cap} rows instead of {target}")
        target = max(cap, k)  # k-means needs a row per centroid at least
    start = time.perf_counter()
    sample = collect_sample(counts.items(), read_rows, target, settings.seed)
    sample_seconds = round(time.perf_counter() - start, 2)
    if log is not None:
        log(f"training k={k} on a sample of {len(sample)} of {total} items")
    result = train_spherical_kmeans(
        sample, k, settings.kmeans_iterations, settings.seed, settings.max_points_per_centroid
    )
    dim = int(result.centroids.shape[1])
    table = pa.Table.from_arrays(
        [pa.array(np.arange(k, dtype=np.int32)), embedding_array(result.centroids)], schema=centroids_schema(dim)
    )
    st.atomic_write_table(table, storage.centroids_file)
    return CentroidsResult(
        path=str(storage.centroids_file),
        clusters=k,
        dim=dim,
        items=total,
        shards=len(counts),
        sample_rows=len(sample),
        train_rows=result.n_train,
        objective=result.objective,
        gpu=result.gpu,
        sample_seconds=sample_seconds,
        train_seconds=round(result.seconds, 2),
        device="cuda" if result.gpu else "cpu",
        device_note=kmeans_device_note(result.gpu),
    )


def sample_cap(budget: int, dim: int) -> int:
    """The largest training sample (rows) the memory budget allows: half of it, as fp32 rows plus faiss' copy."""
    return max(1, budget // 2 // max(1, dim * 4 * 2))


def _embedding_dim(embedding_files: Mapping[str, st.UPath]) -> int:
    """The vector width of the stored embeddings (from the first file's schema; 1 without files)."""
    for path in embedding_files.values():
        return int(st.read_schema(path).field("embedding").type.list_size)
    return 1


def _centroids_file(storage: st.Storage) -> st.UPath:
    if not storage.centroids_file.exists():
        raise MissingCentroidsError("no centroids yet: materialize `centroids` first")
    return storage.centroids_file


def centroids_count(storage: st.Storage) -> int:
    """k, the number of trained centroids (from the file's footer, without reading the centroids)."""
    return st.parquet_num_rows(_centroids_file(storage))


def load_centroids(storage: st.Storage) -> np.ndarray:
    """The trained centroids as a (k, d) float32 matrix."""
    table = st.read_table(_centroids_file(storage))
    return embedding_matrix(table.sort_by("cluster").column("centroid"))
