"""Positive variables: clamp them at zero on the way in and (from some rollout step) on the way out.

microsoft-aurora's `positive_surf_vars` / `positive_atmos_vars`. Both clamps act on *normalised*
values, as the reference does (it clamps after `Batch.normalise` and before `Batch.unnormalise`),
so zero means "at the normalisation location", not zero in physical units.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

__all__ = ["clamp_inputs", "clamp_prediction"]


def clamp_inputs(
    fields: Mapping[str, jax.Array], positive: tuple[str, ...]
) -> dict[str, jax.Array]:
    """The encoder's inputs with the `positive` variables clamped at zero (every rollout step)."""
    return {k: jnp.maximum(v, 0) if k in positive else v for k, v in fields.items()}


def clamp_prediction(
    fields: Mapping[str, jax.Array],
    positive: tuple[str, ...],
    rollout_step: jax.Array | int,
    at_first_step: bool,
) -> dict[str, jax.Array]:
    """The prediction with the `positive` variables clamped at zero once rollout is under way.

    `rollout_step` is the prediction's (the input's plus one). The first prediction is left as is
    unless `at_first_step` (microsoft-aurora's `clamp_at_first_step`, meant for inference), so
    training on one-step targets sees the raw output. `rollout_step` may be traced: the choice is
    a `jnp.where`, not a recompile.
    """
    if not positive:
        return dict(fields)
    clamp = jnp.asarray(rollout_step) >= (1 if at_first_step else 2)
    return {
        k: jnp.where(clamp, jnp.maximum(v, 0), v) if k in positive else v for k, v in fields.items()
    }
