"""Rollouts of a model from every init time of a `WeatherSource`, in batches of init times.

The model's step is compiled once per call (a `ModelStep`); pass one in place of the model to
share it between calls, e.g. scoring and then writing forecasts. `forecast_stream` yields each
lead as it is made, so neither the device nor the host ever holds a whole rollout;
`ensemble_stream` does so for the members of a stochastic model, side by side.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from aurora.batch import Batch, Metadata
from aurora.model.aurora import Aurora
from aurora.rollout import ModelStep, rollout
from data_builders.pipeline import WeatherSource
from trainers.evaluation.states import SourceStates, init_times, model_variables, step_seconds

__all__ = [
    "check_members",
    "checked_inits",
    "ensemble_stream",
    "forecast_stream",
    "forecasts",
    "member_key",
]


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
    rng: jax.Array | None = None,
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
        rng: the noise key of a stochastic model's rollout (`aurora.rollout.rollout`'s `rng`).

    Yields:
        `(inits, inputs, predictions)` per batch of `b <= batch_size` inits: `inits` int64
        seconds `(b,)`, `inputs` the 2-state input `Batch` (source grid), `predictions` an
        iterator over the `steps` leads' `Batch`es (model grid, history 1, on the device).

    Raises:
        ValueError: `steps` or `batch_size` is not positive.
    """
    for now, inputs in _input_batches(step_fn, source, inits, states, steps, batch_size):
        preds = _rollout(step_fn, params, inputs, steps, rng)
        yield now, _first(inputs, len(now)), (_first(p, len(now)) for p in preds)


def ensemble_stream(
    step_fn: ModelStep,
    params: Any,
    source: WeatherSource,
    inits: np.ndarray,
    states: SourceStates,
    *,
    steps: int,
    members: int,
    seed: int = 0,
    batch_size: int = 1,
) -> Iterator[tuple[np.ndarray, Batch, Iterator[list[Batch]]]]:
    """Ensemble rollouts from `inits` in batches: `members` rollouts of a stochastic model run
    side by side, so each lead of every member is at hand at once (for CRPS) and memory holds
    one lead of each member.

    Member `m` of the batch whose first init is `t` rolls out with the key `member_key(seed, m,
    t)`: the same seed gives the same members on a re-run, and every batch of inits draws its
    own noise. A deterministic model makes one member, `forecast_stream`'s rollout (no key).

    Args:
        step_fn, params, source, inits, states, steps, batch_size: as `forecast_stream`.
        members: the ensemble size.
        seed: the run's seed (`config.seed`).

    Yields:
        `(inits, inputs, leads)` per batch of inits: as `forecast_stream`, with each lead the
        list of the members' `Batch`es.

    Raises:
        ValueError: `check_members`; `steps` or `batch_size` not positive.
    """
    check_members(step_fn.model, members)
    stochastic = getattr(step_fn.model, "stochastic", False)
    for now, inputs in _input_batches(step_fn, source, inits, states, steps, batch_size):
        keys = [member_key(seed, m, int(now[0])) if stochastic else None for m in range(members)]
        runs = [_rollout(step_fn, params, inputs, steps, key) for key in keys]
        leads = ([_first(p, len(now)) for p in lead] for lead in zip(*runs, strict=True))
        yield now, _first(inputs, len(now)), leads


def member_key(seed: int, member: int, init: int) -> jax.Array:
    """The key of one member's rollout: the seed's key with the member index and the batch's
    first init (int seconds, folded in as minutes) folded in (`jax.random.fold_in`)."""
    key = jax.random.fold_in(jax.random.key(seed), member)
    return jax.random.fold_in(key, init // 60)


def check_members(model: Any, members: int) -> None:
    """Refuse an ensemble a model cannot make.

    Raises:
        ValueError: `members` below 1, or above 1 for a deterministic model (whose members
            would all be the same forecast).
    """
    if members < 1:
        raise ValueError(f"members must be at least 1, not {members}")
    if members > 1 and not getattr(model, "stochastic", False):
        raise ValueError(
            f"members > 1 needs a stochastic model (one with `stochastic=True`, e.g. "
            f"AuroraV1p5Ensemble); {type(model).__name__} would give {members} identical members"
        )


def _rollout(
    step_fn: ModelStep, params: Any, inputs: Batch, steps: int, rng: jax.Array | None
) -> Iterator[Batch]:
    """`aurora.rollout.rollout`, with the noise key of a stochastic model when given."""
    if rng is None:
        return rollout(step_fn, params, inputs, steps)
    return rollout(step_fn, params, inputs, steps, rng=rng)


def _input_batches(
    step_fn: ModelStep,
    source: WeatherSource,
    inits: np.ndarray,
    states: SourceStates,
    steps: int,
    batch_size: int,
) -> Iterator[tuple[np.ndarray, Batch]]:
    """`(inits, inputs)` per batch of `inits`, inputs padded to `batch_size` rows."""
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
        yield (
            now,
            Batch(
                surf_vars={k: pad(v) for k, v in s.items()},
                static_vars=statics,
                atmos_vars={k: pad(v) for k, v in a.items()},
                metadata=metadata,
            ),
        )


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
