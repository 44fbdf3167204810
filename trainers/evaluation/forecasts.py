"""Rollouts of a model from every init time of a `WeatherSource`, in batches of init times.

The model's step is compiled once per call (a `ModelStep`); pass one in place of the model to
share it between calls, e.g. scoring and then writing forecasts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from aurora.batch import Batch, Metadata
from aurora.model.aurora import Aurora
from aurora.rollout import ModelStep, rollout
from data_builders.pipeline import WeatherSource
from trainers.evaluation.states import SourceStates, init_times, model_variables, step_seconds

__all__ = ["forecasts"]


def forecasts(
    model: Aurora | ModelStep,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    step_hours: float = 6,
    batch_size: int = 1,
) -> Iterator[tuple[np.ndarray, Batch, list[Batch]]]:
    """Roll the model out `steps` steps from every init time (`init_times`) of the source.

    Every batch has `batch_size` rows (a short last batch is padded with its last init, so one
    compiled step serves all, and the padding is dropped from what is yielded).

    Args:
        model: the model, or a `ModelStep` of it to reuse its compiled step.
        params: the model's parameters.
        source: the states to start from.
        steps: rollout steps per init.
        step_hours: the model's time step in hours.
        batch_size: inits per batch.

    Yields:
        `(inits, inputs, predictions)` per batch of `b <= batch_size` inits: `inits` int64
        seconds `(b,)`, `inputs` the 2-state input `Batch` (source grid), `predictions[k - 1]`
        the `Batch` at lead `k * step` (model grid, history 1).

    Raises:
        ValueError: the model's step is not `step_hours`, `steps` or `batch_size` is not
            positive, or no init time has its history.
    """
    step_fn = model if isinstance(model, ModelStep) else ModelStep(model)
    model = step_fn.model
    step = step_seconds(step_hours)
    if model.timestep_minutes * 60 != step:
        raise ValueError(
            f"The model steps {model.timestep_minutes / 60:g} h but step_hours is {step_hours}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    inits = init_times(source, step_hours)
    if not len(inits):
        raise ValueError(f"{source.name}: no time has the state {step_hours} h before it as well")
    surf, atmos, static = model_variables(model, source)
    states = SourceStates(source, surf, atmos)
    statics = {k: np.asarray(source.static[k], np.float32) for k in static}
    for lo in range(0, len(inits), batch_size):
        now = inits[lo : lo + batch_size]
        padded = np.concatenate([now, np.repeat(now[-1:], batch_size - len(now))])  # one shape
        s, a = states.stack(np.stack([padded - step, padded], axis=1))
        metadata = Metadata(
            lat=source.lat,
            lon=source.lon,
            time=(padded // 60).astype(np.int32),
            atmos_levels=source.levels,
        )
        inputs = Batch(surf_vars=s, static_vars=statics, atmos_vars=a, metadata=metadata)
        preds = list(rollout(step_fn, params, inputs, steps))
        yield now, _first(inputs, len(now)), [_first(p, len(now)) for p in preds]


def _first(batch: Batch, n: int) -> Batch:
    """The first `n` batch rows (drops the padding of a short last batch)."""
    if batch.metadata.time.shape[0] == n:
        return batch
    return Batch(
        surf_vars={k: v[:n] for k, v in batch.surf_vars.items()},
        static_vars=batch.static_vars,
        atmos_vars={k: v[:n] for k, v in batch.atmos_vars.items()},
        metadata=batch.metadata.replace(time=batch.metadata.time[:n]),
    )
