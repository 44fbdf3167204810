"""microsoft-aurora's `level_condition` and `AuroraAirPollution`: parity on the reduced
architecture of tests/test_parity.py, checkpoint conversion, and the preset's hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import xarray as xr

from aurora import AuroraPretrained
from aurora.batch import Batch, Metadata
from aurora.convert import _example_batch, fit_params, to_flax_names, to_pytorch_state_dict
from aurora.model.air_pollution import CAMS_ATMOS_VARS, CAMS_SURF_VARS, AuroraAirPollution
from aurora.model.levelcond import level_param_name
from aurora.normalisation import aurora_stats
from data_builders.readers import open_dataset
from tests.reference.venv import case_dir
from tests.test_parity import TINY, _assert_close, _compare, _spec

_TINY = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}

# The batch's levels: 850 hPa is one where SO2 is clipped under LoRA.
LEVELS = (100, 500, 850)


def _air_pollution_spec(kwargs: dict[str, Any], *, steps: int = 3, **grid: Any) -> dict[str, Any]:
    """A rollout of `AuroraAirPollution` on pollutant fields drawn positive (the log transform's
    domain), with the two history steps the difference prediction indexes."""
    grid = {"h": 19, "w": 36, "levels": LEVELS, **grid}
    return _spec(
        "AuroraAirPollution",
        kwargs,
        steps=steps,
        positive_vars=[*CAMS_SURF_VARS, *CAMS_ATMOS_VARS],
        **grid,
    )


@pytest.mark.reference
def test_tiny_level_condition_matches_reference() -> None:
    """Per-level patch embeddings and heads; `level_condition` holds levels the batch lacks and
    orders them differently, so copies must be picked by level, not by position."""
    kwargs = {**TINY, "level_condition": [1000, 850, 500, 100, 50]}
    _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=3)))


@pytest.mark.reference
@pytest.mark.parametrize("use_lora", [pytest.param(False, marks=pytest.mark.slow), True])
def test_tiny_air_pollution_matches_reference(use_lora: bool) -> None:
    """Feature combiners, difference prediction from history slices 0 and 1, `_mod` outputs
    dropped, positivity from step 2 and, under LoRA, SO2 clipped at 850 hPa; three steps."""
    spec = _air_pollution_spec({**TINY, "use_lora": use_lora})
    errors = _compare(spec)
    assert not any(name.endswith("_mod") for name in errors)
    assert {f"2/surf/{v}" for v in CAMS_SURF_VARS} <= set(errors)
    # The clip must bite for the test to cover it: SO2 at 850 hPa then peaks at its scale.
    with np.load(case_dir(spec) / "preds.npz") as ref:
        so2_850 = ref["0/atmos/so2"][:, :, LEVELS.index(850)].max()
    scale = aurora_stats()["so2_850"][1]
    assert np.isclose(so2_850, scale, rtol=1e-6) == use_lora, (so2_850, scale)
    _assert_close(errors)


def _tiny_batch(model: Any, history: int, levels: tuple[float, ...]) -> Batch:
    """Zeros in every variable the model takes (shapes only matter), `history` steps."""
    h, w = 2 * model.patch_size, 4 * model.patch_size
    return Batch(
        surf_vars={v: np.zeros((1, history, h, w), np.float32) for v in model.surf_vars},
        static_vars={v: np.zeros((h, w), np.float32) for v in model.static_vars},
        atmos_vars={
            v: np.zeros((1, history, len(levels), h, w), np.float32) for v in model.atmos_vars
        },
        metadata=Metadata(
            lat=np.linspace(80, -80, h),
            lon=np.linspace(0, 360, w, endpoint=False),
            time=np.zeros((1,), np.int32),
            atmos_levels=levels,
        ),
    )


def _init_shapes(model: Any, batch: Batch) -> Any:
    return jax.eval_shape(lambda: model.init(jax.random.key(0), batch))


def test_level_condition_refuses_levels_it_has_no_copy_for() -> None:
    model = AuroraPretrained(**_TINY, level_condition=(100, 500))
    with pytest.raises(ValueError, match="850"):
        _init_shapes(model, _tiny_batch(model, 1, (100, 850)))
    with pytest.raises(NotImplementedError, match="7.5"):
        level_param_name(7.5)


def test_difference_prediction_needs_the_history_it_indexes() -> None:
    """`co` adds to history slice 1: a one-step history is refused by name, not mis-indexed."""
    model = AuroraAirPollution(**_TINY)
    with pytest.raises(ValueError, match="history of 2"):
        _init_shapes(model, _tiny_batch(model, 1, (500, 850)))


ADAPT_RUNNER = Path(__file__).parent / "reference" / "run_adapt_air_pollution.py"


def _published_layout(model: AuroraAirPollution) -> dict[str, np.ndarray]:
    """A state dict in the published checkpoint's layout for `model` (default variables and
    levels): the model's own keys where the layouts agree, random arrays in the published
    matrices (`weight_new`, `*_head_new`, `*_head_mod`, `atmos_token_embeds_new`, ...)."""
    rng = np.random.default_rng(0)
    batch = _example_batch(model)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    ours = to_pytorch_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), params))
    D, E, P, T = model.embed_dim, 2 * model.embed_dim, model.patch_size, model.max_history_size

    def array(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    replaced = (
        "encoder.surf_token_embeds.weights.",
        "encoder.atmos_token_embeds.",
        "decoder.surf_heads.",
        "decoder.atmos_heads.",
        "surf_feature_combiner.",
        "atmos_feature_combiner.",
    )
    d = {
        k.replace("level_decoder_alternate", "level_decoder_new"): array(*v.shape)
        for k, v in ours.items()
        if not k.startswith(replaced)
    }
    d["net.encoder.surf_token_embeds.weight"] = array(D, 7, T, P, P)
    d["encoder.surf_token_embeds.weight_new"] = array(D, 22, T, P, P)
    d["encoder.atmos_token_embeds.weight"] = array(D, 5, T, P, P)
    d["encoder.atmos_token_embeds.bias"] = array(D)
    d["encoder.atmos_token_embeds.weight_new"] = array(D, 5, T, P, P)
    d["encoder.atmos_token_embeds.weight_new2"] = array(D, 17, T, P, P)
    heads = {"surf_head": 4, "surf_head_new": 8, "surf_head_mod": 12}
    for level in model.level_condition:
        prefix = f"encoder.atmos_token_embeds_new.layers.{level}"
        d[f"{prefix}.weight"] = array(D, 5, T, P, P)
        d[f"{prefix}.weight_new"] = array(D, 5, T, P, P)
        d[f"{prefix}.weight_new2"] = array(D, 17, T, P, P)
        d[f"{prefix}.bias"] = array(D)
        for head in ("atmos_head", "atmos_head_mod", "atmos_head_new", "atmos_head_mod_new"):
            heads[f"{head}.layers.{level}"] = 5
    for head, n in heads.items():
        d[f"decoder.{head}.weight"] = array(n * P * P, E)
        d[f"decoder.{head}.bias"] = array(n * P * P)
    for kind, names in (("surf", model.surf_vars[:12]), ("atmos", model.atmos_vars)):
        for name in names:
            d[f"{kind}_feature_combiner.{name}.weight"] = array(1, 2)
            d[f"{kind}_feature_combiner.{name}.bias"] = array(1)
    return d


def test_published_air_pollution_layout_adapts_as_the_reference_and_fits_the_model(
    tmp_path: Path,
) -> None:
    """The published layout, adapted by `AuroraAirPollution.adapt_state_dict` and by the
    reference's `_adapt_checkpoint_air_pollution`: the same keys and arrays, and every parameter
    of the model filled (strict fit)."""
    model = AuroraAirPollution(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    )
    state = _published_layout(model)
    np.savez(tmp_path / "state.npz", **state)
    out = case_dir(
        {"patch_size": model.patch_size}, ADAPT_RUNNER, inputs={"state.npz": tmp_path / "state.npz"}
    )
    with np.load(out / "adapted.npz") as f:
        expected = {k: f[k] for k in f.files}

    adapted = model.adapt_state_dict(state)
    assert sorted(adapted) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(adapted[key], value, err_msg=key)
    flat = to_flax_names(
        state, model.patch_size, model.max_history_size, adapt=model.adapt_state_dict
    )
    fit_params(flat, model)  # strict: raises on anything missing, extra or mis-shaped


@pytest.mark.parametrize("long_names", [False, True])
def test_reader_maps_cams_names_to_the_model_variables(tmp_path: Path, long_names: bool) -> None:
    """A CAMS file with the ADS NetCDF short names, or the ADS API's long names, reads as the
    variables `AuroraAirPollution` takes."""
    long = {
        "pm1": "particulate_matter_1um",
        "pm2p5": "particulate_matter_2.5um",
        "pm10": "particulate_matter_10um",
        "tcco": "total_column_carbon_monoxide",
        "tc_no": "total_column_nitrogen_monoxide",
        "tcno2": "total_column_nitrogen_dioxide",
        "gtco3": "total_column_ozone",
        "tcso2": "total_column_sulphur_dioxide",
        "co": "carbon_monoxide",
        "no": "nitrogen_monoxide",
        "no2": "nitrogen_dioxide",
        "go3": "ozone",
        "so2": "sulphur_dioxide",
    }
    rng = np.random.default_rng(0)
    coords = {
        "time": [np.datetime64("2020-01-01T00")],
        "pressure_level": [500.0, 850.0],
        "latitude": [10.0, 0.0],
        "longitude": [0.0, 10.0],
    }

    def field(name: str, atmos: bool) -> tuple[tuple[str, ...], np.ndarray]:
        dims = ("time", "pressure_level") if atmos else ("time",)
        dims += ("latitude", "longitude")
        return dims, rng.uniform(1e-9, 1e-6, [len(coords[d]) for d in dims]).astype(np.float32)

    ds = xr.Dataset(
        {
            long[v] if long_names else v: field(v, v in CAMS_ATMOS_VARS)
            for v in CAMS_SURF_VARS + CAMS_ATMOS_VARS
        },
        coords=coords,
    )
    ds.to_netcdf(tmp_path / "cams.nc")
    read = open_dataset(tmp_path / "cams.nc")
    assert sorted(read.data_vars) == sorted(CAMS_SURF_VARS + CAMS_ATMOS_VARS)
    for v in CAMS_SURF_VARS + CAMS_ATMOS_VARS:
        source = ds[long[v] if long_names else v]
        level = ("level",) if v in CAMS_ATMOS_VARS else ()
        assert read[v].dims == ("time", *level, "latitude", "longitude"), v
        np.testing.assert_array_equal(read[v].values, source.values, err_msg=v)


@pytest.mark.slow
@pytest.mark.reference
def test_air_pollution_full_size_matches_reference_small_grid() -> None:
    """`AuroraAirPollution` as published (1.3 B parameters, LoRA on, 13 per-level copies) on a
    37x72 grid (cropped to 36x72) with four levels, rollout steps 0..2."""
    _assert_close(_compare(_air_pollution_spec({}, h=37, w=72, levels=(50, 500, 850, 1000))))
