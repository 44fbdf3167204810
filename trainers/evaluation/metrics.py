"""Deterministic forecast scores as WeatherBench2 defines them: RMSE, MAE, bias and ACC.

Every score is a latitude-weighted mean over the grid (WB2's `_spatial_average`), computed per
field: the last two axes are (latitude, longitude) and every leading axis (batch, history,
level) is kept, so one call scores all samples and pressure levels at once. The functions work
on numpy arrays (computed in float64, for reference numbers and host-side scoring) and on jax
arrays, inside or outside `jax.jit` (computed in the input's dtype).

Aggregation over samples follows WB2's `evaluate`: the per-sample spatial MSE, MAE, bias and
ACC are averaged over samples (init times), and RMSE is the square root of the mean MSE, not the
mean of per-sample RMSEs. `score_batch` returns sums over the samples of two `Batch`es (jit
friendly); `ScoreTotals` adds such sums up on the host and turns them into one row per variable
and pressure level.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from trainers.masking import field_error, masked_mean

__all__ = [
    "METRICS",
    "ScoreTotals",
    "acc",
    "bias",
    "lat_weights",
    "mae",
    "mse",
    "rmse",
    "score_batch",
    "weighted_mean",
]

Array = Any  # numpy or jax array
Sums = dict[str, Any]

METRICS = ("rmse", "mae", "bias", "acc")
"""The scores of every row, in CSV column order."""


def lat_weights(lat: Sequence[float] | np.ndarray) -> np.ndarray:
    """Area weight of each latitude row, normalised to mean 1 (float64, shape `(h,)`).

    Each row stands for the band between the midpoints to its neighbours; the outermost rows
    extend half a grid spacing outwards, clipped at ±90°. The weight is the band's area,
    `sin(upper) - sin(lower)`. On every global grid WeatherBench2 uses (rows on the poles, or
    offset half a spacing from them) this is exactly WB2's `get_lat_weights`: a pole row gets
    the small polar cap, not the zero weight `cos(90°)` would give it. WB2 itself always
    stretches the outermost bands to the poles; on a regional or cropped grid that would make
    the edge rows dominate, so here they keep their half spacing (on an evenly spaced grid
    without poles the weights are then exactly `cos(lat)` normalised to mean 1).

    Args:
        lat: latitudes in degrees, shape `(h,)`, in grid order.

    Returns:
        The weights, float64, shape `(h,)`.
    """
    phi = np.asarray(lat, dtype=np.float64).ravel()
    if phi.size == 1:
        return np.ones(1)
    mid = (phi[:-1] + phi[1:]) / 2
    first = phi[0] - (phi[1] - phi[0]) / 2
    last = phi[-1] + (phi[-1] - phi[-2]) / 2
    edges = np.clip(np.concatenate([[first], mid, [last]]), -90.0, 90.0)
    area = np.abs(np.diff(np.sin(np.deg2rad(edges))))
    return area / area.mean()


def _xp(*arrays: Array) -> Any:
    """jax.numpy when any input is a jax array (or a tracer inside jit), numpy otherwise."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


def _cast(xp: Any, *arrays: Array) -> list[Array]:
    """numpy: float64, so reference scores do not depend on float32 summation order."""
    if xp is np:
        return [np.asarray(a, dtype=np.float64) for a in arrays]
    return list(arrays)


def weighted_mean(x: Array, weights: Array, valid: Array | None = None) -> Array:
    """Latitude-weighted mean over the last two axes.

    Args:
        x: fields of shape `(..., h, w)`.
        weights: latitude weights of mean 1, shape `(h,)` (`lat_weights`).
        valid: boolean mask of `x`'s shape: only these points count (`x` must be finite
            there, and is ignored elsewhere); a field without one has a NaN mean. None: all.

    Returns:
        The means, shape `(...)`.
    """
    xp = _xp(x)
    (x,) = _cast(xp, x)
    w = xp.asarray(weights, dtype=x.dtype)[:, None]
    return masked_mean(xp, x, valid, w, axis=(-2, -1))


def _weighted_error(
    forecast: Array, truth: Array, weights: Array, transform: Callable[[Any, Array], Array]
) -> Array:
    """`weighted_mean(transform(xp, forecast - truth))` in the arrays' own namespace and dtype."""
    xp = _xp(forecast, truth)
    forecast, truth = _cast(xp, forecast, truth)
    return weighted_mean(transform(xp, forecast - truth), weights)


def mse(forecast: Array, truth: Array, weights: Array) -> Array:
    """Weighted mean squared error per field.

    Args:
        forecast: fields of shape `(..., h, w)`.
        truth: fields of the same shape.
        weights: latitude weights, shape `(h,)`.

    Returns:
        The scores, shape `(...)`.
    """
    return _weighted_error(forecast, truth, weights, lambda xp, e: e**2)


def rmse(forecast: Array, truth: Array, weights: Array) -> Array:
    """Weighted RMSE per field; over many samples use `sqrt(mean(mse))` (see module doc).

    Args:
        forecast, truth, weights: as `mse`.

    Returns:
        The scores, shape `(...)`.
    """
    return _xp(forecast, truth).sqrt(mse(forecast, truth, weights))


def mae(forecast: Array, truth: Array, weights: Array) -> Array:
    """Weighted mean absolute error per field.

    Args:
        forecast, truth, weights: as `mse`.

    Returns:
        The scores, shape `(...)`.
    """
    return _weighted_error(forecast, truth, weights, lambda xp, e: xp.abs(e))


def bias(forecast: Array, truth: Array, weights: Array) -> Array:
    """Weighted mean of forecast − truth per field (positive: the forecast is too high).

    Args:
        forecast, truth, weights: as `mse`.

    Returns:
        The scores, shape `(...)`.
    """
    return _weighted_error(forecast, truth, weights, lambda xp, e: e)


def acc(
    forecast: Array, truth: Array, climatology: Array, weights: Array, valid: Array | None = None
) -> Array:
    """Anomaly correlation coefficient per field, WB2's (uncentred) definition.

    `ACC = <f' o'> / sqrt(<f'^2> <o'^2>)` with anomalies `f' = forecast - climatology`,
    `o' = truth - climatology` and `<.>` the weighted spatial mean. The anomalies' spatial mean
    is not removed, as in WB2. A forecast equal to the climatology has no anomaly: NaN.

    Args:
        forecast, truth: fields of shape `(..., h, w)`.
        climatology: fields of the same shape.
        weights: latitude weights, shape `(h,)`.
        valid: only these points count (as in `weighted_mean`); None: all.

    Returns:
        The scores, shape `(...)`.
    """
    xp = _xp(forecast, truth, climatology)
    forecast, truth, climatology = _cast(xp, forecast, truth, climatology)
    fa, ta = forecast - climatology, truth - climatology
    if valid is not None:  # where, not multiply: the NaNs left out must not spread
        valid = valid & ~xp.isnan(climatology)  # a mean over states with gaps can have gaps
        fa, ta = xp.where(valid, fa, 0), xp.where(valid, ta, 0)
    mean = lambda x: weighted_mean(x, weights, valid)
    return mean(fa * ta) / xp.sqrt(mean(fa**2) * mean(ta**2))


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------


def _field_sums(
    xp: Any,
    name: str,
    f: Array,
    o: Array,
    c: Array | None,
    weights: np.ndarray,
    mask: Array | None,
) -> dict[str, Array]:
    """Per-field scores summed over the leading (batch, history) axes; levels stay.

    A wave field's NaN points (prediction or truth) are left out and directions are compared
    by angle (`trainers.masking`); any other variable's NaN makes its scores NaN.
    """
    f, o = _cast(xp, f, o)
    error, valid = field_error(xp, name, f, o)
    scores = {
        "mse": weighted_mean(error**2, weights, valid),
        "mae": weighted_mean(xp.abs(error), weights, valid),
        "bias": weighted_mean(error, weights, valid),
    }
    if c is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            scores["acc"] = acc(f, o, xp.broadcast_to(c, o.shape), weights, valid)
    else:
        scores["acc"] = xp.full(scores["mse"].shape, np.nan, scores["mse"].dtype)
    out = {}
    for name, s in scores.items():
        if mask is not None:  # where, not multiply: a masked-out NaN must not spread
            m = xp.reshape(mask, mask.shape + (1,) * (s.ndim - mask.ndim)) > 0
            s = xp.where(m, s, 0)
        out[name] = xp.sum(s, axis=(0, 1))
    return out


def score_batch(
    pred: Batch, truth: Batch, climatology: Batch | None = None, mask: Array | None = None
) -> Sums:
    """Scores of `pred` against `truth` (physical units, same grid), summed over samples.

    A sample is one `(b, t)` field. Sums rather than means: add them up over batches with
    `ScoreTotals`. Variables in `pred` but not in `truth` are not scored. The wave fields'
    NaN points are left out of their scores, and directions are scored by angular difference
    (`trainers.masking`).

    Args:
        pred: the forecast, variables of shape `(b, t, h, w)` / `(b, t, c, h, w)`.
        truth: the truth on the same grid and levels.
        climatology: for ACC, fields that broadcast against `truth`'s (e.g. shape
            `(1, 1, h, w)`); without it ACC is NaN.
        mask: shape `(b,)`, 0 or 1: leaves out batch rows that have no truth, so a jitted call
            keeps its shapes.

    Returns:
        `{"n": samples, "surf": {var: {"mse", "mae", "bias", "acc"}}, "atmos": {var: {...}}}`,
        surface entries scalars and atmospheric ones of shape `(c,)` (one per pressure level).
    """
    if pred.spatial_shape != truth.spatial_shape:
        raise ValueError(
            f"Prediction grid {pred.spatial_shape} != truth grid {truth.spatial_shape}; crop first."
        )
    weights = lat_weights(pred.metadata.lat)
    leaves = [*pred.surf_vars.values(), *pred.atmos_vars.values()]
    xp = _xp(*leaves, *truth.surf_vars.values(), *truth.atmos_vars.values())
    first = leaves[0]
    n = first.shape[0] * first.shape[1] if mask is None else xp.sum(mask) * first.shape[1]
    out: Sums = {"n": n, "surf": {}, "atmos": {}}
    for group in ("surf", "atmos"):
        preds, truths = getattr(pred, f"{group}_vars"), getattr(truth, f"{group}_vars")
        clims = getattr(climatology, f"{group}_vars") if climatology is not None else {}
        for name in preds:
            if name in truths:
                c = clims.get(name) if climatology is not None else None
                fields = (preds[name], truths[name], c, weights, mask)
                out[group][name] = _field_sums(xp, name, *fields)
    return out


class ScoreTotals:
    """Running sums of `score_batch` results -> one row of mean scores per variable and level.

    Args:
        levels: the pressure levels of the atmospheric scores, in order.
    """

    def __init__(self, levels: Sequence[float] = ()) -> None:
        self.levels = tuple(float(x) for x in levels)
        self.n = 0.0
        self.sums: dict[tuple[str, str], dict[str, np.ndarray]] = {}

    def add(self, sums: Sums) -> None:
        """Add one `score_batch` result (device arrays are fetched; totals are float64).

        Args:
            sums: what `score_batch` returned.
        """
        sums = jax.device_get(sums)
        self.n += float(sums["n"])
        for group in ("surf", "atmos"):
            for name, scores in sums[group].items():
                total = self.sums.setdefault((group, name), {})
                for metric, value in scores.items():
                    value = np.asarray(value, np.float64)
                    total[metric] = total.get(metric, 0.0) + value

    def rows(self) -> list[dict[str, Any]]:
        """Mean scores over all samples added; RMSE is `sqrt(mean MSE)`, as WB2.

        Returns:
            `{variable, level, rmse, mae, bias, acc, n}` per variable (and level); `level` is
            None for surface variables.
        """
        return [
            {
                "variable": name,
                "level": level,
                "rmse": float(np.sqrt(mean["mse"])),
                "mae": mean["mae"],
                "bias": mean["bias"],
                "acc": mean["acc"],
                "n": int(self.n),
            }
            for name, level, mean in self.means()
        ]

    def means(self) -> Iterator[tuple[str, float | None, dict[str, float]]]:
        """`(variable, level, mean of every summed score)` per variable and level (`level` None
        for surface variables); NaN before anything was added."""
        n = self.n
        for (group, name), total in self.sums.items():
            levels: Sequence[float | None] = self.levels if group == "atmos" else (None,)
            for i, level in enumerate(levels):
                values = {m: float(v[i] if group == "atmos" else v) for m, v in total.items()}
                yield name, level, {m: v / n if n else float("nan") for m, v in values.items()}
