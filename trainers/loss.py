"""Training losses: Aurora's weighted MAE (the default), latitude-weighted MAE / MSE, your own.

A loss is a plain function (the `LossFn` protocol)::

    def my_loss(pred: Batch, target: Batch, stats: Stats | None, **kwargs) -> (loss, metrics)

`pred` and `target` are one lead step in physical units (fields `(b, 1, ...)`), `stats` extends
Aurora's normalisation table (the model's `surf_stats`), `kwargs` come from `config.loss.kwargs`;
it returns a scalar and named scalars (logged as `train/<name>`). `Loss` binds a function to its
keyword arguments and to the weights of the rollout steps (`lead_weights`): the strategies call a
`Loss` per step and combine the steps with `Loss.over_leads`. `config.loss.name` picks the function:
a name of :data:`LOSSES` or `"package.module:function"`.

Aurora's loss (Bodnar et al. 2025, Suppl. D.1), the built-in "aurora":

    L = γ / (V_S + V_A) · [ α Σ_k w_k MAE_k(surface) + β Σ_k w_k MAE_k(atmospheric) ]

with MAE over batch, latitude and longitude (and, for atmospheric variables, the mean over
pressure levels, as the paper's `1 / (C·H·W)`), no latitude weighting, computed on **normalised**
prediction and target (on physical units geopotential would dominate everything). `V_S`, `V_A`
count the variables present. Per-level weights can be given as `{"z": {500: 2.0}}`; a missing
weight is 1.

Every built-in loss leaves out the NaN points of the wave fields `AuroraWave` masks (a masked
mean over the points where prediction and target both exist) and compares directions in degrees
by their angular difference, in radians (`trainers.masking`); a NaN in any other variable gives a
NaN loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.normalisation import Stats
from trainers.masking import ANGLE_SURF_VARS, field_error, masked_mean

__all__ = [
    "FINE_TUNING_WEIGHTS",
    "LOSSES",
    "Loss",
    "LossConfig",
    "LossFn",
    "aurora_loss",
    "aurora_mae",
    "dataset_weight",
    "latitude_weighted_mae",
    "latitude_weighted_mse",
    "latitude_weights",
]

Metrics = dict[str, jax.Array]

FINE_TUNING_WEIGHTS: dict[str, float] = {
    "2t": 3.5,
    "10u": 0.77,
    "10v": 0.66,
    "msl": 1.6,
    "z": 3.5,
    "q": 0.8,
    "t": 1.7,
    "u": 0.87,
    "v": 0.6,
}
"""The paper's fine-tuning variable weights (surface and atmospheric)."""

DATASET_WEIGHTS = {"era5": 2.0}


def dataset_weight(name: str) -> float:
    """γ: ERA5 2.0, every other dataset 1.0 (the paper's choice)."""
    return DATASET_WEIGHTS.get(name.lower(), 1.0)


@dataclass(frozen=True)
class LossConfig:
    """Weights of the loss; all of it comes from the config."""

    surf_weights: Mapping[str, float] = field(default_factory=lambda: dict(FINE_TUNING_WEIGHTS))
    atmos_weights: Mapping[str, Any] = field(default_factory=lambda: dict(FINE_TUNING_WEIGHTS))
    alpha: float = 0.25
    beta: float = 1.0
    gamma: float = 1.0

    def __hash__(self) -> int:  # usable as a static jit argument
        return hash(
            (
                tuple(sorted(self.surf_weights.items())),
                repr(sorted(self.atmos_weights.items())),
                self.alpha,
                self.beta,
                self.gamma,
            )
        )


def _level_weights(weight: Any, levels: tuple[float, ...]) -> np.ndarray:
    if isinstance(weight, Mapping):
        table = {float(k): float(v) for k, v in weight.items()}
        return np.array([table.get(float(level), 1.0) for level in levels], dtype=np.float32)
    return np.full(len(levels), float(weight), dtype=np.float32)


def aurora_loss(
    pred: Batch, target: Batch, config: LossConfig, stats: Stats | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss and its per-variable MAEs, both on normalised values.

    Args:
        pred: the prediction in physical units, fields `(b, 1, h, w)` / `(b, 1, C, h, w)`.
        target: the target, with the same variables, grid and levels.
        config: the weights.
        stats: extends Aurora's normalisation table (as the model's `surf_stats`).

    Returns:
        The scalar loss and `{"mae/<var>": scalar}`.
    """
    p, t = pred.normalise(stats), target.normalise(stats)
    levels = pred.metadata.atmos_levels
    terms: dict[str, jax.Array] = {}
    surf_total = jnp.float32(0.0)
    for name in p.surf_vars:
        error, valid = _surface_error(name, p, t, pred, target)
        mae = masked_mean(jnp, jnp.abs(error), valid, empty=0.0)
        terms[f"mae/{name}"] = mae
        surf_total += config.surf_weights.get(name, 1.0) * mae
    atmos_total = jnp.float32(0.0)
    for name in p.atmos_vars:
        per_level = jnp.mean(
            jnp.abs(p.atmos_vars[name] - t.atmos_vars[name]), axis=(0, 1, 3, 4)
        )  # (C,)
        terms[f"mae/{name}"] = jnp.mean(per_level)
        weights = _level_weights(config.atmos_weights.get(name, 1.0), levels)
        atmos_total += jnp.mean(weights * per_level)
    n_vars = len(p.surf_vars) + len(p.atmos_vars)
    loss = config.gamma / n_vars * (config.alpha * surf_total + config.beta * atmos_total)
    return loss, terms


def _surface_error(
    name: str, p: Batch, t: Batch, pred: Batch, target: Batch
) -> tuple[jax.Array, jax.Array | None]:
    """Normalised prediction minus target of a surface variable, and its valid points: the
    wave fields' NaN points are left out (`trainers.masking`). A direction's error is its
    angular difference in radians, the unit of the (sine, cosine) pair the model predicts it
    as, whatever the normalisation table says of the angle in degrees."""
    if name in ANGLE_SURF_VARS:
        error, valid = field_error(jnp, name, pred.surf_vars[name], target.surf_vars[name])
        return jnp.deg2rad(error), valid
    return field_error(jnp, name, p.surf_vars[name], t.surf_vars[name])


class LossFn(Protocol):
    """The loss protocol: one lead step's loss and metrics; see the module docstring."""

    def __call__(
        self, pred: Batch, target: Batch, stats: Stats | None, **kwargs: Any
    ) -> tuple[jax.Array, Metrics]: ...


def aurora_mae(
    pred: Batch,
    target: Batch,
    stats: Stats | None = None,
    *,
    surf_weights: Mapping[str, float] | None = None,
    atmos_weights: Mapping[str, Any] | None = None,
    alpha: float = 0.25,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> tuple[jax.Array, Metrics]:
    """The built-in "aurora": `aurora_loss` with the weights as keyword arguments (`LossConfig`'s
    fields; omitted variable weights are the paper's fine-tuning weights)."""
    defaults = LossConfig()
    config = LossConfig(
        surf_weights=defaults.surf_weights if surf_weights is None else surf_weights,
        atmos_weights=defaults.atmos_weights if atmos_weights is None else atmos_weights,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
    )
    return aurora_loss(pred, target, config, stats)


def latitude_weights(lat: Sequence[float]) -> np.ndarray:
    """`cos(lat)` normalised to mean 1 over the grid's latitudes, float32 `(h, 1)`.

    Each row then counts in proportion to the area it covers on a regular grid, as in
    WeatherBench 2's latitude-weighted scores.
    """
    weights = np.cos(np.deg2rad(np.asarray(lat, np.float64)))
    return (weights / weights.mean()).astype(np.float32)[:, None]


def _latitude_weighted(
    error: Callable[[jax.Array], jax.Array],
    tag: str,
    pred: Batch,
    target: Batch,
    stats: Stats | None,
    surf_weights: Mapping[str, float] | None,
    atmos_weights: Mapping[str, Any] | None,
) -> tuple[jax.Array, Metrics]:
    """Σ_v w_v · E_v / V, with `E_v` the latitude-weighted mean of `error(p - t)` on normalised
    values (for atmospheric variables the mean over levels of `w_{v,c} · E_{v,c}`)."""
    p, t = pred.normalise(stats), target.normalise(stats)
    lat = latitude_weights(pred.metadata.lat)
    levels = pred.metadata.atmos_levels
    surf_weights, atmos_weights = surf_weights or {}, atmos_weights or {}
    terms: Metrics = {}
    total = jnp.float32(0.0)
    for name in p.surf_vars:
        difference, valid = _surface_error(name, p, t, pred, target)
        value = masked_mean(jnp, error(difference), valid, lat, empty=0.0)
        terms[f"{tag}/{name}"] = value
        total += float(surf_weights.get(name, 1.0)) * value
    for name in p.atmos_vars:
        per_level = jnp.mean(
            lat * error(p.atmos_vars[name] - t.atmos_vars[name]), axis=(0, 1, 3, 4)
        )  # (C,)
        terms[f"{tag}/{name}"] = jnp.mean(per_level)
        total += jnp.mean(_level_weights(atmos_weights.get(name, 1.0), levels) * per_level)
    return total / (len(p.surf_vars) + len(p.atmos_vars)), terms


def latitude_weighted_mae(
    pred: Batch,
    target: Batch,
    stats: Stats | None = None,
    *,
    surf_weights: Mapping[str, float] | None = None,
    atmos_weights: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, Metrics]:
    """The built-in "lat_mae": the mean over variables of the latitude-weighted (`cos(lat)`,
    `latitude_weights`) MAE on normalised values, each variable (and level, as in "aurora")
    weighted by `surf_weights` / `atmos_weights` (default 1). Metrics `mae/<var>`."""
    return _latitude_weighted(jnp.abs, "mae", pred, target, stats, surf_weights, atmos_weights)


def latitude_weighted_mse(
    pred: Batch,
    target: Batch,
    stats: Stats | None = None,
    *,
    surf_weights: Mapping[str, float] | None = None,
    atmos_weights: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, Metrics]:
    """The built-in "lat_mse": as "lat_mae" with the squared error. Metrics `mse/<var>`."""
    return _latitude_weighted(jnp.square, "mse", pred, target, stats, surf_weights, atmos_weights)


LOSSES: dict[str, LossFn] = {
    "aurora": aurora_mae,
    "lat_mae": latitude_weighted_mae,
    "lat_mse": latitude_weighted_mse,
}
"""The built-in losses by `config.loss.name`."""

AURORA_FIELDS = ("surf_weights", "atmos_weights", "alpha", "beta", "gamma")
"""`config.loss` fields that are the "aurora" loss's keyword arguments (besides `kwargs`)."""


@dataclass(frozen=True, eq=False)
class Loss:
    """A loss function bound to its keyword arguments and to weights over the rollout steps.

    Args:
        fn: a `LossFn` (default Aurora's weighted MAE with the paper's weights).
        kwargs: `fn`'s keyword arguments.
        lead_weights: one weight per rollout step: the steps' losses are averaged with these
            weights (empty: equal weights).
    """

    fn: LossFn = aurora_mae
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    lead_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        weights = tuple(float(w) for w in self.lead_weights)
        if weights and (min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"lead_weights must be >= 0 and not all 0: {weights}.")
        object.__setattr__(self, "lead_weights", weights)

    @classmethod
    def of(cls, spec: Loss | LossConfig | LossFn | str | None) -> Loss:
        """A `Loss` from what a strategy's `loss` argument accepts: a `Loss`, Aurora's weights
        (`LossConfig`), a bare `LossFn`, a name as in `config.loss.name`, or None (Aurora's loss
        with the paper's weights)."""
        if spec is None:
            return cls()
        if isinstance(spec, Loss):
            return spec
        if isinstance(spec, str):
            return cls.from_config({"name": spec})
        if isinstance(spec, LossConfig):
            return cls(aurora_mae, {k: getattr(spec, k) for k in AURORA_FIELDS})
        if callable(spec):
            return cls(spec)
        raise TypeError(f"A loss is a Loss, a LossConfig, a function or a name, not {type(spec)}.")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Loss:
        """The loss `config.loss` names (plain values, not ConfigDicts).

        `name` (default "aurora") is a name of :data:`LOSSES` or an import path; `kwargs` are its
        keyword arguments; `lead_weights` weigh the rollout steps. For "aurora" the fields of
        :data:`AURORA_FIELDS` are keyword arguments too (`kwargs` wins); other losses take only
        `kwargs`.
        """
        from trainers.names import resolve

        name = config.get("name") or "aurora"
        fn = resolve(name, LOSSES, "config.loss.name")
        kwargs = dict(config.get("kwargs") or {})
        if fn is aurora_mae:
            kwargs = {k: config[k] for k in AURORA_FIELDS if k in config} | kwargs
        return cls(fn, kwargs, tuple(config.get("lead_weights") or ()))

    def __call__(
        self, pred: Batch, target: Batch, stats: Stats | None
    ) -> tuple[jax.Array, Metrics]:
        """One lead step's loss and metrics."""
        return self.fn(pred, target, stats, **self.kwargs)

    def check_steps(self, steps: int) -> None:
        """Refuse `lead_weights` that do not give one weight to each of `steps` rollout steps."""
        if self.lead_weights and len(self.lead_weights) != steps:
            raise ValueError(
                f"loss.lead_weights has {len(self.lead_weights)} weights for {steps} rollout "
                f"step(s): give one per step. {self.lead_weights}"
            )

    def over_leads(self, losses: jax.Array) -> jax.Array:
        """The loss of a rollout from its steps' losses `(K,)`: their (`lead_weights`-) mean."""
        self.check_steps(losses.shape[0])
        if not self.lead_weights:
            return jnp.mean(losses)
        weights = np.asarray(self.lead_weights, np.float32)
        return jnp.sum(weights * losses) / weights.sum()
