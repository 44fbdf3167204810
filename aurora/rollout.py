"""Autoregressive inference rollout, advancing time and rollout step exactly as microsoft-aurora."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from aurora.batch import Batch
from aurora.model.aurora import Aurora

__all__ = ["advance_batch", "rollout"]


def advance_batch(batch: Batch, pred: Batch) -> Batch:
    """The next input: drop the oldest history step, append the prediction, keep static variables.

    Time and `rollout_step` come from the prediction (the model advanced them). Variables the
    prediction has but the input had not are dropped, as in microsoft-aurora.
    """

    def slide(old: jax.Array, new: jax.Array) -> jax.Array:
        return jnp.concatenate([old[:, 1:], new.astype(old.dtype)], axis=1)

    return Batch(
        surf_vars={
            k: slide(batch.surf_vars[k], v)
            for k, v in pred.surf_vars.items()
            if k in batch.surf_vars
        },
        static_vars=batch.static_vars,
        atmos_vars={
            k: slide(batch.atmos_vars[k], v)
            for k, v in pred.atmos_vars.items()
            if k in batch.atmos_vars
        },
        metadata=pred.metadata,
    )


def rollout(model: Aurora, params: Any, batch: Batch, steps: int) -> Iterator[Batch]:
    """Yield `steps` predictions, each fed back as the newest history step.

    One jitted step serves every rollout step: time and `rollout_step` are traced values.
    """
    batch = batch.astype(jnp.float32).crop(model.patch_size)
    batch = batch.replace(
        metadata=batch.metadata.replace(
            rollout_step=jnp.asarray(batch.metadata.rollout_step, jnp.int32)
        )
    )
    step = jax.jit(lambda p, b: model.apply({"params": p}, b))
    for _ in range(steps):
        pred = step(params, batch)
        yield pred
        batch = advance_batch(batch, pred)
