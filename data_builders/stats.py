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

from collections.abc import Iterable, Mapping

import numpy as np

from aurora.normalisation import level_to_str

__all__ = ["RunningStats", "stat_key"]


def stat_key(name: str, level: float | None = None) -> str:
    """The statistics key of a variable (and level): the same keys as Aurora's table."""
    return name if level is None else f"{name}_{level_to_str(level)}"


class RunningStats:
    """Accumulates count, mean and M2 (sum of squared deviations) per key."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}
        self._mean: dict[str, float] = {}
        self._m2: dict[str, float] = {}

    def add_field(self, key: str, field: np.ndarray) -> None:
        """Merge one field (any shape; all its values count) into the statistics of `key`."""
        x = np.asarray(field, dtype=np.float64)
        n_b = x.size
        if n_b == 0:
            return
        mean_b = float(x.mean())
        m2_b = float(np.square(x - mean_b).sum())
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
