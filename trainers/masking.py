"""Masked and angular fields in losses and scores: `AuroraWave`'s wave variables.

Wave fields exist over the ocean only: the data hold NaN over land and where a wave system is
absent, and `AuroraWave` predicts NaN where its density channel says absent or its bathymetry
says land. For these variables (:data:`MASKED_SURF_VARS`, the preset's density-channel
variables) a loss or score is a *masked mean*: points where the prediction or the truth is NaN
get weight zero and the rest are normalised by their own weight. The NaNs are replaced by zeros
with `where` *before* any arithmetic, so no NaN enters a value or a gradient. Every other
variable keeps its NaNs, so a NaN there still shows (a data error is not hidden).

Directions in degrees (:data:`ANGLE_SURF_VARS`) are compared by their angular difference, the
shorter way round the circle, in `(-180, 180]`: a plain difference would count 359° against 1° as
358° off. microsoft-aurora publishes no training code for the wave model; the model itself
predicts directions as (sine, cosine) pairs, and the angular difference is the error of the
direction it returns.

The helpers work on numpy and jax arrays alike (`xp` is the namespace of the caller).
"""

from __future__ import annotations

from typing import Any

from aurora.model.wave import ANGLE_SURF_VARS as _ANGLES
from aurora.model.wave import DENSITY_CHANNEL_SURF_VARS

__all__ = ["ANGLE_SURF_VARS", "MASKED_SURF_VARS", "field_error", "masked_mean"]

Array = Any  # numpy or jax array

MASKED_SURF_VARS: frozenset[str] = frozenset(DENSITY_CHANNEL_SURF_VARS)
"""Surface variables whose NaN points are left out of losses and scores."""

ANGLE_SURF_VARS: frozenset[str] = frozenset(_ANGLES)
"""Surface variables that are directions in degrees (compared by angular difference)."""

FULL_CIRCLE = 360.0


def field_error(xp: Any, name: str, forecast: Array, truth: Array) -> tuple[Array, Array | None]:
    """`forecast - truth` for variable `name`, and where it is defined.

    Args:
        xp: numpy or jax.numpy.
        name: the variable's name.
        forecast, truth: fields of the same shape (a direction in degrees).

    Returns:
        The difference (for a direction the angular one, in degrees) and, for a masked
        variable, the boolean mask of points where both are not NaN (the difference is 0
        elsewhere); None otherwise.
    """
    valid = None
    if name in MASKED_SURF_VARS:
        valid = ~(xp.isnan(forecast) | xp.isnan(truth))
        forecast, truth = xp.where(valid, forecast, 0), xp.where(valid, truth, 0)
    error = forecast - truth
    if name in ANGLE_SURF_VARS:
        half = FULL_CIRCLE / 2
        error = half - xp.mod(half - error, FULL_CIRCLE)  # in (-180, 180]
    return error, valid


def masked_mean(
    xp: Any,
    x: Array,
    valid: Array | None,
    weights: Array | None = None,
    axis: int | tuple[int, ...] | None = None,
    empty: float = float("nan"),
) -> Array:
    """The (weighted) mean of `x` over `axis`, counting only `valid` points.

    Without `valid` it is `mean(weights * x)` (weights of mean 1, e.g. latitude weights);
    with it, `sum(weights * valid * x) / sum(weights * valid)`, the same where every point is
    valid.

    Args:
        xp: numpy or jax.numpy.
        x: the values, zero (not NaN) where not `valid`.
        valid: boolean mask broadcasting against `x`, or None.
        weights: broadcasting against `x`; None: 1.
        axis: the axes to average over (None: all).
        empty: the mean where no point is valid: NaN for a score (a field without any wave
            point is not a perfect forecast), 0 for a loss (such a sample adds nothing and
            its gradient stays finite).
    """
    w = xp.ones((), x.dtype) if weights is None else xp.asarray(weights, x.dtype)
    if valid is None:
        return xp.mean(w * x, axis=axis)
    w = xp.where(valid, w, 0)
    total = xp.sum(w * x, axis=axis)
    count = xp.sum(xp.broadcast_to(w, x.shape), axis=axis)
    some = count > 0
    return xp.where(some, total / xp.where(some, count, 1), empty)
