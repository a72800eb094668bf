"""Tests for cluster_order: hard / easy / random orders, id tie-breaks, order independence."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from semdedup_assets.core.dedup.ordering import STRATEGIES, cluster_order


def _ids(n: int) -> list[str]:
    """Return n distinct ids whose string order differs from their numeric order."""
    return [f"item-{k}" for k in range(n)]


def test_hard_is_ascending_similarity() -> None:
    """hard puts the member farthest from the centroid first."""
    sims = np.array([0.9, 0.1, 0.5, 0.7])
    order = cluster_order(["a", "b", "c", "d"], sims, "hard")
    assert order.dtype == np.int64
    assert order.tolist() == [1, 2, 3, 0]


def test_easy_is_descending_similarity() -> None:
    """easy puts the member closest to the centroid first."""
    sims = np.array([0.9, 0.1, 0.5, 0.7])
    assert cluster_order(["a", "b", "c", "d"], sims, "easy").tolist() == [0, 3, 2, 1]


@pytest.mark.parametrize("strategy", ["hard", "easy"])
def test_similarity_ties_are_broken_by_id(strategy: str) -> None:
    """Equal similarities come out in ascending id (string) order, whatever the input order."""
    ids = ["z", "b", "a10", "a9", "m"]
    sims = np.array([0.5, 0.5, 0.5, 0.5, 0.2 if strategy == "hard" else 0.8])
    order = cluster_order(ids, sims, strategy)
    assert [ids[k] for k in order] == ["m", "a10", "a9", "b", "z"]


def test_ids_use_string_order_even_for_integers() -> None:
    """Integer ids are compared as strings, as the spec says ("10" < "9")."""
    order = cluster_order(np.array([9, 10]), np.array([0.3, 0.3]), "hard")
    assert order.tolist() == [1, 0]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_order_is_independent_of_input_order(strategy: str) -> None:
    """Permuting the inputs permutes nothing in the resulting sequence of ids."""
    rng = np.random.default_rng(1)
    n = 200
    ids = np.array(_ids(n))
    # Coarse similarities so that many ties must be resolved by id.
    sims = np.round(rng.uniform(0, 1, n), 1)
    ref = ids[cluster_order(ids, sims, strategy, seed=3)]
    for trial in range(5):
        perm = rng.permutation(n)
        got = ids[perm][cluster_order(ids[perm], sims[perm], strategy, seed=3)]
        assert got.tolist() == ref.tolist(), (strategy, trial)
        # list input behaves like the array input
        got_list = ids[perm][cluster_order(list(ids[perm]), sims[perm], strategy, seed=3)]
        assert got_list.tolist() == ref.tolist()


def test_result_is_a_permutation() -> None:
    """Every strategy returns each index exactly once."""
    rng = np.random.default_rng(2)
    sims = rng.uniform(0, 1, 50)
    for strategy in STRATEGIES:
        order = cluster_order(_ids(50), sims, strategy)
        assert sorted(order.tolist()) == list(range(50))


def test_random_depends_on_seed_not_on_similarity() -> None:
    """random is a seeded shuffle: the seed changes it, the similarities do not."""
    ids = _ids(100)
    a = cluster_order(ids, np.linspace(0, 1, 100), "random", seed=0)
    b = cluster_order(ids, np.linspace(1, 0, 100), "random", seed=0)
    c = cluster_order(ids, np.linspace(0, 1, 100), "random", seed=1)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # A shuffle, not the identity or the sorted-by-similarity order.
    assert a.tolist() != list(range(100))


def test_random_depends_only_on_the_set_of_ids() -> None:
    """Removing one member leaves the relative order of the others unchanged."""
    ids = _ids(60)
    full = [ids[k] for k in cluster_order(ids, np.zeros(60), "random", seed=7)]
    sub_ids = ids[:30] + ids[31:]
    sub = [sub_ids[k] for k in cluster_order(sub_ids, np.zeros(59), "random", seed=7)]
    assert sub == [i for i in full if i != ids[30]]


@pytest.mark.subprocess
def test_random_is_stable_across_processes() -> None:
    """The shuffle does not use Python's salted hash(): a fresh interpreter agrees."""
    ids = _ids(40)
    here = cluster_order(ids, np.zeros(40), "random", seed=11).tolist()
    code = (
        "import numpy as np;"
        "from semdedup_assets.core.dedup.ordering import cluster_order;"
        "print(cluster_order([f'item-{k}' for k in range(40)], np.zeros(40), 'random', seed=11).tolist())"
    )
    env_out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert env_out.stdout.strip() == str(here)


def test_empty_and_singleton() -> None:
    """Empty and one-member clusters are fine for every strategy."""
    for strategy in STRATEGIES:
        empty = cluster_order([], np.array([]), strategy)
        assert empty.dtype == np.int64 and empty.shape == (0,)
        assert cluster_order(["x"], np.array([0.4]), strategy).tolist() == [0]


def test_unknown_strategy_lists_valid_ones() -> None:
    """An unknown strategy raises ValueError naming hard, easy and random."""
    with pytest.raises(ValueError, match="hard, easy, random"):
        cluster_order(["a"], np.array([0.1]), "medium")


def test_length_mismatch_and_nan_are_rejected() -> None:
    """Inputs of different lengths, or NaN similarities, raise ValueError."""
    with pytest.raises(ValueError):
        cluster_order(["a", "b"], np.array([0.1]), "hard")
    with pytest.raises(ValueError):
        cluster_order(["a", "b"], np.array([0.1, np.nan]), "hard")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("keep_by", [False, True])
def test_arrow_ids_give_the_numpy_order(strategy: str, keep_by: bool) -> None:
    """Arrow string ids (one Arrow sort, as multi-probe pools use) and Python ids give one order, ties included."""
    import pyarrow as pa

    rng = np.random.default_rng(3)
    ids = [f"i{j}" for j in rng.permutation(300)] + ["é", "z", "Z", "a-b", "ab"]
    sims = np.round(rng.uniform(-1, 1, len(ids)), 1)  # many exact ties: the id (or the keep-by column) decides
    sims[:3] = [0.0, -0.0, 0.0]
    keys = [(pa.array(rng.integers(0, 3, len(ids))), True)] if keep_by else []
    expected = cluster_order(ids, sims, strategy, 5, keep_by=keys)
    for arrow_ids in (pa.array(ids), pa.chunked_array([ids[:100], ids[100:]]), pa.array(ids, pa.large_string())):
        np.testing.assert_array_equal(cluster_order(arrow_ids, sims, strategy, 5, keep_by=keys), expected)
