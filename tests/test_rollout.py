"""`aurora.rollout` with a step built once: history sliding, time, rollout step, static variables.

A stand-in model that extrapolates linearly from its two history states makes every prediction
depend on the history having slid correctly, and compiles in a moment.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import pytest

from aurora.batch import Batch, Metadata
from aurora.rollout import ModelStep, rollout


class Extrapolate:
    """Predicts `2 * newest - oldest + params["b"]`; counts its traces; needs the static field."""

    patch_size, timestep_minutes = 2, 60

    def __init__(self) -> None:
        self.traces = 0

    def apply(self, variables: Any, batch: Batch) -> Batch:
        self.traces += 1  # runs only while tracing
        assert set(batch.static_vars) == {"lsm"}, "static variables must be carried"
        b = variables["params"]["b"]
        step = lambda d: {k: 2 * v[:, -1:] - v[:, -2:-1] + b for k, v in d.items()}
        meta = batch.metadata
        return Batch(
            surf_vars=step(batch.surf_vars),
            static_vars={},
            atmos_vars=step(batch.atmos_vars),
            metadata=meta.replace(
                time=meta.time + self.timestep_minutes, rollout_step=meta.rollout_step + 1
            ),
        )


def make_batch(start: float, h: int = 5, w: int = 4) -> Batch:
    """History states `start` and `start + 1` (constant fields) on an `h` x `w` grid."""
    hist = np.array([start, start + 1], np.float32)
    return Batch(
        surf_vars={"2t": np.broadcast_to(hist[None, :, None, None], (1, 2, h, w))},
        static_vars={"lsm": np.zeros((h, w), np.float32)},
        atmos_vars={"z": np.broadcast_to(hist[None, :, None, None, None], (1, 2, 3, h, w))},
        metadata=Metadata(
            lat=np.linspace(90, -90, h),
            lon=np.arange(w) * 360 / w,
            time=np.array([600], np.int32),
            atmos_levels=(500, 700, 850),
        ),
    )


PARAMS = {"b": np.float32(0.5)}


def check(preds: list[Batch], start: float) -> None:
    """Linear extrapolation with bias 0.5 from (s, s + 1): s + 2.5, s + 4.5, s + 7 ..."""
    x0, x1 = start, start + 1
    for k, pred in enumerate(preds, start=1):
        x0, x1 = x1, 2 * x1 - x0 + 0.5
        assert pred.surf_vars["2t"].shape == (1, 1, 4, 4)  # 5 latitudes cropped to 4
        assert pred.atmos_vars["z"].shape == (1, 1, 3, 4, 4)
        np.testing.assert_allclose(pred.surf_vars["2t"], x1)
        np.testing.assert_allclose(pred.atmos_vars["z"], x1)
        assert int(pred.metadata.rollout_step) == k
        assert int(pred.metadata.time[0]) == 600 + 60 * k


def test_model_step_built_once_serves_every_rollout() -> None:
    model = Extrapolate()
    step = ModelStep(model)
    assert step.model is model and step.patch_size == 2
    first = list(rollout(step, PARAMS, make_batch(0.0), steps=3))
    second = list(rollout(step, PARAMS, make_batch(10.0), steps=2))
    check(first, 0.0)
    check(second, 10.0)
    assert model.traces == 1, "one compiled step must serve every step of every rollout"


def test_rollout_of_a_model_builds_its_own_step() -> None:
    model = Extrapolate()
    check(list(rollout(model, PARAMS, make_batch(1.0), steps=3)), 1.0)  # type: ignore[arg-type]
    check(list(rollout(model, PARAMS, make_batch(2.0), steps=1)), 2.0)  # type: ignore[arg-type]
    assert model.traces == 2  # a fresh step per call


def test_rollout_of_a_plain_step_function_needs_the_patch_size() -> None:
    model = Extrapolate()
    fn = jax.jit(lambda p, b: model.apply({"params": p}, b))
    check(list(rollout(fn, PARAMS, make_batch(3.0), steps=2, patch_size=2)), 3.0)
    with pytest.raises(TypeError, match="patch_size"):
        rollout(fn, PARAMS, make_batch(3.0), steps=2)
