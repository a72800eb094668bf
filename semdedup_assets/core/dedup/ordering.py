"""Processing order of the members of one cluster (SemDeDup step 3: hard / easy / random).

With `--keep-by COLUMN[:asc|desc],...` the members are ordered by those input columns
first (nulls last in either direction), then by the strategy's key, then by id; without
it the order is exactly the strategy's (the same code path as before the option existed).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_assets.core.config import KEEP_STRATEGIES as STRATEGIES

# One keep-by column's values for the rows being ordered, and whether it sorts descending.
KeepByKey = tuple["pa.Array | pa.ChunkedArray | np.ndarray | Sequence[object]", bool]


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
    ids: Sequence[str] | np.ndarray | pa.Array | pa.ChunkedArray,
    sim_to_centroid: np.ndarray,
    strategy: str,
    seed: int = 0,
    keep_by: Sequence[KeepByKey] = (),
) -> np.ndarray:
    """Return the int64 permutation (indices into the inputs) in which a cluster is processed.

    `keep_by` holds (values, descending) per keep-by column, most significant first; the
    strategy's key and the id break its ties, so the order is total and never depends on
    the order in which rows arrived. `ids` may be an Arrow string array (a multi-probe pool
    can be large): for `hard`/`easy` the order is then one Arrow sort, with no Python strings.
    """
    validate_strategy(strategy)
    arrow = isinstance(ids, (pa.Array, pa.ChunkedArray))
    if arrow and strategy == "random":  # the random key hashes each id in Python anyway
        ids, arrow = ids.to_pylist(), False
    id_arr = ids if arrow else ids_as_str(ids)
    sims = np.asarray(sim_to_centroid, dtype=np.float64).reshape(-1)
    if len(id_arr) != len(sims):
        raise ValueError(f"ids has {len(id_arr)} entries but sim_to_centroid has {len(sims)}")
    if len(sims) == 0:
        return np.empty(0, dtype=np.int64)
    if np.isnan(sims).any():
        raise ValueError("sim_to_centroid contains NaN; the order would be undefined")
    if keep_by or arrow:
        return _keep_by_order(id_arr, sims, strategy, seed, keep_by)
    # np.lexsort: the last key is the primary one; the id is always the tie-breaker,
    # so the result never depends on the order in which rows arrived.
    if strategy == "hard":
        perm = np.lexsort((id_arr, sims))
    elif strategy == "easy":
        perm = np.lexsort((id_arr, -sims))
    else:
        perm = np.lexsort((id_arr, random_keys(id_arr, seed)))
    return perm.astype(np.int64, copy=False)


def _keep_by_order(
    ids: np.ndarray | pa.Array | pa.ChunkedArray,
    sims: np.ndarray,
    strategy: str,
    seed: int,
    keep_by: Sequence[KeepByKey],
) -> np.ndarray:
    """The keep-by columns (if any), then the strategy's key, then the id, as one Arrow sort; nulls (and NaN)
    last in every column. `ids` is a numpy array, or an Arrow one unless the strategy is `random`.

    Arrow's multi-key sort is stable and orders strings by UTF-8 bytes, i.e. by code point,
    exactly as numpy orders the ids in the plain path; the unique id makes the order total.
    """
    columns: dict[str, pa.Array] = {}
    sort_keys: list[tuple[str, str]] = []
    for k, (values, descending) in enumerate(keep_by):
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        if len(arr) != len(ids):
            raise ValueError(f"keep-by column {k} has {len(arr)} values for {len(ids)} ids")
        if pa.types.is_floating(arr.type):  # NaN sorts with the nulls: last, in either direction
            arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
        columns[f"k{k}"] = arr
        sort_keys.append((f"k{k}", "descending" if descending else "ascending"))
    if strategy == "random":
        columns["s"], order = pa.array(random_keys(ids, seed)), "ascending"
    else:
        columns["s"], order = pa.array(sims), "ascending" if strategy == "hard" else "descending"
    columns["id"] = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(ids.tolist(), type=pa.string())
    # Arrow places nulls at the end in either direction by default (every release since 3.0).
    perm = pc.sort_indices(pa.table(columns), sort_keys=[*sort_keys, ("s", order), ("id", "ascending")])
    return perm.to_numpy().astype(np.int64, copy=False)
