"""Spherical k-means on a sample, and nearest-centroid assignment."""

from __future__ import annotations

import numpy as np
import pytest

from semdedup_assets.core.cluster.assign import (
    assign,
    bucket_cluster_range,
    bucket_keys,
    bucket_of,
    bucket_row_slices,
    iter_cluster_ranges,
    touched_buckets,
)
from semdedup_assets.core.cluster.kmeans import collect_sample, sample_rows, train_spherical_kmeans


def _blobs(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    labels = rng.integers(0, k, size=n)
    x = centers[labels] + 0.05 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_training_is_deterministic_and_spherical() -> None:
    x, _ = _blobs(4000, 16, 8)
    a = train_spherical_kmeans(x, 8, niter=10, seed=3)
    b = train_spherical_kmeans(x, 8, niter=10, seed=3)
    assert a.centroids.tobytes() == b.centroids.tobytes()
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1.0, atol=1e-5)
    c = train_spherical_kmeans(x, 8, niter=10, seed=4)
    assert c.centroids.tobytes() != a.centroids.tobytes()


def test_assignment_is_the_nearest_centroid_by_inner_product() -> None:
    x, labels = _blobs(3000, 16, 6, seed=1)
    km = train_spherical_kmeans(x, 6, niter=20, seed=0)
    clusters, sims = assign(x, km.centroids, batch=700)
    # Members of one tight blob never straddle more than two clusters (k-means may split one blob).
    assert max(len(np.unique(clusters[labels == lab])) for lab in range(6)) <= 2
    np.testing.assert_allclose(sims, np.einsum("ij,ij->i", x, km.centroids[clusters]), atol=1e-5)
    assert (x @ km.centroids.T).argmax(axis=1).tolist() == clusters.tolist()


def _nearest_gap(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    top2 = np.sort(x.astype(np.float64) @ centroids.astype(np.float64).T, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def test_the_torch_search_of_cuda_devices_finds_faiss_nearest_centroid() -> None:
    # The CUDA path's code (a torch GEMM and argmax), run on the CPU here: faiss' answer wherever
    # the two nearest centroids are not within float32 rounding of each other.
    from semdedup_assets.core.cluster.assign import _nearest_faiss, _nearest_torch

    x, _ = _blobs(3000, 16, 6, seed=2)
    centroids = train_spherical_kmeans(x, 12, niter=10, seed=0).centroids
    by_torch, by_faiss = _nearest_torch(centroids, "cpu")(x), _nearest_faiss(centroids)(x)
    assert by_torch.shape == by_faiss.shape == (3000, 1)
    clear = _nearest_gap(x, centroids) > 1e-5
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(by_torch[clear], by_faiss[clear])


@pytest.mark.gpu
def test_cuda_assignment_matches_the_cpu_one() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    x, _ = _blobs(20000, 64, 20, seed=3)
    centroids = train_spherical_kmeans(x, 50, niter=10, seed=0).centroids
    cpu, gpu = assign(x, centroids), assign(x, centroids, device="cuda")
    clear = _nearest_gap(x, centroids) > 1e-5
    np.testing.assert_array_equal(gpu[0][clear], cpu[0][clear])
    same = gpu[0] == cpu[0]
    assert gpu[1][same].tobytes() == cpu[1][same].tobytes()  # the same float64 row kernel on either device


def test_sample_is_independent_of_shard_order() -> None:
    rng = np.random.default_rng(0)
    shards = {f"s{i}": rng.normal(size=(100 + i, 4)).astype(np.float32) for i in range(5)}
    read = lambda k, rows: shards[k][rows]  # noqa: E731
    a = collect_sample([(k, len(v)) for k, v in shards.items()], read, 200, seed=1)
    b = collect_sample([(k, len(v)) for k, v in reversed(list(shards.items()))], read, 200, seed=1)
    assert a.tobytes() == b.tobytes()
    assert 120 < len(a) < 280
    assert len(collect_sample([(k, len(v)) for k, v in shards.items()], read, 10_000, seed=1)) == sum(
        map(len, shards.values())
    )
    assert sample_rows(10, 1.0, 0, "s").tolist() == list(range(10))


def test_bad_k() -> None:
    x, _ = _blobs(10, 4, 2)
    with pytest.raises(ValueError, match="k=11"):
        train_spherical_kmeans(x, 11)


def test_buckets_cover_every_cluster_once() -> None:
    for k, b in ((10, 3), (3, 5), (1000, 16), (1, 1)):
        covered = [c for _, lo, hi in iter_cluster_ranges(k, b) for c in range(lo, hi)]
        assert covered == list(range(k))
    assert bucket_keys(3) == ["000", "001", "002"] and len(bucket_keys(1500)[0]) == 4
    assert bucket_cluster_range(1, 10, 3) == (3, 6)


def test_bucket_of_inverts_the_ranges() -> None:
    for k, b in ((10, 3), (3, 5), (1000, 16), (1, 1), (155, 16), (7, 7)):
        for bucket, lo, hi in iter_cluster_ranges(k, b):
            assert (bucket_of(np.arange(lo, hi), k, b) == bucket).all()
    assert touched_buckets(np.array([0, 9, 9]), 10, 3) == {"000", "002"}


def test_bucket_row_slices_split_sorted_rows_at_bucket_boundaries() -> None:
    clusters = np.array([0, 0, 1, 4, 4, 5, 9])  # k=10, 3 buckets: [0,3) [3,6) [6,10)
    assert bucket_row_slices(clusters, 10, 3) == [(0, 3), (3, 3), (6, 1)]
    assert bucket_row_slices(np.array([7, 8]), 10, 3) == [(0, 2)]
    assert bucket_row_slices(np.array([], dtype=np.int32), 10, 3) == []
    with pytest.raises(ValueError, match="sorted"):
        bucket_row_slices(np.array([5, 1]), 10, 3)


def test_sim_to_centroid_does_not_depend_on_batching() -> None:
    """Identical rows get bit-identical sims wherever they sit and however rows are batched."""
    rng = np.random.default_rng(4)
    cents = rng.standard_normal((37, 96)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    x = rng.standard_normal((3000, 96)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[2500:] = x[:500]  # exact copies, far apart
    whole_c, whole_s = assign(x, cents, batch=4096)
    parts = [assign(x[a:b], cents, batch=b - a) for a, b in ((0, 7), (7, 1000), (1000, 2999), (2999, 3000))]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole_c)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole_s)
    np.testing.assert_array_equal(whole_s[2500:], whole_s[:500])
    np.testing.assert_allclose(whole_s, (x * cents[whole_c]).sum(1), atol=1e-6)


def test_sim_to_centroid_is_the_float64_dot_product_rounded_once() -> None:
    """sim_to_centroid keeps its float64 semantics: keep-list order inside a cluster depends on it,
    so a float32 accumulation (which moves most sims by an ulp) would change keep-lists on near-ties."""
    import math

    rng = np.random.default_rng(7)
    cents = rng.standard_normal((11, 384)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    x = rng.standard_normal((500, 384)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    clusters, sims = assign(x, cents, batch=128)
    # float32 products are exact in float64; fsum adds them exactly: one rounding to float64, one to float32.
    exact = np.array([math.fsum(p) for p in x.astype(np.float64) * cents[clusters].astype(np.float64)])
    np.testing.assert_array_equal(sims, exact.astype(np.float32))
