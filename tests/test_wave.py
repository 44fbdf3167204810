"""`AuroraWave` (aurora/model/wave.py): parity with microsoft-aurora's on HRES-WAM-like batches
(NaN over land, absent wave systems, directions in degrees), its variable names, hooks and
checkpoint rule, and the readers' HRES-WAM names and NaNs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import aurora
from aurora.batch import Batch, Metadata
from aurora.convert import convert_pytorch_checkpoint, load_state_dict
from aurora.model.wave import ANGLE_SURF_VARS, AuroraWave
from data_builders.errors import DataError
from data_builders.readers import open_dataset
from tests.reference.venv import RUNNER, case_dir
from tests.test_parity import TINY, TOLERANCE, _jax_model, _load_case, _spec

WAVE_RUNNER = Path(__file__).parent / "reference" / "run_wave.py"


def _compare_wave(spec: dict[str, Any]) -> dict[str, float]:
    """Run both sides; NaN positions must be identical, and the worst relative error per
    `step/kind/var` is returned over the rest (directions compared modulo 360 degrees)."""
    out = case_dir(spec, WAVE_RUNNER, inputs={"run_reference.py": RUNNER})
    model, params, batch, ref = _load_case(spec, out)
    with np.load(out / "direction_norms.npz") as f:
        norms = {k: f[k] for k in f.files}

    errors = {}
    masked = present = 0
    with jax.default_matmul_precision("highest"):
        for step, pred in enumerate(aurora.rollout(model, params, batch, spec["steps"])):
            assert int(pred.metadata.rollout_step) == int(ref[f"{step}/rollout_step"])
            for kind, variables in (("surf", pred.surf_vars), ("atmos", pred.atmos_vars)):
                assert sorted(variables) == sorted(
                    k.split("/")[2] for k in ref if k.startswith(f"{step}/{kind}/")
                )
                for name, value in variables.items():
                    key = f"{step}/{kind}/{name}"
                    expected, value = ref[key], np.asarray(value)
                    assert value.shape == expected.shape, (key, value.shape, expected.shape)
                    nan = np.isnan(expected)
                    np.testing.assert_array_equal(np.isnan(value), nan, err_msg=key)
                    masked, present = masked + nan.sum(), present + (~nan).sum()
                    diff = np.abs(value - expected)[~nan]
                    scale = np.abs(expected[~nan]).max(initial=0.0)
                    if name in ANGLE_SURF_VARS:
                        assert ((value >= 0) & (value < 360))[~nan].all(), key
                        # The network predicts the vector (sine, cosine) of length r; `atan2`
                        # turns its error e into an angle error of e / r, so directions are
                        # compared as vectors: r * angle error (radians) against max r.
                        r = norms[f"{step}/{name}"][~nan]
                        diff = r * np.deg2rad(np.minimum(diff, 360 - diff))
                        scale = r.max(initial=0.0)
                    errors[key] = float(diff.max(initial=0.0) / scale) if scale else 0.0
    assert masked and present, "the predictions must hold both masked and present values"
    return errors


def _assert_close(errors: dict[str, float]) -> None:
    worst = max(errors, key=errors.get)
    print(json.dumps(errors, indent=1))
    assert errors[worst] <= TOLERANCE, f"{worst}: relative error {errors[worst]:.2e} > {TOLERANCE}"


@pytest.mark.reference
def test_tiny_wave_matches_reference_over_three_steps() -> None:
    """LoRA from the second step, stabilised level aggregation, every wave mask."""
    _assert_close(_compare_wave(_spec("AuroraWave", TINY, steps=3)))


@pytest.mark.reference
def test_published_wave_layout_converts_to_the_same_params() -> None:
    """The reference's state dict with the wave checkpoint's `k_ln` / `q_ln` names converts to
    the same parameters through `convert_pytorch_checkpoint` (the preset's `adapt_state_dict`)."""
    spec = _spec("AuroraWave", TINY, steps=3)
    state = load_state_dict(
        case_dir(spec, WAVE_RUNNER, inputs={"run_reference.py": RUNNER}) / "state_dict.ckpt"
    )
    published = {
        k.replace(".ln_k.", ".k_ln.").replace(".ln_q.", ".q_ln."): v for k, v in state.items()
    }
    assert published.keys() != state.keys()
    model = _jax_model(spec)
    expected = convert_pytorch_checkpoint(state, model)
    converted = convert_pytorch_checkpoint(published, model)
    assert jax.tree.all(jax.tree.map(np.array_equal, converted, expected))


@pytest.mark.slow
@pytest.mark.reference
def test_aurora_wave_matches_reference_small_grid() -> None:
    """The published architecture (1.3 B, LoRA from the second step) on a small grid."""
    _assert_close(
        _compare_wave(_spec("AuroraWave", {}, steps=3, h=49, w=96, levels=(50, 250, 500, 850)))
    )


def test_surf_vars_are_supplemented_as_in_microsoft_aurora() -> None:
    model = AuroraWave(surf_vars=("2t", "swh", "mwd", "wind", "10u_wave", "10v_wave"))
    assert model.surf_vars == (
        *("2t", "swh", "swh_density", "mwd_sin", "mwd_cos", "mwd_density", "wind"),
        *("wind_density", "10u_wave", "10u_wave_density", "10v_wave", "10v_wave_density"),
    )
    assert model.input_surf_vars == ("2t", "swh", "mwd", "wind", "10u_wave", "10v_wave", "dwi")
    assert model.clone().surf_vars == model.surf_vars  # Flax rebuilds modules from their fields
    assert AuroraWave().raw_surf_vars[:6] == ("2t", "10u", "10v", "msl", "swh", "mwd")


def _wave_batch(step: int) -> Batch:
    swh = jnp.array([[[[0.0, 2.0], [1.0, 0.0]]]])
    return Batch(
        surf_vars={
            "swh": swh,
            "mwd": jnp.full_like(swh, 90.0),
            "mwp": jnp.full_like(swh, 8.0),
            "wind": jnp.full_like(swh, 10.0),
            "dwi": jnp.full_like(swh, 90.0),
        },
        static_vars={},
        atmos_vars={},
        metadata=Metadata(
            lat=(10.0, 0.0),
            lon=(0.0, 10.0),
            time=(np.datetime64("2020-01-01"),),
            atmos_levels=(500,),
            rollout_step=step,
        ),
    )


@pytest.mark.parametrize("step", [0, 1])
def test_batch_transform_masks_absent_waves_in_given_data_only(step: int) -> None:
    """Heights below 1e-4 mask their system at rollout step 0 only; the step is traced."""
    model = AuroraWave(surf_vars=("swh", "mwd", "mwp", "wind", "10u_wave", "10v_wave"))
    out = jax.jit(model.batch_transform_hook)(_wave_batch(step))
    absent = np.array([[[[True, False], [False, True]]]]) & (step == 0)
    for name in ("swh", "mwd", "mwp"):
        np.testing.assert_array_equal(np.isnan(out.surf_vars[name]), absent, err_msg=name)
    assert "dwi" not in out.surf_vars  # wind from the east: u = -10, v = 0
    np.testing.assert_allclose(out.surf_vars["10u_wave"], -10.0)
    np.testing.assert_allclose(out.surf_vars["10v_wave"], 0.0, atol=1e-5)


def test_hooks_round_trip_directions_and_mask_land() -> None:
    """Degrees -> sine/cosine -> degrees; NaN where the density is low or `wmb` says land."""
    model = AuroraWave(surf_vars=("mwd", "swh"))
    angles = jnp.array([[[[10.0, 350.0], [jnp.nan, 180.0]]]])
    normed = Batch(
        surf_vars={"mwd": angles, "swh": jnp.ones_like(angles)},
        static_vars={"wmb": jnp.array([[1.0, 1.0], [1.0, 0.0]])},
        atmos_vars={},
        metadata=_wave_batch(0).metadata,
    )
    enc = model._pre_encoder_hook(normed)
    assert set(enc.surf_vars) == {"mwd_sin", "mwd_cos", "mwd_density", "swh", "swh_density"}
    np.testing.assert_array_equal(enc.surf_vars["mwd_density"], [[[[1, 1], [0, 1]]]])
    assert not np.isnan(enc.surf_vars["mwd_sin"]).any()
    logits = jnp.array([[[[3.0, 3.0], [3.0, 3.0]]]])
    pred = enc.replace(surf_vars={**enc.surf_vars, "mwd_density": logits})
    pred = pred.replace(surf_vars={**pred.surf_vars, "swh_density": -logits})
    out = model._post_decoder_hook(normed, pred)
    assert set(out.surf_vars) == {"mwd", "swh"}
    np.testing.assert_allclose(out.surf_vars["mwd"][0, 0, 0], [10.0, 350.0], atol=1e-4)
    assert np.isnan(out.surf_vars["mwd"][0, 0, 1, 1])  # land by `wmb`
    assert np.isnan(out.surf_vars["swh"]).all()  # density below one half


def test_wave_checkpoint_renames_level_aggregation_norms() -> None:
    state = {
        "net.encoder.level_agg.layers.0.0.k_ln.weight": np.ones(4, np.float32),
        "net.encoder.level_agg.layers.0.0.q_ln.bias": np.zeros(4, np.float32),
    }
    model = AuroraWave()
    assert sorted(model.adapt_state_dict(state)) == [
        "encoder.level_agg.layers.0.0.ln_k.weight",
        "encoder.level_agg.layers.0.0.ln_q.bias",
    ]
    assert model.checkpoint_layout == "wave" != aurora.Aurora.checkpoint_layout
    assert aurora.PRESETS["AuroraWave"] is AuroraWave


def _wam_file(path: Path) -> Path:
    lat, lon = np.array([10.0, 0.0]), np.array([0.0, 10.0])
    height = np.array([[[np.nan, 2.0], [1.0, 0.5]]], np.float32)  # land at the first point
    dims = ("time", "latitude", "longitude")
    ds = xr.Dataset(
        dict.fromkeys(("mwd", "pp1d", "dwi", "wind", "mean_wave_period"), (dims, height)),
        coords={"time": [np.datetime64("2020-01-01T00")], "latitude": lat, "longitude": lon},
    )
    ds["significant_height_of_combined_wind_waves_and_swell"] = ds["mwd"]  # CDS API name
    ds["t2m"] = (dims, np.full_like(height, np.nan))
    ds.to_netcdf(path / "wam.nc")
    return path / "wam.nc"


def test_reader_keeps_nans_of_wave_variables(tmp_path: Path) -> None:
    """HRES-WAM short names are read as Aurora names, land NaNs kept; elsewhere NaN is still an
    error."""
    path = _wam_file(tmp_path)
    names = ["swh", "mwd", "mwp", "pp1d", "dwi", "wind"]
    ds = open_dataset(path, variables=names)
    for name in names:
        assert np.isnan(ds[name].values[0, 0, 0]) and ds[name].attrs["nan_count"] == 1, name
    assert open_dataset(path, variables=["swh"], fill_nan="zero")["swh"].values[0, 0, 0] == 0
    with pytest.raises(DataError, match="2t"):
        open_dataset(path, variables=["2t"])


def test_zarr_source_keeps_nans_of_wave_variables(tmp_path: Path) -> None:
    """A streamed store keeps the wave fields' NaNs as `open_dataset` does."""
    from data_builders.zarr_source import ZarrBuilder
    from tests.test_zarr_source import KW, _write, wb2_like

    ds = wb2_like()
    land = ds["land_sea_mask"].values > 0.5
    swh = np.where(land, np.nan, 1.5) * np.ones((ds.sizes["time"], 1, 1))
    ds["swh"] = (("time", "latitude", "longitude"), swh.astype(np.float32), {"units": "m"})
    store = _write(ds, tmp_path / "wam.zarr")
    kw = {**KW, "surf_vars": ("2t", "swh"), "stats": {"r_500": (0, 1), "r_850": (0, 1)}}
    builder = ZarrBuilder(str(store), **kw, read_ahead=0)
    record = builder.as_data_source("train").records[0]["surf"]["swh"]
    expected = open_dataset(store, variables=["swh"])["swh"].values[0]  # canonical orientation
    assert np.isnan(record).sum() == land.sum() > 0
    np.testing.assert_array_equal(np.isnan(record), np.isnan(expected))
