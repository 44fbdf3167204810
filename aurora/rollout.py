"""Autoregressive inference rollout, advancing time and rollout step exactly as microsoft-aurora.

`ModelStep` is one jitted model step; build it once per model and hand it to `rollout` as many
times as needed (as graphcast's `chunked_prediction` takes a predictor), so the model compiles
once per input layout instead of once per call. `rollout(model, ...)` builds a fresh step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from aurora.model.clipping import Bounds, clip_rollout_inputs
from aurora.model.noise import NOISE_RNG, NoiseSource, accumulate, key_noise, noise_shape

__all__ = ["ModelStep", "advance_batch", "rollout"]

Step = Callable[[Any, Batch], Batch]
"""One model step: `(params, batch) -> prediction`, the prediction one step ahead (history 1)."""


class ModelStep:
    """`model.apply` jitted once: `step(params, batch)` is the prediction one step ahead.

    Build one per model and reuse it: the compiled program is kept for each input layout (shapes,
    dtypes, grid), and time and `rollout_step` are traced values, so every rollout step and every
    later call with the same layout reuses it.

    Args:
        model: an `Aurora`, or any Flax module with its `Batch -> Batch` interface (without a
            `patch_size`, inputs are not cropped).
    """

    def __init__(self, model: Aurora) -> None:
        self.model = model
        self.patch_size: int = getattr(model, "patch_size", 1)

        def apply(params: Any, batch: Batch, lead: Any, rng: Any, noise: Any) -> Batch:
            args = () if lead is None else (lead,)
            kwargs: dict[str, Any] = {} if noise is None else {"noise": noise}
            if rng is not None:  # only then: any Flax module with `apply` may stand in
                kwargs["rngs"] = {NOISE_RNG: rng}
            return model.apply({"params": params}, batch, *args, **kwargs)

        self._apply = jax.jit(apply)

    def __call__(
        self,
        params: Any,
        batch: Batch,
        lead_times: Any = None,
        *,
        rng: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> Batch:
        """The prediction one step ahead.

        Args:
            params: the model's parameters (the ``"params"`` collection).
            batch: the input, variables of shape `(b, t, h, w)` / `(b, t, c, h, w)`.
            lead_times: per-sample lead times in hours, `(b,)`, for a model with
                `variable_lead_time` (traced: a new lead time does not recompile); by default
                the model's time step.
            rng: a stochastic model's noise key (the "noise" rng stream); a new key, a new draw.
            noise: a stochastic model's noise itself, `(b, L, D)` (see aurora.model.noise),
                instead of `rng`.

        Returns:
            The prediction, variables of shape `(b, 1, h, w)` / `(b, 1, c, h, w)` (`h` cropped to
            a multiple of the patch size), time and `rollout_step` advanced by one step.
        """
        lead = None
        if getattr(self.model, "variable_lead_time", False):
            if lead_times is None:
                lead_times = self.model.timestep.total_seconds() / 3600
            b = next(iter(batch.surf_vars.values())).shape[0]
            lead = jnp.broadcast_to(jnp.asarray(lead_times, jnp.float32), (b,))
        return self._apply(params, batch, lead, rng, noise)


def advance_batch(batch: Batch, pred: Batch) -> Batch:
    """The next input: drop the oldest history step, append the prediction, keep static variables.

    Time and `rollout_step` come from the prediction (the model advanced them). Variables the
    prediction has but the input had not are dropped, as in microsoft-aurora.

    Args:
        batch: the current input, variables of shape `(b, t, h, w)` / `(b, t, c, h, w)`.
        pred: the model's prediction for it, variables of shape `(b, 1, h, w)` /
            `(b, 1, c, h, w)` on the same grid.

    Returns:
        The input for the next step, of the same shapes as `batch`.
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


def rollout(
    step: Aurora | ModelStep | Step,
    params: Any,
    batch: Batch,
    steps: int,
    *,
    patch_size: int | None = None,
    apply_rollout_input_clipping: bool = True,
    fine_lead_times: Sequence[float] | None = None,
    rng: jax.Array | None = None,
    use_noise_accumulation: bool = True,
    noise_source: NoiseSource | None = None,
) -> Iterator[Batch]:
    """Yield `steps` predictions, each fed back as the newest history step.

    The input is cast to float32 and cropped to the patch size first; one compiled step serves
    every rollout step (time and `rollout_step` are traced values). Reuse a `ModelStep` across
    calls to compile once::

        step = ModelStep(model)
        preds = [list(rollout(step, params, b, steps=4)) for b in batches]

    Args:
        step: a `ModelStep`; an `Aurora` (a new `ModelStep` is built for this call); or any
            `(params, batch) -> prediction` callable, then with `patch_size`.
        params: the model's parameters (the ``"params"`` collection).
        batch: the input, variables of shape `(b, t, h, w)` / `(b, t, c, h, w)`.
        steps: how many predictions to make.
        patch_size: the model's patch size; by default the step's or model's own.
        apply_rollout_input_clipping: clip each prediction by the model's
            `rollout_input_clipping` before it becomes the next input (the yielded prediction
            is never clipped), as microsoft-aurora's `rollout` does.
        fine_lead_times: sub-step lead times in hours within every step (a model with
            `variable_lead_time`), e.g. `[1, 2, ..., 6]`: each is predicted from the same input
            and yielded, and the last, which must equal the time step, becomes the next input.
            The lead is traced data, so the sub-steps share one compiled step.
        rng: the key of a `stochastic` model's member (ignored for other models): the same key
            gives the same member, another key another member. Each model call draws fresh
            noise from it, as microsoft-aurora's backbone draws from torch's generator.
        use_noise_accumulation: with `fine_lead_times`, a stochastic model's noise is the sum of
            the last `len(fine_lead_times)` draws over its square root, carried across sub-steps
            and steps, as microsoft-aurora's rollout does (see aurora.model.noise.accumulate).
        noise_source: where a stochastic model's standard normal draws come from instead of
            `rng` (e.g. another implementation's recorded draws, to reproduce its member).

    Returns:
        An iterator over the `steps` predictions, variables of shape `(b, 1, h, w)` /
        `(b, 1, c, h, w)`, the `k`-th (from 1) at time `batch time + k * timestep` with
        `rollout_step` advanced by `k`.

    Raises:
        TypeError: a plain callable without `patch_size`.
        ValueError: `fine_lead_times` for a model without `variable_lead_time`, or not ending
            at its time step; a stochastic model without `rng` or `noise_source`.
    """
    if not isinstance(step, ModelStep) and hasattr(step, "apply"):
        step = ModelStep(step)  # a model
    patch_size = getattr(step, "patch_size", None) if patch_size is None else patch_size
    if patch_size is None:
        raise TypeError("rollout with a step function needs the model's patch_size")
    model = getattr(step, "model", None)
    transform = getattr(model, "batch_transform_hook", None)
    if transform is not None:  # A preset may change the variables; they must be fixed to slide.
        batch = transform(batch)
    batch = batch.astype(jnp.float32).crop(patch_size)
    batch = batch.replace(
        metadata=batch.metadata.replace(
            rollout_step=jnp.asarray(batch.metadata.rollout_step, jnp.int32)
        )
    )
    bounds = (
        getattr(model, "rollout_input_clipping", None) if apply_rollout_input_clipping else None
    )
    leads: tuple[float | None, ...] = (None,)
    if fine_lead_times is not None:
        _check_fine_lead_times(model, fine_lead_times)
        leads = tuple(fine_lead_times)
    if getattr(model, "stochastic", False):
        if (rng is None) == (noise_source is None):
            raise ValueError("A stochastic model's rollout needs `rng` or `noise_source`.")
        noise_source = noise_source or key_noise(rng, noise_shape(model, batch))
    elif noise_source is not None:
        raise ValueError("`noise_source` is for a stochastic model.")
    accumulate_over = len(leads) if use_noise_accumulation and fine_lead_times else 1
    return _predictions(step, params, batch, steps, bounds, leads, noise_source, accumulate_over)


def _check_fine_lead_times(model: Any, fine_lead_times: Sequence[float]) -> None:
    if not getattr(model, "variable_lead_time", False):
        raise ValueError("`fine_lead_times` requires a model with `variable_lead_time=True`.")
    hours = model.timestep.total_seconds() / 3600
    if not fine_lead_times or not math.isclose(fine_lead_times[-1], hours):
        raise ValueError(f"The last of `fine_lead_times` must be the time step ({hours} hours).")


def _predictions(
    step: Step,
    params: Any,
    batch: Batch,
    steps: int,
    bounds: Bounds | None,
    leads: tuple[float | None, ...],
    noise_source: NoiseSource | None,
    accumulate_over: int,
) -> Iterator[Batch]:
    """Every lead of `leads` (None: the time step) from the same input, the last fed back."""
    cache = None
    for _ in range(steps):
        for hours in leads:
            kwargs = {}
            if noise_source is not None:
                draws = noise_source(accumulate_over if cache is None else 1)
                cache, kwargs["noise"] = accumulate(cache, draws)
            lead = () if hours is None else (hours,)
            pred = step(params, batch, *lead, **kwargs)
            yield pred
        batch = advance_batch(batch, clip_rollout_inputs(pred, bounds))
