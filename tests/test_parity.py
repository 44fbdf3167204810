"""Parity with microsoft-aurora 2.0.1: same weights, same batch, same numbers.

Each case builds the PyTorch model in the reference virtualenv with random weights (plus noise on
every parameter, so that zero-initialised LoRA and AdaLN weights matter), runs a rollout there,
converts the state dict with `aurora.convert`, runs our rollout and compares every output variable
at every step: max |jax - torch| / max |torch| <= 1e-4 in float32 with matmul precision "highest".
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from flax import traverse_util

import aurora
from aurora.batch import Batch, Metadata
from aurora.convert import convert_pytorch_checkpoint, load_state_dict
from tests.reference.venv import case_dir

TOLERANCE = 1e-4

# Same code paths as the real models, small enough for CI: two stages, short depths.
TINY = {
    "encoder_depths": [1, 2],
    "encoder_num_heads": [2, 4],
    "decoder_depths": [2, 1],
    "decoder_num_heads": [4, 2],
    "embed_dim": 32,
    "num_heads": 4,
    "window_size": [2, 2, 4],
}


def _spec(
    preset: str,
    kwargs: dict[str, Any],
    *,
    steps: int,
    h: int = 17,
    w: int = 32,
    levels=(100, 500, 850),
    **extra: Any,
) -> dict[str, Any]:
    return {
        "preset": preset,
        "kwargs": kwargs,
        "seed": 0,
        "noise": 0.02,
        "batch": 1,
        "history": 2,
        "h": h,
        "w": w,
        "levels": list(levels),
        "time": "2020-06-01T12:00",
        "steps": steps,
        **extra,
    }


def _jax_model(spec: dict[str, Any]) -> aurora.Aurora:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    if "timestep_hours" in kwargs:
        kwargs["timestep"] = timedelta(hours=kwargs.pop("timestep_hours"))
    return aurora.PRESETS[spec["preset"]](**kwargs)


def _jax_batch(spec: dict[str, Any], arrays: dict[str, np.ndarray]) -> Batch:
    def pick(prefix: str) -> dict[str, np.ndarray]:
        return {k.split("/", 1)[1]: arrays[k] for k in arrays if k.startswith(prefix + "/")}

    return Batch(
        surf_vars=pick("surf"),
        static_vars=pick("static"),
        atmos_vars=pick("atmos"),
        metadata=Metadata(
            lat=arrays["lat"],
            lon=arrays["lon"],
            time=(np.datetime64(spec["time"]),) * spec["batch"],
            atmos_levels=tuple(spec["levels"]),
        ),
    )


def _on_device(params: dict[str, Any]) -> dict[str, Any]:
    """Params as device arrays, moved one at a time so that each host copy goes as it is moved:
    a 1.3 B model's params held twice (host and device) do not fit beside the other processes of
    a 24 GiB machine."""
    flat = traverse_util.flatten_dict(params)
    del params
    for key in list(flat):
        flat[key] = jax.device_put(flat.pop(key))
    return traverse_util.unflatten_dict(flat)


def _load_case(
    spec: dict[str, Any], out: Path, model: aurora.Aurora | None = None
) -> tuple[aurora.Aurora, Any, Batch, dict[str, np.ndarray]]:
    """A reference case's outputs on our side: the model (the spec's unless given), its converted
    parameters on the device, the input batch and the reference's predictions."""
    model = model or _jax_model(spec)
    params = _on_device(convert_pytorch_checkpoint(load_state_dict(out / "state_dict.ckpt"), model))
    with np.load(out / "batch.npz") as f:
        batch = _jax_batch(spec, {k: f[k] for k in f.files})
    with np.load(out / "preds.npz") as f:
        ref = {k: f[k] for k in f.files}
    return model, params, batch, ref


def _compare(spec: dict[str, Any], model: aurora.Aurora | None = None) -> dict[str, float]:
    """Run both sides; return the worst relative error per `step/kind/var`. `model` replaces the
    spec's on our side (the same architecture run another way)."""
    model, params, batch, ref = _load_case(spec, case_dir(spec), model)
    with jax.default_matmul_precision("highest"):
        return _errors(aurora.rollout(model, params, batch, spec["steps"]), ref)


def _errors(predictions: Iterable[Batch], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """The worst relative error per `step/kind/var` of the predictions against the reference's
    (`preds.npz` of tests/reference/run_reference.py), after checking their times and steps."""
    errors = {}
    for step, pred in enumerate(predictions):
        assert int(pred.metadata.rollout_step) == int(ref[f"{step}/rollout_step"])
        assert np.array_equal(
            np.array(pred.metadata.datetimes(), dtype="datetime64[m]"),
            ref[f"{step}/time"].astype("datetime64[m]"),
        )
        for kind, variables in (("surf", pred.surf_vars), ("atmos", pred.atmos_vars)):
            for name, value in variables.items():
                expected = ref[f"{step}/{kind}/{name}"]
                value = np.asarray(value)
                assert value.shape == expected.shape, (name, value.shape, expected.shape)
                errors[f"{step}/{kind}/{name}"] = float(
                    np.abs(value - expected).max() / np.abs(expected).max()
                )
    return errors


def _assert_close(errors: dict[str, float]) -> None:
    print(json.dumps(errors, indent=1))
    not_finite = sorted(k for k, v in errors.items() if not np.isfinite(v))
    assert not not_finite, f"relative errors not finite (NaN or infinity) for {not_finite}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e} > {TOLERANCE}"


@pytest.mark.reference
def test_tiny_architecture_matches_reference() -> None:
    """Reduced architecture, no LoRA, 2-step rollout on a 17x32 grid (cropped to 16x32)."""
    _assert_close(_compare(_spec("AuroraPretrained", TINY, steps=2)))


@pytest.mark.reference
@pytest.mark.parametrize("mode", ["single", "from_second", "all"])
def test_tiny_lora_modes_match_reference_over_three_steps(mode: str) -> None:
    """LoRA on, each mode, rollout steps 0, 1 and 2 (so 'from_second' switches on, 'all'
    indexes)."""
    kwargs = {**TINY, "use_lora": True, "lora_mode": mode, "lora_steps": 3}
    _assert_close(_compare(_spec("Aurora", kwargs, steps=3)))


@pytest.mark.reference
def test_tiny_lora_beyond_lora_steps_matches_reference() -> None:
    """Rollout past `lora_steps`: the adapter must switch off at step 2."""
    kwargs = {**TINY, "use_lora": True, "lora_mode": "all", "lora_steps": 2}
    _assert_close(_compare(_spec("Aurora", kwargs, steps=3)))


@pytest.mark.reference
def test_tiny_12h_timestep_and_odd_patches_match_reference() -> None:
    """12-hour step, patch grid with odd sizes (padding in merging and windows)."""
    kwargs = {**TINY, "timestep_hours": 12, "patch_size": 2}
    _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=2, h=23, w=44)))


@pytest.mark.reference
def test_aurora_small_matches_reference() -> None:
    """AuroraSmallPretrained as published (LoRA off) on a 33x64 grid, 4 levels."""
    _assert_close(
        _compare(
            _spec("AuroraSmallPretrained", {}, steps=1, h=33, w=64, levels=(100, 250, 500, 850))
        )
    )


@pytest.mark.slow
@pytest.mark.reference
def test_aurora_small_with_lora_rollout_matches_reference() -> None:
    kwargs = {"use_lora": True, "lora_mode": "single"}
    _assert_close(
        _compare(
            _spec("AuroraSmallPretrained", kwargs, steps=3, h=33, w=64, levels=(100, 250, 500, 850))
        )
    )


@pytest.mark.slow
@pytest.mark.reference
def test_aurora_025_architecture_matches_reference_small_grid() -> None:
    """Aurora (1.3 B, LoRA on) on a small grid, rollout steps 0..2."""
    _assert_close(_compare(_spec("Aurora", {}, steps=3, h=49, w=96, levels=(50, 250, 500, 850))))


@pytest.mark.slow
@pytest.mark.reference
def test_full_025_grid_matches_reference() -> None:
    """The full 721x1440 grid (cropped to 720 rows) with 13 levels, AuroraSmall, one step.

    Our side runs with `remat`, which in a forward pass only chunks: Swin blocks go through their
    windows and the level Perceivers through their patches a chunk at a time. Unchunked, the
    decoder's whole-grid activations (64,800 patches x 13 levels) outgrow this 24 GiB machine.
    The 1.3 B model at this size needs more than this machine has for the PyTorch side alone (it
    was killed); its architecture is covered on a small grid above, and the grid-only code paths
    (encodings, padding, windows at 180x360 patches) are the same for both presets."""
    levels = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
    spec = _spec("AuroraSmallPretrained", {}, steps=1, h=721, w=1440, levels=levels)
    _assert_close(_compare(spec, _jax_model(spec).clone(remat=True)))
