"""Rollout input clipping: bound predictions before they are fed back as the next input.

microsoft-aurora's `rollout_input_clipping` (`Aurora.apply_rollout_input_clipping`): the rollout
yields the raw prediction, so losses see what the model produced, and clips only the copy that
becomes the next input, in physical units (after unnormalisation).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from aurora.batch import Batch

__all__ = ["Bounds", "clip_rollout_inputs"]

Bounds = Mapping[str, Mapping[str, float | None]]
"""Per variable, optional `"min"` and `"max"` (either may be missing or `None`)."""


def _clip(fields: Mapping[str, jax.Array], bounds: Bounds) -> dict[str, jax.Array]:
    clipped = dict(fields)
    for name, bound in bounds.items():
        if name in clipped:
            lo, hi = bound.get("min"), bound.get("max")
            if lo is not None:
                clipped[name] = jnp.maximum(clipped[name], lo)
            if hi is not None:
                clipped[name] = jnp.minimum(clipped[name], hi)
    return clipped


def clip_rollout_inputs(pred: Batch, bounds: Bounds | None) -> Batch:
    """`pred` with every bounded surface and atmospheric variable clipped; others unchanged."""
    if not bounds:
        return pred
    return pred.replace(
        surf_vars=_clip(pred.surf_vars, bounds), atmos_vars=_clip(pred.atmos_vars, bounds)
    )
