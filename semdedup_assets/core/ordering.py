"""Processing order of the members of one cluster (SemDeDup step 3: hard / easy / random)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from semdedup_assets.core.config import KEEP_STRATEGIES as STRATEGIES


def validate_strategy(strategy: str) -> str:
    """Return `strategy` unchanged, or raise ValueError naming the valid strategies."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown keep strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    return strategy


def ids_as_str(ids: Sequence[object] | np.ndarray) -> np.ndarray:
    """Return the ids as a 1-d numpy unicode array (tie-breaks use string order)."""
    if isinstance(ids, np.ndarray):
        # astype(str) on an object/int array gives the same text as str() per element.
        arr = ids.astype(str) if ids.dtype.kind != "U" else ids
    else:
        arr = np.asarray([str(i) for i in ids], dtype=str)
    # np.asarray([]) has dtype float64; force a unicode dtype so lexsort sees strings.
    if arr.size == 0:
        arr = np.empty(0, dtype="<U1")
    return arr.reshape(-1)


def random_keys(ids: np.ndarray, seed: int) -> np.ndarray:
    """Return a uint64 pseudo-random key per id that depends only on (seed, id)."""
    # Keyed blake2b: stable across processes and platforms, unlike Python's salted hash().
    key = hashlib.blake2b(str(int(seed)).encode(), digest_size=32).digest()
    out = np.empty(len(ids), dtype=np.uint64)
    for k, item in enumerate(ids.tolist()):
        digest = hashlib.blake2b(item.encode("utf-8"), digest_size=8, key=key).digest()
        out[k] = int.from_bytes(digest, "big")
    return out


def cluster_order(
    ids: Sequence[str] | np.ndarray,
    sim_to_centroid: np.ndarray,
    strategy: str,
    seed: int = 0,
) -> np.ndarray:
    """Return the int64 permutation (indices into the inputs) in which a cluster is processed."""
    validate_strategy(strategy)
    id_arr = ids_as_str(ids)
    sims = np.asarray(sim_to_centroid, dtype=np.float64).reshape(-1)
    if len(id_arr) != len(sims):
        raise ValueError(f"ids has {len(id_arr)} entries but sim_to_centroid has {len(sims)}")
    if len(sims) == 0:
        return np.empty(0, dtype=np.int64)
    if np.isnan(sims).any():
        raise ValueError("sim_to_centroid contains NaN; the order would be undefined")
    # np.lexsort: the last key is the primary one; the id is always the tie-breaker,
    # so the result never depends on the order in which rows arrived.
    if strategy == "hard":
        perm = np.lexsort((id_arr, sims))
    elif strategy == "easy":
        perm = np.lexsort((id_arr, -sims))
    else:
        perm = np.lexsort((id_arr, random_keys(id_arr, seed)))
    return perm.astype(np.int64, copy=False)
