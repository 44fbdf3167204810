"""Ensemble forecast scores as WeatherBench2 defines them: CRPS and spread/skill.

An ensemble is an array whose axis 0 indexes the members (WB2's ``realization`` dimension),
followed by the fields' own axes `(..., h, w)`. As in `trainers.evaluation.metrics`, every score
is a latitude-weighted mean over the grid per field, on numpy arrays (float64) or jax arrays
(inside or outside `jax.jit`, in the input's dtype).

Definitions (weatherbench2/metrics.py):

- CRPS (`CRPS`, `CRPSSkill`, `CRPSSpread`): ``CRPS = E|X - Y| - 0.5 E|X - X'|`` with the
  "fair" (unbiased) ensemble estimators ``skill = mean_i |x_i - y|`` and
  ``spread = sum_{i != j} |x_i - x_j| / (N (N - 1))``, the latter computed from the sorted
  members as WB2 does (Zamo & Naveau 2018, ``2 sum_i (2 i - N - 1) x_(i) / (N (N - 1))``).
  One member has no spread: the CRPS of a deterministic forecast is its MAE. Averaged over
  samples per lead, as WB2 averages its per-init spatial means.
- Spread/skill (`EnsembleVariance`, `EnsembleMeanMSE`; WB2 paper, Rasp et al. 2024, sec. 4.2):
  ``spread = sqrt(mean_t <var_{N-1}(x)>)``, the root of the time-mean weighted spatial mean of
  the unbiased (``ddof=1``) ensemble variance; ``skill = sqrt(mean_t <(mean(x) - y)^2>)``, the
  RMSE of the ensemble mean; ``spread_skill = sqrt((N + 1) / N) * spread / skill``, whose
  factor makes a perfectly reliable finite ensemble score 1 (Fortin et al. 2014). One member
  has spread 0.

`score_ensemble` returns sums over samples (jit friendly); `EnsembleTotals` adds them up on the
host and turns them into rows, like `metrics.score_batch` and `metrics.ScoreTotals`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aurora.batch import Batch
from trainers.evaluation.metrics import ScoreTotals, _cast, _xp, lat_weights, weighted_mean

__all__ = [
    "ENSEMBLE_METRICS",
    "EnsembleTotals",
    "crps",
    "crps_skill",
    "crps_spread",
    "ensemble_mean_mse",
    "ensemble_variance",
    "score_ensemble",
]

Array = Any  # numpy or jax array
Sums = dict[str, Any]

ENSEMBLE_METRICS = ("crps", "spread", "skill", "spread_skill")
"""The ensemble scores of every row, in CSV column order."""


def crps_skill(ensemble: Array, truth: Array, weights: Array) -> Array:
    """WB2's `CRPSSkill`: the weighted spatial mean of ``mean_i |x_i - y|`` per field.

    Args:
        ensemble: members, shape `(n, ..., h, w)`.
        truth: fields of shape `(..., h, w)`.
        weights: latitude weights of mean 1, shape `(h,)`.

    Returns:
        The scores, shape `(...)`.
    """
    xp = _xp(ensemble, truth)
    ensemble, truth = _cast(xp, ensemble, truth)
    return weighted_mean(xp.mean(xp.abs(ensemble - truth[None]), axis=0), weights)


def crps_spread(ensemble: Array, weights: Array) -> Array:
    """WB2's `CRPSSpread`: the weighted spatial mean of the fair estimate of ``E|X - X'|``.

    ``sum_{i != j} |x_i - x_j| / (N (N - 1))`` from the sorted members; 0 for one member.

    Args:
        ensemble: members, shape `(n, ..., h, w)`.
        weights: latitude weights of mean 1, shape `(h,)`.

    Returns:
        The scores, shape `(...)`.
    """
    xp = _xp(ensemble)
    (ensemble,) = _cast(xp, ensemble)
    n = ensemble.shape[0]
    if n < 2:
        return xp.zeros(ensemble.shape[1:-2], ensemble.dtype)
    rank = xp.arange(1, n + 1, dtype=ensemble.dtype).reshape((n,) + (1,) * (ensemble.ndim - 1))
    ordered = xp.sort(ensemble, axis=0)
    pointwise = 2 * xp.sum((2 * rank - n - 1) * ordered, axis=0) / (n * (n - 1))
    return weighted_mean(pointwise, weights)


def crps(ensemble: Array, truth: Array, weights: Array) -> Array:
    """WB2's `CRPS` per field: `crps_skill - 0.5 * crps_spread` (one member: the MAE).

    Args:
        ensemble: members, shape `(n, ..., h, w)`.
        truth: fields of shape `(..., h, w)`.
        weights: latitude weights of mean 1, shape `(h,)`.

    Returns:
        The scores, shape `(...)`.
    """
    return crps_skill(ensemble, truth, weights) - 0.5 * crps_spread(ensemble, weights)


def ensemble_variance(ensemble: Array, weights: Array) -> Array:
    """WB2's `EnsembleVariance`: the weighted spatial mean of the ``ddof=1`` member variance.

    Args:
        ensemble: members, shape `(n, ..., h, w)`.
        weights: latitude weights of mean 1, shape `(h,)`.

    Returns:
        The scores, shape `(...)`; zeros for one member.
    """
    xp = _xp(ensemble)
    (ensemble,) = _cast(xp, ensemble)
    if ensemble.shape[0] < 2:
        return xp.zeros(ensemble.shape[1:-2], ensemble.dtype)
    return weighted_mean(xp.var(ensemble, axis=0, ddof=1), weights)


def ensemble_mean_mse(ensemble: Array, truth: Array, weights: Array) -> Array:
    """WB2's `EnsembleMeanMSE`: the weighted MSE of the ensemble mean per field.

    Args:
        ensemble: members, shape `(n, ..., h, w)`.
        truth: fields of shape `(..., h, w)`.
        weights: latitude weights of mean 1, shape `(h,)`.

    Returns:
        The scores, shape `(...)`.
    """
    xp = _xp(ensemble, truth)
    ensemble, truth = _cast(xp, ensemble, truth)
    return weighted_mean((xp.mean(ensemble, axis=0) - truth) ** 2, weights)


def score_ensemble(members: Sequence[Batch], truth: Batch, mask: Array | None = None) -> Sums:
    """Ensemble scores of `members` against `truth` (physical units, same grid), summed over
    samples.

    Args:
        members: one `Batch` per member, variables of shape `(b, t, h, w)` / `(b, t, c, h, w)`.
        truth: the truth on the same grid and levels.
        mask: shape `(b,)`, 0 or 1: leaves out batch rows that have no truth.

    Returns:
        `{"n": samples, "members": N, "surf": {var: {"crps_skill", "crps_spread", "variance",
        "mean_mse"}}, "atmos": {...}}`, surface entries scalars, atmospheric ones `(c,)`.
    """
    first = members[0]
    if first.spatial_shape != truth.spatial_shape:
        raise ValueError(
            f"Prediction grid {first.spatial_shape} != truth grid {truth.spatial_shape}; "
            "crop first."
        )
    weights = lat_weights(first.metadata.lat)
    leaves = [*first.surf_vars.values(), *first.atmos_vars.values()]
    xp = _xp(*leaves, *truth.surf_vars.values(), *truth.atmos_vars.values())
    b, t = leaves[0].shape[:2]
    n = b * t if mask is None else xp.sum(mask) * t
    out: Sums = {"n": n, "members": len(members), "surf": {}, "atmos": {}}
    for group in ("surf", "atmos"):
        truths = getattr(truth, f"{group}_vars")
        for name in getattr(first, f"{group}_vars"):
            if name not in truths:
                continue
            x = xp.stack([getattr(m, f"{group}_vars")[name] for m in members])
            y = truths[name]
            scores = {
                "crps_skill": crps_skill(x, y, weights),
                "crps_spread": crps_spread(x, weights),
                "variance": ensemble_variance(x, weights),
                "mean_mse": ensemble_mean_mse(x, y, weights),
            }
            sums = {}
            for metric, s in scores.items():
                if mask is not None:  # where, not multiply: a masked-out NaN must not spread
                    m = xp.reshape(mask, mask.shape + (1,) * (s.ndim - mask.ndim)) > 0
                    s = xp.where(m, s, 0)
                sums[metric] = xp.sum(s, axis=(0, 1))
            out[group][name] = sums
    return out


class EnsembleTotals(ScoreTotals):
    """Running sums of `score_ensemble` results -> one row per variable and level.

    Args:
        levels: the pressure levels of the atmospheric scores, in order.
    """

    def __init__(self, levels: Sequence[float] = ()) -> None:
        super().__init__(levels)
        self.members = 0

    def add(self, sums: Sums) -> None:
        """Add one `score_ensemble` result (device arrays are fetched; totals are float64)."""
        super().add(sums)
        self.members = int(sums["members"])

    def rows(self) -> list[dict[str, Any]]:
        """Mean scores over all samples added (see the module docstring).

        Returns:
            `{variable, level, crps, spread, skill, spread_skill}` per variable (and level);
            `level` is None for surface variables.
        """
        out = []
        m = self.members
        for name, level, mean in self.means():
            spread, skill = np.sqrt(mean["variance"]), np.sqrt(mean["mean_mse"])
            with np.errstate(invalid="ignore", divide="ignore"):
                ratio = np.sqrt((m + 1) / m) * spread / skill if m else float("nan")
            out.append(
                {
                    "variable": name,
                    "level": level,
                    "crps": mean["crps_skill"] - 0.5 * mean["crps_spread"],
                    "spread": float(spread),
                    "skill": float(skill),
                    "spread_skill": float(ratio),
                }
            )
        return out
