"""Streaming per-variable mean and standard deviation, computed while a dataset is built.

A 0.25-degree dataset does not fit in memory, so statistics are accumulated field by field
(one 2-D field of one variable, level and time at a time) and merged with Chan et al.'s pairwise
update: each field contributes its count, mean and sum of squared deviations, computed in float64.
This is exact up to float64 rounding (no ``E[x^2] - E[x]^2`` cancellation, which ruins the
variance of geopotential, whose mean is ~100x its standard deviation).

Keys follow `aurora.normalisation`: surface and static variables by name (``"2t"``, ``"lsm"``),
atmospheric variables by ``"{name}_{level}"`` (``"r_500"``, ``"z_7_5"``), so the model can use
them directly for variables outside Aurora's own table. The standard deviation is the population
one (``ddof=0``), over every grid point with equal weight (no latitude weighting, as Aurora's
table).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from aurora.normalisation import level_to_str

__all__ = ["RunningStats", "field_moments", "field_stats", "merge_stats", "stat_key"]


def stat_key(name: str, level: float | None = None) -> str:
    """The statistics key of a variable (and level): the same keys as Aurora's table."""
    return name if level is None else f"{name}_{level_to_str(level)}"


def field_moments(field: np.ndarray) -> tuple[int, float, float]:
    """(count, mean, M2) of one field in float64: what every statistic here is merged from."""
    x = np.asarray(field, dtype=np.float64)
    if x.size == 0:
        return 0, 0.0, 0.0
    mean = float(x.mean())
    return x.size, mean, float(np.square(x - mean).sum())


def field_stats(fields: Sequence[np.ndarray]) -> np.ndarray:
    """`field_moments` of each field: one time's row of a built chunk's statistics."""
    return np.asarray([field_moments(f) for f in fields], np.float64).reshape(len(fields), 3)


def merge_stats(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-time (count, mean, M2) rows ``(times, keys, 3)`` -> count, mean, std per key.

    The exact pooled formula (float64), the same for any chunking of the times: the total mean
    is the count-weighted mean, M2 adds each part's M2 and its spread around the total mean.
    """
    n, mean, m2 = rows[..., 0], rows[..., 1], rows[..., 2]
    total = n.sum(axis=0)
    pooled = (n * mean).sum(axis=0) / np.maximum(total, 1)
    spread = m2.sum(axis=0) + (n * np.square(mean - pooled)).sum(axis=0)
    return total, pooled, np.sqrt(np.maximum(spread, 0.0) / np.maximum(total, 1))


class RunningStats:
    """Accumulates count, mean and M2 (sum of squared deviations) per key."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}
        self._mean: dict[str, float] = {}
        self._m2: dict[str, float] = {}

    def add_field(self, key: str, field: np.ndarray) -> None:
        """Merge one field (any shape; all its values count) into the statistics of `key`."""
        n_b, mean_b, m2_b = field_moments(field)
        if n_b == 0:
            return
        n_a = self._n.get(key, 0)
        if n_a == 0:
            self._n[key], self._mean[key], self._m2[key] = n_b, mean_b, m2_b
            return
        n = n_a + n_b
        delta = mean_b - self._mean[key]
        self._mean[key] += delta * n_b / n
        self._m2[key] += m2_b + delta * delta * n_a * n_b / n
        self._n[key] = n

    def add_example(
        self,
        surf: Mapping[str, np.ndarray],
        atmos: Mapping[str, np.ndarray],
        levels: Iterable[float],
    ) -> None:
        """One valid time: surface fields `(h, w)`, atmospheric fields `(levels, h, w)`."""
        levels = list(levels)
        for name, x in surf.items():
            self.add_field(stat_key(name), x)
        for name, x in atmos.items():
            for i, level in enumerate(levels):
                self.add_field(stat_key(name, level), x[i])

    def result(self) -> dict[str, tuple[float, float]]:
        """`{key: (mean, std)}` for every key seen."""
        return {
            k: (self._mean[k], float(np.sqrt(max(self._m2[k], 0.0) / self._n[k]))) for k in self._n
        }

    def counts(self) -> dict[str, int]:
        """Number of values behind each key (for the dataset's metadata)."""
        return dict(self._n)
