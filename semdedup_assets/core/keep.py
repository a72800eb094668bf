"""Turning max_sim into keep decisions: thresholds, eps curves and fixed-size targets."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from semdedup_assets.core.ordering import ids_as_str


def _as_float64(max_sim: np.ndarray) -> np.ndarray:
    """Return max_sim as a flat float64 array (all comparisons are made in float64)."""
    return np.asarray(max_sim, dtype=np.float64).reshape(-1)


def duplicate_mask(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """Return True where the item is a semantic duplicate: max_sim > 1 - eps (strict)."""
    # 1 - eps in float64 matches the SQL `max_sim <= 1 - eps` on DOUBLE columns bit for bit.
    return _as_float64(max_sim) > (1.0 - float(eps))


def keep_mask(max_sim: np.ndarray, eps: float) -> np.ndarray:
    """Return True where the item is kept: max_sim <= 1 - eps."""
    return _as_float64(max_sim) <= (1.0 - float(eps))


def _kept_counts(sorted_max_sim: np.ndarray, eps_values: Sequence[float]) -> list[int]:
    """Return, per eps, how many entries of an ascending array satisfy max_sim <= 1 - eps."""
    thresholds = np.asarray([1.0 - float(e) for e in eps_values], dtype=np.float64)
    # side="right" counts values equal to the threshold as kept (the <= rule); NaNs sort
    # last and are never counted, exactly like keep_mask.
    return np.searchsorted(sorted_max_sim, thresholds, side="right").astype(np.int64).tolist()


def _curve_rows(eps_values: Sequence[float], kept: Sequence[int], total: int) -> list[dict]:
    """Return the eps-curve rows for the given kept counts."""
    rows = []
    for eps, k in zip(eps_values, kept):
        rows.append(
            {
                "eps": float(eps),
                "kept": int(k),
                "removed": int(total - k),
                "kept_fraction": (k / total) if total else 1.0,
            }
        )
    return rows


def eps_curve(max_sim: np.ndarray, eps_values: Sequence[float]) -> list[dict]:
    """Return one row {eps, kept, removed, kept_fraction} per eps, in the given order."""
    values = np.sort(_as_float64(max_sim))
    return _curve_rows(list(eps_values), _kept_counts(values, eps_values), len(values))


class EpsCurveAccumulator:
    """Streaming eps_curve: feed max_sim chunks (e.g. one per bucket), read rows at the end."""

    def __init__(self, eps_values: Sequence[float]) -> None:
        """Start with zero items for the given eps values."""
        self.eps_values: list[float] = [float(e) for e in eps_values]
        self.total: int = 0
        self._kept: list[int] = [0] * len(self.eps_values)

    def update(self, max_sim_chunk: np.ndarray) -> None:
        """Add the counts of one chunk of max_sim values."""
        values = np.sort(_as_float64(max_sim_chunk))
        for k, count in enumerate(_kept_counts(values, self.eps_values)):
            self._kept[k] += count
        self.total += len(values)

    def rows(self) -> list[dict]:
        """Return the same rows as eps_curve over everything fed so far."""
        return _curve_rows(self.eps_values, self._kept, self.total)


def keep_for_target(
    ids: Sequence[str] | np.ndarray,
    max_sim: np.ndarray,
    n: int | None = None,
    fraction: float | None = None,
) -> np.ndarray:
    """Return the ascending indices of the n (or round(fraction*total)) items with smallest max_sim."""
    values = _as_float64(max_sim)
    id_arr = ids_as_str(ids)
    total = len(values)
    if len(id_arr) != total:
        raise ValueError(f"ids has {len(id_arr)} entries but max_sim has {total}")
    if (n is None) == (fraction is None):
        raise ValueError("give exactly one of n or fraction")
    if fraction is not None:
        f = float(fraction)
        if not (0.0 <= f <= 1.0):
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        target = int(round(f * total))
    else:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise ValueError(f"n must be an integer, got {n!r}")
        target = int(n)
        if not (0 <= target <= total):
            raise ValueError(f"n must be in [0, {total}], got {n}")
    # Primary key max_sim (least duplicated first), ties by id so the cut is deterministic.
    ranked = np.lexsort((id_arr, values))
    return np.sort(ranked[:target]).astype(np.int64)


def parse_eps_list(text: str) -> list[float]:
    """Parse "0.001,0.01,0.05" into a sorted, de-duplicated list of eps with 0 < eps < 1."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ValueError("eps list is empty; expected e.g. '0.001,0.01,0.05'")
    out: set[float] = set()
    for part in parts:
        if not part:
            raise ValueError(f"empty entry in eps list {text!r}")
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a number in eps list: {part!r}") from None
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(f"eps must satisfy 0 < eps < 1, got {part!r}")
        out.add(value)
    return sorted(out)
