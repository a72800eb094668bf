"""The kernels of the outliers and representatives selections (core/select/typical.py) against plain references."""

from __future__ import annotations

import numpy as np
import pytest

from semdedup_assets.core.select.typical import knn_typicality, mmr_select, proportional_quotas


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_typicality_is_the_mean_similarity_to_the_nearest_members() -> None:
    x = unit(np.random.default_rng(0), 57, 8)
    g = (x @ x.T).astype(np.float64)
    np.fill_diagonal(g, -np.inf)
    for k in (1, 5, 56, 80):  # 80 > 56 others: the mean over all 56
        top = np.sort(g, axis=1)[:, ::-1][:, : min(k, 56)]
        np.testing.assert_allclose(knn_typicality(x, k, block=16), top.mean(axis=1), rtol=0, atol=1e-6)
    assert knn_typicality(x[:1], 5).tolist() == [0.0]  # a lone member: no neighbour at all
    with pytest.raises(ValueError, match="neighbours must be >= 1"):
        knn_typicality(x, 0)


def test_typicality_is_deterministic_and_does_not_depend_on_the_row_order() -> None:
    x = unit(np.random.default_rng(1), 300, 16)
    once = knn_typicality(x, 10, block=64)
    assert once.tobytes() == knn_typicality(x, 10, block=64).tobytes()
    perm = np.random.default_rng(2).permutation(len(x))
    np.testing.assert_allclose(knn_typicality(x[perm], 10, block=64), once[perm], rtol=0, atol=1e-6)


def test_proportional_quotas_are_exact_and_largest_remainder() -> None:
    sizes = np.array([50, 30, 0, 15, 5])
    for total in range(0, 101):
        q = proportional_quotas(total, sizes)
        assert int(q.sum()) == total and (q <= sizes).all() and (q >= 0).all()
        # Hamilton: each quota is the floor or the ceiling of its exact share.
        exact = total * sizes / sizes.sum()
        assert (q >= np.floor(exact)).all() and (q <= np.ceil(exact)).all()
    assert proportional_quotas(100, sizes).tolist() == sizes.tolist()
    assert proportional_quotas(2, sizes).tolist() == [1, 1, 0, 0, 0]  # fewer than clusters: the largest first
    assert proportional_quotas(2, np.array([3, 3, 3])).tolist() == [1, 1, 0]  # equal remainders: by cluster
    with pytest.raises(ValueError, match="cannot take 101 of 100"):
        proportional_quotas(101, sizes)


def test_mmr_relevance_only_diversity_only_and_ties() -> None:
    rng = np.random.default_rng(3)
    x = unit(rng, 40, 8)
    rel = rng.uniform(size=40)
    top = mmr_select(x, rel, 7, 0.0)
    assert top.tolist() == np.argsort(-rel, kind="stable")[:7].tolist()  # diversity 0: the 7 most relevant
    for lam in (0.3, 0.7, 1.0):
        pick = mmr_select(x, rel, 12, lam)
        assert len(set(pick.tolist())) == 12 and pick[0] == int(np.argmax(rel))
    assert mmr_select(x, rel, 99, 0.5).size == 40 and mmr_select(x, rel, 0, 0.5).size == 0
    # Two tight groups, the first more relevant: diversity reaches the second group on the second pick.
    a = np.tile(x[0], (5, 1)) + 0.001 * rng.normal(size=(5, 8)).astype(np.float32)
    b = np.tile(-x[0], (5, 1)) + 0.001 * rng.normal(size=(5, 8)).astype(np.float32)
    pair = np.concatenate([a, b]) / np.linalg.norm(np.concatenate([a, b]), axis=1, keepdims=True)
    relevance = np.array([1.0] * 5 + [0.9] * 5)
    assert mmr_select(pair, relevance, 2, 0.0).tolist() == [0, 1]  # ties: the lowest index
    first, second = mmr_select(pair, relevance, 2, 0.5).tolist()
    assert first == 0 and second >= 5


def test_typicality_memory_is_one_tile_not_the_cluster_squared(monkeypatch: pytest.MonkeyPatch) -> None:
    """4x the members: the similarity tile stays at TILE_ELEMENTS entries (the rows shrink), so the peak
    beyond the cluster's own rows does not grow with m^2."""
    import tracemalloc

    from semdedup_assets.core.select import typical

    monkeypatch.setattr(typical, "TILE_ELEMENTS", 1 << 16)  # 256 KiB of float32 similarities
    peaks = []
    for m in (512, 2048):
        x = unit(np.random.default_rng(4), m, 8)
        tracemalloc.start()
        knn_typicality(x, 10)
        peaks.append(tracemalloc.get_traced_memory()[1] - x.nbytes)
        tracemalloc.stop()
    tile = (1 << 16) * 4
    assert all(p < 2.5 * tile for p in peaks), peaks  # the dense m x m would be 16 MiB at m = 2048
    assert peaks[1] < 1.5 * peaks[0], peaks
