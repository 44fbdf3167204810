"""Variable lead times as data in training (microsoft-aurora's `variable_lead_time`, Aurora 1.5).

The lead of a training step is not stored anywhere: it is the time between the step's input and
its target, `target.metadata.time - input.metadata.time`, both int32 minutes. A model with
`variable_lead_time=True` gets it per sample, as traced data, so every lead shares one compiled
step; any other model steps its own time step (and the Trainer checks that the data agree).
Targets at several leads therefore need nothing from the strategies or the loss but data whose
target times are at those leads (`data_builders.pipeline.Pipeline`'s `lead_times_hours`).

A rollout advances its input only by whole model time steps, as microsoft-aurora's `rollout` with
`fine_lead_times` does (sub-step predictions never become inputs): in a K-step training rollout
the first K - 1 targets are one time step apart and only the last may lie at another lead.
"""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch

__all__ = ["check_lead_times", "lead_hours", "uses_variable_lead_time"]


def uses_variable_lead_time(model: Any) -> bool:
    """Whether `model` takes per-sample lead times (`variable_lead_time=True`)."""
    return bool(getattr(model, "variable_lead_time", False))


def lead_hours(batch: Batch, target: Batch) -> jax.Array:
    """The lead from `batch`'s time to `target`'s valid time, float32 hours of shape `(b,)`.

    Times are int32 minutes, so the difference is exact; the model turns the hours back into
    whole minutes (`aurora.model.lead_time.lead_time_minutes`).
    """
    minutes = jnp.asarray(target.metadata.time, jnp.int32) - jnp.asarray(
        batch.metadata.time, jnp.int32
    )
    return minutes.astype(jnp.float32) / np.float32(60)


def check_lead_times(model: Any, inputs: Batch, targets: list[Batch] | tuple[Batch, ...]) -> None:
    """Refuse targets a model with `variable_lead_time` cannot be trained on.

    Every target but the last must be one model time step after the one before it (the rollout
    feeds those predictions back as inputs); the last may be at any positive lead.

    Raises:
        ValueError: a gap that is not the time step, or a last lead that is not positive.
    """
    step = round(model.timestep.total_seconds() / 60)
    times = [np.asarray(b.metadata.time, np.int64) for b in (inputs, *targets)]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for k, gap in enumerate(gaps[:-1], start=1):
        if np.any(gap != step):
            raise ValueError(
                f"Target {k} is {sorted({int(g) / 60 for g in np.ravel(gap)})} h after the input "
                f"before it; a rollout advances by the model's time step ({step / 60:g} h), so "
                "only the last target may be at another lead."
            )
    if gaps and np.any(gaps[-1] <= 0):
        raise ValueError(f"The last target must lie after its input: leads {gaps[-1] / 60} h.")
