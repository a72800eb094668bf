"""Tests for the pairwise rule: tiled vs dense oracle, ties, edge cases, the spec's example."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semdedup_assets.core.dedup.keep import keep_mask
from semdedup_assets.core.dedup.ordering import STRATEGIES
from semdedup_assets.core.dedup.pairwise import (
    cluster_semantic_duplicates,
    dense_max_sim,
    max_sim_tiled,
    rule_from_similarity,
)

EPS_VALUES = (0.0001, 0.001, 0.01, 0.05, 0.2)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Return x with unit-norm float32 rows."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _random_unit(n: int, d: int, seed: int) -> np.ndarray:
    """Return n random unit vectors in d dimensions."""
    return _normalise(np.random.default_rng(seed).standard_normal((n, d)))


def _planted(n: int, d: int, seed: int) -> np.ndarray:
    """Return n unit vectors made of groups of noisy copies of a few bases, shuffled.

    Noise levels are spread so that copies land on both sides of every eps in EPS_VALUES.
    """
    rng = np.random.default_rng(seed)
    n_bases = max(1, n // 6)
    bases = rng.standard_normal((n_bases, d))
    bases /= np.linalg.norm(bases, axis=1, keepdims=True)
    noise_levels = np.array([0.002, 0.01, 0.03, 0.07, 0.15, 0.3, 0.6])
    owner = rng.integers(0, n_bases, n)
    sigma = rng.choice(noise_levels, n) / np.sqrt(d)
    x = bases[owner] + rng.standard_normal((n, d)) * sigma[:, None]
    return _normalise(x)


def _second_best_gap(x: np.ndarray) -> np.ndarray:
    """Return, per column j >= 2, the gap between the best and second-best i < j (float64)."""
    s = x.astype(np.float64) @ x.astype(np.float64).T
    n = len(x)
    gaps = np.full(n, np.inf)
    for j in range(2, n):
        col = np.sort(s[:j, j])
        gaps[j] = col[-1] - col[-2]
    return gaps


def _check_against_dense(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Assert tiled == dense (M within 1e-6, duplicate_of where the max is unique)."""
    m_t, d_t = max_sim_tiled(x, block_size=block)
    m_d, d_d = dense_max_sim(x)
    assert m_t.dtype == np.float32 and d_t.dtype == np.int64
    assert m_t.shape == d_t.shape == (len(x),)
    np.testing.assert_allclose(m_t, m_d, atol=1e-6, rtol=0)
    unique = _second_best_gap(x) > 1e-5
    assert unique.sum() >= len(x) // 2  # the comparison below is not vacuous
    np.testing.assert_array_equal(d_t[unique], d_d[unique])
    return m_t, d_t


@pytest.mark.parametrize(
    ("n", "block"),
    [(2, 1), (9, 1), (60, 1), (10, 7), (50, 7), (131, 7), (64, 64), (65, 64), (300, 64), (517, 64), (300, 1024)],
)
def test_tiled_matches_dense_random(n: int, block: int) -> None:
    """On random unit vectors the tiled rule equals the dense oracle."""
    _check_against_dense(_random_unit(n, 32, seed=n + block), block)


@pytest.mark.parametrize(("n", "block"), [(60, 1), (97, 7), (250, 7), (300, 64), (451, 64)])
def test_tiled_matches_dense_planted(n: int, block: int) -> None:
    """On planted near-duplicates the tiled rule equals the dense oracle and finds them."""
    x = _planted(n, 48, seed=n * 31 + block)
    m_t, _ = _check_against_dense(x, block)
    # The data really contains duplicates at small eps and non-duplicates at large eps.
    assert (m_t > 1 - 0.001).sum() > 0
    assert (m_t <= 1 - 0.2).sum() > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("n", "block"), [(83, 1), (200, 7), (389, 64)])
def test_cluster_semantic_duplicates_matches_dense(strategy: str, n: int, block: int) -> None:
    """Through cluster_semantic_duplicates, keep sets equal the dense oracle's at every eps."""
    rng = np.random.default_rng(n + block)
    x = _planted(n, 40, seed=n + 7 * block)
    ids = [f"doc-{k:05d}" for k in rng.permutation(n)]
    sims = np.round(rng.uniform(0.3, 0.9, n), 2)  # coarse: ties resolved by id
    out = cluster_semantic_duplicates(ids, x, sims, strategy=strategy, seed=5, block_size=block)
    assert set(out) == {"order", "rank", "max_sim", "duplicate_of"}
    order = out["order"]
    assert sorted(order.tolist()) == list(range(n))
    assert out["rank"].tolist() == list(range(n))
    assert out["max_sim"].dtype == np.float64

    m_d, d_d = dense_max_sim(x[order])
    np.testing.assert_allclose(out["max_sim"], m_d, atol=1e-6, rtol=0)
    # duplicate_of is an index into the inputs: map the oracle's positions the same way.
    unique = _second_best_gap(x[order]) > 1e-5
    expected_dup = np.where(d_d >= 0, order[np.maximum(d_d, 0)], -1)
    np.testing.assert_array_equal(out["duplicate_of"][unique], expected_dup[unique])
    assert out["duplicate_of"][0] == -1

    removed_somewhere = False
    for eps in EPS_VALUES:
        kept_tiled = set(order[keep_mask(out["max_sim"], eps)].tolist())
        kept_dense = set(order[keep_mask(m_d, eps)].tolist())
        assert kept_tiled == kept_dense, eps
        removed_somewhere |= len(kept_tiled) < n
    assert removed_somewhere


def test_duplicate_of_points_back_into_inputs() -> None:
    """duplicate_of indexes the caller's rows, and the pointed-to row is really the match."""
    x = _planted(120, 32, seed=3)
    sims = np.random.default_rng(3).uniform(0, 1, 120)
    ids = [f"r{k}" for k in range(120)]
    out = cluster_semantic_duplicates(ids, x, sims, strategy="hard", block_size=16)
    order = out["order"]
    for pos in range(1, 120):
        j = order[pos]
        i = out["duplicate_of"][pos]
        earlier = set(order[:pos].tolist())
        assert i in earlier
        assert abs(float(x[i] @ x[j]) - out["max_sim"][pos]) < 1e-6


def test_cross_block_pairs_are_compared() -> None:
    """A duplicate pair in the first and last blocks is found (the reference's chunk bug)."""
    x = _random_unit(100, 16, seed=9)
    x[99] = x[0]
    m, d = max_sim_tiled(x, block_size=7)
    assert d[99] == 0
    assert m[99] == pytest.approx(1.0, abs=1e-6)


def test_exact_ties_pick_earliest() -> None:
    """Identical vectors: every copy points at the first copy, within and across blocks."""
    # Entries of +-0.5 over four coordinates: every dot product is exact in fp32,
    # so the ties are real ties whatever order the BLAS sums in.
    d = 16
    a = np.zeros(d, dtype=np.float32)
    a[[0, 3, 5, 9]] = [0.5, -0.5, 0.5, 0.5]
    b = np.zeros(d, dtype=np.float32)
    b[[1, 2, 6, 10]] = 0.5
    rows = [b, a, b, a, a, b] + [a] * 14 + [b] * 5
    x = np.stack(rows)
    for block in (1, 3, 4, 7, 64):
        m, dup = max_sim_tiled(x, block_size=block)
        first_a, first_b = 1, 0
        for j in range(1, len(rows)):
            if j == first_a:
                # a is orthogonal to b: M = 0 achieved first by row 0.
                assert m[j] == 0.0 and dup[j] == 0
            else:
                assert m[j] == 1.0
                assert dup[j] == (first_a if rows[j] is a else first_b), (block, j)


def test_exact_ties_through_cluster_api_broken_by_id() -> None:
    """Identical vectors with identical centroid similarity: the smallest id comes first and wins."""
    v = np.zeros((5, 8), dtype=np.float32)
    v[:, 2] = 1.0
    ids = ["e", "c", "a", "d", "b"]
    out = cluster_semantic_duplicates(ids, v, np.full(5, 0.7), strategy="hard", block_size=2)
    assert [ids[k] for k in out["order"]] == ["a", "b", "c", "d", "e"]
    assert out["duplicate_of"].tolist() == [-1, 2, 2, 2, 2]  # all point at input row 2 ("a")
    assert out["max_sim"].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_identical_random_vectors_are_found() -> None:
    """Repeated copies of a random unit vector are found with M ~= 1 among their group."""
    other = _random_unit(30, 64, seed=5)
    v = _random_unit(1, 64, seed=6)
    x = np.concatenate([other[:10], np.repeat(v, 40, axis=0), other[10:]])
    m, dup = max_sim_tiled(x, block_size=16)
    assert np.all(np.abs(m[11:50] - 1.0) < 1e-6)
    assert np.all((dup[11:50] >= 10) & (dup[11:50] < np.arange(11, 50)))


def test_empty_and_singleton() -> None:
    """n=0 gives empty arrays; n=1 gives M=[0], duplicate_of=[-1]."""
    m, d = max_sim_tiled(np.zeros((0, 8), dtype=np.float32))
    assert m.shape == d.shape == (0,) and m.dtype == np.float32 and d.dtype == np.int64
    m, d = max_sim_tiled(_random_unit(1, 8, seed=0))
    assert m.tolist() == [0.0] and d.tolist() == [-1]
    m, d = dense_max_sim(np.zeros((0, 8), dtype=np.float32))
    assert m.shape == d.shape == (0,)
    out = cluster_semantic_duplicates([], np.zeros((0, 8), dtype=np.float32), np.array([]))
    assert all(v.shape == (0,) for v in out.values())
    out = cluster_semantic_duplicates(["only"], _random_unit(1, 8, seed=1), np.array([0.5]))
    assert out["max_sim"].tolist() == [0.0] and out["duplicate_of"].tolist() == [-1]
    assert out["order"].tolist() == [0] and out["rank"].tolist() == [0]


def test_negative_max_is_kept() -> None:
    """For j > 0 the true max is returned even when negative; only M[0] is 0."""
    v = _random_unit(1, 8, seed=2)[0]
    x = np.stack([v, -v])
    m, d = max_sim_tiled(x, block_size=1)
    assert m[0] == 0.0 and m[1] == pytest.approx(-1.0, abs=1e-6)
    assert d.tolist() == [-1, 0]


def test_torch_input_and_float64_input() -> None:
    """A torch tensor or a float64 array gives the same result as float32 numpy."""
    x = _planted(90, 24, seed=8)
    ref_m, ref_d = max_sim_tiled(x, block_size=32)
    m, d = max_sim_tiled(torch.from_numpy(x), block_size=32, device="cpu")
    np.testing.assert_array_equal(m, ref_m)
    np.testing.assert_array_equal(d, ref_d)
    m64, _d64 = max_sim_tiled(x.astype(np.float64), block_size=32)
    np.testing.assert_array_equal(m64, ref_m)
    out = cluster_semantic_duplicates([str(k) for k in range(90)], torch.from_numpy(x), np.zeros(90), block_size=32)
    out_np = cluster_semantic_duplicates([str(k) for k in range(90)], x, np.zeros(90), block_size=32)
    np.testing.assert_array_equal(out["max_sim"], out_np["max_sim"])
    np.testing.assert_array_equal(out["duplicate_of"], out_np["duplicate_of"])


def test_block_size_does_not_change_result() -> None:
    """Different block sizes give the same M (to fp32 rounding) and the same duplicate_of."""
    x = _planted(200, 32, seed=12)
    ref_m, ref_d = max_sim_tiled(x, block_size=200)
    unique = _second_best_gap(x) > 1e-5
    for block in (1, 5, 13, 64, 199, 4096):
        m, d = max_sim_tiled(x, block_size=block)
        np.testing.assert_allclose(m, ref_m, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(d[unique], ref_d[unique])


def test_bad_arguments() -> None:
    """Bad shapes and block sizes raise ValueError."""
    with pytest.raises(ValueError):
        max_sim_tiled(_random_unit(4, 8, seed=0), block_size=0)
    with pytest.raises(ValueError):
        max_sim_tiled(np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        rule_from_similarity(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        cluster_semantic_duplicates(["a", "b"], _random_unit(3, 8, seed=0), np.zeros(2))


def test_spec_worked_example() -> None:
    """The spec's example: M = [0, .995, .992, .30], duplicate_of [-, a, b, b]."""
    a, b, c, d = range(4)
    sim = np.eye(4)
    for (i, j), s in {(a, b): 0.995, (b, c): 0.992, (a, c): 0.985, (a, d): 0.20, (b, d): 0.30, (c, d): 0.10}.items():
        sim[i, j] = sim[j, i] = s
    m, dup = rule_from_similarity(sim)
    assert m.dtype == np.float64
    assert m.tolist() == [0.0, 0.995, 0.992, 0.30]
    assert dup.tolist() == [-1, a, b, b]
    names = np.array(["a", "b", "c", "d"])
    assert names[keep_mask(m, 0.01)].tolist() == ["a", "d"]
    assert names[~keep_mask(m, 0.01)].tolist() == ["b", "c"]
    # threshold 0.995: 0.995 > 0.995 is false, so all four are kept
    assert names[keep_mask(m, 0.005)].tolist() == ["a", "b", "c", "d"]


def test_chain_removal() -> None:
    """A~B, B~C, A not~C: both B and C are removed (C resembles the removed B)."""
    d = 64
    u, w = _random_unit(2, d, seed=1)
    w = w - (w @ u) * u
    w /= np.linalg.norm(w)  # w orthogonal to u
    t = 0.1  # small rotation steps: cos(A,B)=cos(B,C)=cos(0.1)=0.995, cos(A,C)=cos(0.2)=0.980
    a_, b_, c_ = (np.cos(k * t) * u + np.sin(k * t) * w for k in range(3))
    x = np.stack([a_, b_, c_]).astype(np.float32)
    m, dup = max_sim_tiled(x, block_size=2)
    assert dup.tolist() == [-1, 0, 1]
    assert float(x[0] @ x[2]) < 1 - 0.01  # A and C alone would not be duplicates
    assert keep_mask(m, 0.01).tolist() == [True, False, False]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    """On CUDA the tiled rule gives the same result as on CPU."""
    x = _planted(3000, 128, seed=21)
    m_cpu, d_cpu = max_sim_tiled(x, block_size=256)
    m_gpu, d_gpu = max_sim_tiled(x, block_size=256, device="cuda")
    np.testing.assert_allclose(m_gpu, m_cpu, atol=1e-5, rtol=0)
    gap_ok = _second_best_gap(x) > 1e-4
    np.testing.assert_array_equal(d_gpu[gap_ok], d_cpu[gap_ok])


THRESHOLDS = tuple(1.0 - e for e in (0.0001, 0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3))


def _near_thresholds(n: int, d: int, seed: int) -> np.ndarray:
    """Unit rows whose nearest earlier neighbours sit at cosines close to every threshold.

    Each row is a base plus noise scaled so that 1 - cos lands on one of the eps values
    times a factor in [0.9, 1.1]: many max_sim values fall inside the low-precision error
    bound of a threshold, which is where an unchecked fp16/bf16 kernel would decide wrongly.
    """
    rng = np.random.default_rng(seed)
    bases = _random_unit(max(1, n // 8), d, seed + 1).astype(np.float64)
    owner = rng.integers(0, len(bases), n)
    one_minus_cos = rng.choice(1.0 - np.array(THRESHOLDS), n) * rng.uniform(0.9, 1.1, n)
    noise = rng.standard_normal((n, d))
    noise -= (noise * bases[owner]).sum(1, keepdims=True) * bases[owner]  # orthogonal to the base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = 1.0 - one_minus_cos
    x = bases[owner] * cos[:, None] + noise * np.sqrt(1.0 - cos**2)[:, None]
    return _normalise(x)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("block", [7, 64])
def test_low_precision_decisions_equal_fp32(precision: str, block: int) -> None:
    """fp16/bf16 tiles plus the fp32 re-check give fp32's decision at every threshold."""
    x = _near_thresholds(600, 48, seed=3)
    m32, d32 = max_sim_tiled(x, block_size=block)
    stats: dict[str, float] = {}
    m, d = max_sim_tiled(x, block_size=block, precision=precision, thresholds=THRESHOLDS, stats=stats)
    for t in THRESHOLDS:
        np.testing.assert_array_equal(m > t, m32 > t, err_msg=f"decisions differ at threshold {t}")
    bound = stats["error_bound"]
    assert 0 < bound < (0.02 if precision == "bf16" else 0.003)
    assert np.abs(m - m32).max() <= bound
    # Re-checked rows carry the exact fp32 max and argmax; there must be some for the test to bite.
    rechecked = np.abs(m - m32) <= 1e-6
    assert stats["rechecked_rows"] > 20 and rechecked.sum() >= stats["rechecked_rows"]
    near = np.array([any(abs(v - t) <= bound for t in THRESHOLDS) for v in m])
    np.testing.assert_array_equal(d[near], d32[near])
    # A removed item's duplicate_of is an earlier member that is truly above the threshold.
    s32 = (x[d[1:]] * x[1:]).sum(1)
    for t in THRESHOLDS:
        removed = m[1:] > t
        assert (s32[removed] > t - 1e-6).all()


def test_without_the_recheck_low_precision_decides_wrongly() -> None:
    """Control: the same data through bare bf16 tiles (no threshold near) flips decisions."""
    x = _near_thresholds(600, 48, seed=3)
    m32, _ = max_sim_tiled(x, block_size=64)
    stats: dict[str, float] = {}
    m_bare, _ = max_sim_tiled(x, block_size=64, precision="bf16", thresholds=(5.0,), stats=stats)
    assert stats["rechecked_rows"] == 0
    flipped = sum(int(((m_bare > t) != (m32 > t)).sum()) for t in THRESHOLDS)
    assert flipped > 0


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_error_bound_holds_for_random_pairs(precision: str) -> None:
    """|s_low - s_fp32| never exceeds the stated bound (CPU kernels round the output too)."""
    from semdedup_assets.core.dedup.pairwise import low_precision_error_bound

    x = _planted(800, 384, seed=9)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    t = torch.from_numpy(x)
    s_low = (t.to(dtype) @ t.to(dtype).T).float()
    s32 = t @ t.T
    err = float((s_low - s32).abs().max())
    bound = low_precision_error_bound(precision, 384, float(t.norm(dim=1).max()), fp32_output=False)
    assert 0 < err <= bound


def test_low_precision_needs_thresholds_and_a_known_precision() -> None:
    x = _random_unit(10, 8, seed=0)
    with pytest.raises(ValueError, match="thresholds"):
        max_sim_tiled(x, precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        max_sim_tiled(x, precision="int8", thresholds=(0.9,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_low_precision_decisions_equal_fp32(precision: str) -> None:
    """On CUDA (tensor cores, fp32 output), fp16/bf16 + re-check decides exactly as the fp32 kernel."""
    x = np.concatenate([_near_thresholds(12000, 384, seed=4), _planted(8000, 384, seed=5)])
    m32, _d32 = max_sim_tiled(x, block_size=1024, device="cuda")
    stats: dict[str, float] = {}
    m, _d = max_sim_tiled(x, block_size=1024, device="cuda", precision=precision, thresholds=THRESHOLDS, stats=stats)
    for t in THRESHOLDS:
        np.testing.assert_array_equal(m > t, m32 > t, err_msg=f"decisions differ at threshold {t}")
    assert np.abs(m - m32).max() <= stats["error_bound"]
    assert stats["rechecked_rows"] > 0


def test_tiles_run_single_threaded_and_the_bits_do_not_depend_on_the_thread_count(monkeypatch) -> None:
    """A 1-CPU Ray task and a many-core process write the same bucket bytes: every tile GEMM of the tiled
    rule, of dedup_table's clusters and of multi-probe sees one intra-op thread (parallel.map_batches),
    whatever torch's count, and the count is restored."""
    import pyarrow as pa

    from semdedup_assets.core.dedup import pairwise
    from semdedup_assets.core.dedup.buckets import dedup_table
    from semdedup_assets.core.dedup.multiprobe import multiprobe_max_sim
    from semdedup_assets.core.io.tables import embedding_array

    seen: list[int] = []
    real = pairwise._matmul_fp32_out

    def spy(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, bool]:
        seen.append(torch.get_num_threads())
        return real(a, b)

    monkeypatch.setattr(pairwise, "_matmul_fp32_out", spy)
    rng = np.random.default_rng(3)
    x = _normalise(rng.normal(size=(700, 24)))
    clusters = np.repeat(np.arange(7), 100)
    table = pa.table(
        {
            "id": [f"i{i:04d}" for i in range(700)],
            "shard": ["s"] * 700,
            "cluster": clusters,
            "sim_to_centroid": rng.random(700),
            "embedding": embedding_array(x, "float32"),
        }
    )
    probes = np.stack([clusters, (clusters + 1) % 7], axis=1)
    previous = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            seen.clear()
            tiled = max_sim_tiled(x, block_size=64)
            result, _ = dedup_table(table, "hard", 0, 64, "cpu", precision="fp16", thresholds=(0.99, 0.9))
            probed = multiprobe_max_sim(x, clusters, np.arange(700), np.arange(700), probes, 64, "cpu")
            assert torch.get_num_threads() == threads
            assert seen and set(seen) == {1}, seen
            runs.append(
                [
                    tiled[0].tobytes(),
                    tiled[1].tobytes(),
                    str(result.to_pylist()),
                    probed[0].tobytes(),
                    probed[1].tobytes(),
                ]
            )
    finally:
        torch.set_num_threads(previous)
    assert runs[0] == runs[1] == runs[2]
