"""Rollouts of a model from every init time of a `WeatherSource`, in batches of init times.

The model's step is compiled once per call (a `ModelStep`); pass one in place of the model to
share it between calls, e.g. scoring and then writing forecasts. `forecast_stream` yields each
lead as it is made, so neither the device nor the host ever holds a whole rollout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from aurora.batch import Batch, Metadata
from aurora.model.aurora import Aurora
from aurora.rollout import ModelStep, rollout
from data_builders.pipeline import WeatherSource
from trainers.evaluation.states import SourceStates, init_times, model_variables, step_seconds

__all__ = ["checked_inits", "forecast_stream", "forecasts"]


def forecasts(
    model: Aurora | ModelStep,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    step_hours: float = 6,
    batch_size: int = 1,
    init_hours: Sequence[int] | None = None,
) -> Iterator[tuple[np.ndarray, Batch, list[Batch]]]:
    """Roll the model out `steps` steps from every init time (`init_times`) of the source.

    Holds every lead of a batch at once; `forecast_stream` yields them one at a time.

    Args:
        model: the model, or a `ModelStep` of it to reuse its compiled step.
        params: the model's parameters.
        source: the states to start from.
        steps: rollout steps per init.
        step_hours: the model's time step in hours.
        batch_size: inits per batch.
        init_hours: only inits at these hours of the day (UTC); None: every hour.

    Yields:
        `(inits, inputs, predictions)` per batch of `b <= batch_size` inits: `inits` int64
        seconds `(b,)`, `inputs` the 2-state input `Batch` (source grid), `predictions[k - 1]`
        the `Batch` at lead `k * step` (model grid, history 1).

    Raises:
        ValueError: see `forecast_stream`.
    """
    step_fn = model if isinstance(model, ModelStep) else ModelStep(model)
    inits = checked_inits(step_fn, source, step_hours, init_hours)
    surf, atmos, _ = model_variables(step_fn.model, source)
    states = SourceStates(source, surf, atmos)
    for now, inputs, preds in forecast_stream(
        step_fn, params, source, inits, states, steps=steps, batch_size=batch_size
    ):
        yield now, inputs, list(preds)


def checked_inits(
    step_fn: ModelStep, source: WeatherSource, step_hours: float, hours: Sequence[int] | None
) -> np.ndarray:
    """The init times, after checking the model's step against `step_hours`."""
    step = step_seconds(step_hours)
    if step_fn.model.timestep_minutes * 60 != step:
        raise ValueError(
            f"The model steps {step_fn.model.timestep_minutes / 60:g} h but step_hours is "
            f"{step_hours}"
        )
    inits = init_times(source, step_hours, hours)
    if not len(inits):
        at = "" if hours is None else f" at hours {list(hours)} UTC"
        raise ValueError(
            f"{source.name}: no time{at} has the state {step_hours} h before it as well"
        )
    return inits


def forecast_stream(
    step_fn: ModelStep,
    params: Any,
    source: WeatherSource,
    inits: np.ndarray,
    states: SourceStates,
    *,
    steps: int,
    batch_size: int = 1,
) -> Iterator[tuple[np.ndarray, Batch, Iterator[Batch]]]:
    """Rollouts from `inits` in batches, each lead yielded as the model makes it.

    Every batch has `batch_size` rows (a short last batch is padded with its last init, so one
    compiled step serves all, and the padding is dropped from what is yielded). Inputs are read
    through `states`, so a `SourceStates` with uses reads each state once. Exhaust (or drop)
    each batch's predictions before taking the next batch.

    Args:
        step_fn: the model's compiled step.
        params: the model's parameters.
        source: the states to start from (grid, levels, static fields).
        inits: init times, int seconds, each with its two history states in the source.
        states: reads the input states.
        steps: rollout steps per init.
        batch_size: inits per batch.

    Yields:
        `(inits, inputs, predictions)` per batch of `b <= batch_size` inits: `inits` int64
        seconds `(b,)`, `inputs` the 2-state input `Batch` (source grid), `predictions` an
        iterator over the `steps` leads' `Batch`es (model grid, history 1, on the device).

    Raises:
        ValueError: `steps` or `batch_size` is not positive.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    step = step_fn.model.timestep_minutes * 60
    statics = {
        k: np.asarray(source.static[k], np.float32)
        for k in step_fn.model.static_vars
        if k in source.static
    }
    for lo in range(0, len(inits), batch_size):
        now = np.asarray(inits[lo : lo + batch_size], np.int64)
        s, a = states.stack(np.stack([now - step, now], axis=1))
        extra = batch_size - len(now)
        pad = lambda x, extra=extra: np.concatenate([x, np.repeat(x[-1:], extra, axis=0)])
        padded = pad(now)  # one shape for every batch
        metadata = Metadata(
            lat=source.lat,
            lon=source.lon,
            time=(padded // 60).astype(np.int32),
            atmos_levels=source.levels,
        )
        inputs = Batch(
            surf_vars={k: pad(v) for k, v in s.items()},
            static_vars=statics,
            atmos_vars={k: pad(v) for k, v in a.items()},
            metadata=metadata,
        )
        preds = rollout(step_fn, params, inputs, steps)
        yield now, _first(inputs, len(now)), (_first(p, len(now)) for p in preds)


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
