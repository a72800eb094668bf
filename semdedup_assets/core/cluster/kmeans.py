"""Spherical k-means with faiss, trained on a sample drawn shard by shard.

The sample is drawn per shard with an RNG seeded by (seed, shard key), so it does not
depend on the order in which shards are read, and only the sample is ever held in
memory: k * max_points_per_centroid rows, the same cap faiss applies itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import faiss
import numpy as np


def faiss_gpu_count() -> int:
    """How many GPUs this faiss build can use (0 for faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def kmeans_device_note(gpu: bool) -> str:
    """Why k-means ran on the device it did: faiss-gpu, or why faiss' CPU math ran here.

    Only faiss trains: a torch k-means on CUDA would be another algorithm (its own
    initialisation and sums), so without faiss-gpu a GPU worker runs the CPU math.
    """
    if gpu:
        return f"faiss-gpu ({faiss_gpu_count()} GPU(s) visible)"
    from semdedup_assets.core.config import visible_cuda_devices

    visible = visible_cuda_devices()
    try:
        import torch

        cuda = bool(torch.cuda.is_available())
    except ImportError:
        cuda = False
    if not cuda:
        return (
            "CUDA not available here"
            + (f" (CUDA_VISIBLE_DEVICES={visible}, but no CUDA device)" if visible else "")
            + ": faiss CPU k-means"
        )
    return "CUDA available but this faiss has no GPU support (faiss-cpu): faiss CPU k-means"


def shard_rng(seed: int, shard: str) -> np.random.Generator:
    """An RNG that depends only on the global seed and the shard key."""
    digest = hashlib.blake2b(f"{seed}:{shard}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def sample_target(k: int, max_points_per_centroid: int) -> int:
    """The training-sample size faiss would use for k centroids."""
    return k * max_points_per_centroid


def sample_rows(n_rows: int, fraction: float, seed: int, shard: str) -> np.ndarray:
    """Indices of the rows of one shard that enter the training sample (Bernoulli(fraction))."""
    if fraction >= 1.0:
        return np.arange(n_rows)
    return np.flatnonzero(shard_rng(seed, shard).random(n_rows) < fraction)


@dataclass
class KMeansResult:
    """Trained centroids and training statistics."""

    centroids: np.ndarray  # (k, d) float32, unit norm
    n_train: int
    objective: float
    seconds: float
    gpu: bool


def train_spherical_kmeans(
    sample: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    use_gpu: bool | str = "auto",
) -> KMeansResult:
    """Train spherical k-means (inner product, unit-norm centroids) on the sample."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty (n, d) sample, got shape {x.shape}")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k={k} must lie in [1, {x.shape[0]}] (the sample size)")
    gpu = faiss_gpu_count() > 0 if use_gpu == "auto" else bool(use_gpu)
    start = time.perf_counter()
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=gpu,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,
        verbose=False,
    )
    km.train(x)
    centroids = np.ascontiguousarray(km.centroids, dtype=np.float32)
    objective = float(km.obj[-1]) if len(km.obj) else float("nan")
    return KMeansResult(centroids, int(x.shape[0]), objective, time.perf_counter() - start, gpu)


def collect_sample(
    shards: Iterable[tuple[str, int]],
    read_rows: Callable[[str, np.ndarray], np.ndarray],
    target: int,
    seed: int,
) -> np.ndarray:
    """Draw the training sample across shards, reading only the sampled rows of each.

    `shards` yields (shard key, row count); `read_rows(key, rows)` returns those rows'
    embeddings. Shards are visited in key order, so the sample is order-independent.
    """
    items = sorted(shards)
    total = sum(n for _, n in items)
    if total == 0:
        raise ValueError("no embeddings to sample from")
    fraction = min(1.0, target / total)
    parts = [read_rows(key, sample_rows(n, fraction, seed, key)) for key, n in items]
    parts = [p for p in parts if len(p)]
    if not parts:  # a tiny fraction can draw nothing: fall back to every row of the first shard
        key, n = items[0]
        parts = [read_rows(key, np.arange(n))]
    return np.concatenate(parts).astype(np.float32, copy=False)
