"""Aurora's training loss: weighted MAE on normalised variables (Bodnar et al. 2025, Suppl. D.1).

    L = γ / (V_S + V_A) · [ α Σ_k w_k MAE_k(surface) + β Σ_k w_k MAE_k(atmospheric) ]

with MAE over batch, latitude and longitude (and, for atmospheric variables, the mean over
pressure levels, as the paper's `1 / (C·H·W)`), no latitude weighting, computed on **normalised**
prediction and target (on physical units geopotential would dominate everything). `V_S`, `V_A`
count the variables present. Per-level weights can be given as `{"z": {500: 2.0}}`; a missing
weight is 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.normalisation import Stats

__all__ = ["FINE_TUNING_WEIGHTS", "LossConfig", "aurora_loss", "dataset_weight"]

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
        mae = jnp.mean(jnp.abs(p.surf_vars[name] - t.surf_vars[name]))
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
