"""A user-written model: not Aurora, trained by the same Trainer through the config.

Any Flax module whose `__call__(batch)` maps an input `Batch` to the next state (Aurora's interface,
see `trainers/models.py`) can be named in the config::

    config.model.preset = "examples.tiny_model:PerVariableConv"
    config.model.kwargs = {"atmos_vars": ("z", "t"), "features": 8}

This one predicts each variable's change over one step from its own normalised history with a
small convolution: a baseline in a few hundred parameters, and a template for your own.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aurora.batch import Batch


class PerVariableConv(nn.Module):
    """Next state = last state + a two-layer convolution of the variable's normalised history.

    Args:
        surf_vars: the surface variables it predicts (the batch's others are dropped).
        atmos_vars: the atmospheric variables it predicts, all levels at once.
        static_vars: static variables every convolution also sees (e.g. the land-sea mask).
        features: hidden channels of each variable's convolution.
        kernel_size: the convolutions' spatial extent.
        timestep: the model's step (the Trainer checks the data's against it).
        surf_stats: normalisation statistics beyond Aurora's table (filled from the dataset for
            variables outside it).
        dtype: the computation dtype (Flax's convention; `precision="bf16-mixed"` sets bfloat16).
    """

    surf_vars: tuple[str, ...] = ()
    atmos_vars: tuple[str, ...] = ()
    static_vars: tuple[str, ...] = ()
    features: int = 8
    kernel_size: int = 3
    timestep: timedelta = timedelta(hours=6)
    surf_stats: Mapping[str, tuple[float, float]] | None = None
    dtype: Any = None

    @property
    def timestep_minutes(self) -> int:
        """The step in minutes, as Aurora has it (read by `--mode=test` and `predict`)."""
        return int(self.timestep.total_seconds() // 60)

    def _step(self, name: str, x: jax.Array, statics: jax.Array) -> jax.Array:
        """One variable's next normalised state `(b, 1, c, h, w)` from its history
        `(b, t, c, h, w)` and the static fields `(h, w, s)`: the last state plus a convolution
        of both."""
        b, t, c, h, w = x.shape
        history = jnp.moveaxis(x.reshape(b, t * c, h, w), 1, -1)  # channels last
        history = jnp.concatenate([history, jnp.broadcast_to(statics, (b, *statics.shape))], -1)
        hidden = nn.Conv(self.features, (self.kernel_size,) * 2, dtype=self.dtype, name=name)
        # The output layer starts at zero, so the untrained model is persistence.
        out = nn.Conv(
            c,
            (self.kernel_size,) * 2,
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            name=f"{name}_out",
        )
        change = out(nn.gelu(hidden(history))).astype(jnp.float32)  # (b, h, w, c)
        return x[:, -1:] + jnp.moveaxis(change, -1, 1)[:, None]

    @nn.compact
    def __call__(self, batch: Batch) -> Batch:
        normed = batch.normalise(self.surf_stats)
        h, w = batch.spatial_shape
        statics = (  # (h, w, s)
            jnp.stack([normed.static_vars[v] for v in self.static_vars], -1)
            if self.static_vars
            else jnp.zeros((h, w, 0), jnp.float32)
        )
        surf = {
            v: self._step(f"surf_{v}", normed.surf_vars[v][:, :, None], statics)[:, :, 0]
            for v in self.surf_vars
        }
        atmos = {
            v: self._step(f"atmos_{v}", normed.atmos_vars[v], statics) for v in self.atmos_vars
        }
        pred = Batch(
            surf_vars=surf,
            static_vars=dict(normed.static_vars),
            atmos_vars=atmos,
            metadata=batch.metadata.replace(
                time=jnp.asarray(batch.metadata.time, jnp.int32) + self.timestep_minutes,
                rollout_step=jnp.asarray(batch.metadata.rollout_step, jnp.int32) + 1,
            ),
        )
        return pred.unnormalise(self.surf_stats)
