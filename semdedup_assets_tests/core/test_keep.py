"""Tests for keep decisions: strict threshold, eps curves, target sizes, eps parsing."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from semdedup_assets.core.dedup.keep import (
    EpsCurveAccumulator,
    duplicate_mask,
    eps_curve,
    keep_for_target,
    keep_mask,
    parse_eps_list,
)


def test_threshold_is_strict() -> None:
    """max_sim exactly at 1 - eps is kept; anything above it is removed."""
    m = np.array([0.0, 0.99, np.nextafter(0.99, 1.0), 0.995, 1.0, -0.3])
    assert keep_mask(m, 0.01).tolist() == [True, True, False, False, False, True]
    assert duplicate_mask(m, 0.01).tolist() == [False, False, True, True, True, False]
    # 1 - 0.005 == 0.995 in float64, so 0.995 is kept at eps=0.005
    assert keep_mask(np.array([0.995]), 0.005).tolist() == [True]


def test_masks_are_complementary_and_computed_in_float64() -> None:
    """keep_mask is the negation of duplicate_mask; float32 input is compared in float64."""
    rng = np.random.default_rng(0)
    m = rng.uniform(0.9, 1.0, 1000).astype(np.float32)
    for eps in (0.0001, 0.001, 0.01, 0.05):
        np.testing.assert_array_equal(keep_mask(m, eps), ~duplicate_mask(m, eps))
        np.testing.assert_array_equal(keep_mask(m, eps), m.astype(np.float64) <= 1.0 - eps)
    # float32(0.99) is 0.99000001...: above the float64 threshold 0.99, so removed.
    assert duplicate_mask(np.array([0.99], dtype=np.float32), 0.01).tolist() == [True]


def test_eps_curve_counts_and_monotonicity() -> None:
    """Kept counts equal keep_mask sums, and grow with eps (a looser threshold keeps fewer)."""
    rng = np.random.default_rng(1)
    m = np.concatenate([[0.0], rng.uniform(0.5, 1.0, 500), [0.99, 0.99, 1.0]])
    eps_values = [0.0001, 0.001, 0.01, 0.05, 0.2, 0.3]
    rows = eps_curve(m, eps_values)
    assert [r["eps"] for r in rows] == eps_values
    for row in rows:
        assert row["kept"] == int(keep_mask(m, row["eps"]).sum())
        assert row["kept"] + row["removed"] == len(m)
        assert row["kept_fraction"] == pytest.approx(row["kept"] / len(m))
    kept = [r["kept"] for r in rows]
    assert all(a >= b for a, b in itertools.pairwise(kept))
    assert kept[0] > kept[-1]  # the curve is not flat on this data


def test_eps_curve_empty_input() -> None:
    """An empty input keeps nothing and removes nothing, with kept_fraction 1.0."""
    rows = eps_curve(np.array([]), [0.01, 0.1])
    assert rows == [
        {"eps": 0.01, "kept": 0, "removed": 0, "kept_fraction": 1.0},
        {"eps": 0.1, "kept": 0, "removed": 0, "kept_fraction": 1.0},
    ]


def test_accumulator_equals_eps_curve() -> None:
    """Feeding chunks (including empty ones) gives the same rows as one eps_curve call."""
    rng = np.random.default_rng(2)
    chunks = [rng.uniform(0.7, 1.0, k) for k in (0, 13, 250, 1, 0, 77)]
    eps_values = [0.3, 0.001, 0.05, 0.01]
    acc = EpsCurveAccumulator(eps_values)
    for chunk in chunks:
        acc.update(chunk.astype(np.float32))
    expected = eps_curve(np.concatenate(chunks).astype(np.float32), eps_values)
    assert acc.rows() == expected
    assert acc.total == sum(len(c) for c in chunks)
    assert EpsCurveAccumulator([0.01]).rows()[0]["kept_fraction"] == 1.0


def test_keep_for_target_picks_smallest_max_sim_ties_by_id() -> None:
    """The n least-duplicated items are kept; equal max_sim is cut by id order."""
    ids = ["e", "d", "c", "b", "a"]
    m = np.array([0.1, 0.9, 0.5, 0.5, 0.95])
    assert keep_for_target(ids, m, n=1).tolist() == [0]
    # the two 0.5s tie: "b" (index 3) comes before "c" (index 2)
    assert keep_for_target(ids, m, n=2).tolist() == [0, 3]
    assert keep_for_target(ids, m, n=3).tolist() == [0, 2, 3]
    assert keep_for_target(ids, m, n=0).tolist() == []
    assert keep_for_target(ids, m, n=5).tolist() == [0, 1, 2, 3, 4]
    assert keep_for_target(ids, m, fraction=0.4).tolist() == [0, 3]


def test_keep_for_target_is_monotone_and_matches_threshold() -> None:
    """Larger targets keep supersets; a target equal to an eps's kept count gives its keep set."""
    rng = np.random.default_rng(3)
    n = 400
    ids = [f"id{k:04d}" for k in rng.permutation(n)]
    m = rng.uniform(0.8, 1.0, n)
    previous: set[int] = set()
    for target in (0, 10, 50, 200, 399, 400):
        kept = set(keep_for_target(ids, m, n=target).tolist())
        assert len(kept) == target
        assert previous <= kept
        previous = kept
    for eps in (0.001, 0.01, 0.05):
        mask = keep_mask(m, eps)
        kept = keep_for_target(ids, m, n=int(mask.sum()))
        np.testing.assert_array_equal(kept, np.flatnonzero(mask))


def test_keep_for_target_validation() -> None:
    """Exactly one of n/fraction, within range, else ValueError."""
    ids, m = ["a", "b"], np.array([0.1, 0.2])
    for kwargs in (
        {},
        {"n": 1, "fraction": 0.5},
        {"n": 3},
        {"n": -1},
        {"fraction": 1.5},
        {"fraction": -0.1},
        {"n": 1.5},
    ):
        with pytest.raises(ValueError):
            keep_for_target(ids, m, **kwargs)
    with pytest.raises(ValueError):
        keep_for_target(["a"], m, n=1)
    assert keep_for_target([], np.array([]), fraction=0.5).tolist() == []


def test_parse_eps_list() -> None:
    """Comma lists are parsed, sorted and de-duplicated."""
    assert parse_eps_list("0.05, 0.001,0.01,0.05") == [0.001, 0.01, 0.05]
    assert parse_eps_list("0.3") == [0.3]
    assert parse_eps_list("1e-4,0.2") == [0.0001, 0.2]


@pytest.mark.parametrize("text", ["", " ", "0.1,,0.2", "abc", "0", "1", "1.5", "-0.01", "nan", "inf", "0.1,0.2,"])
def test_parse_eps_list_errors(text: str) -> None:
    """Empty, non-numeric or out-of-range entries raise ValueError."""
    with pytest.raises(ValueError):
        parse_eps_list(text)
