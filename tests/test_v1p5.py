"""Aurora 1.5 (`AuroraV1p5`): parity with microsoft-aurora (reduced in CI, full size in the slow
suite), output-only variables, the `scaled_*` log transform, prescribed insolation, default
input clipping and `_adapt_checkpoint_v1p5`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import aurora
from aurora.batch import Batch, Metadata
from aurora.convert import ConversionError, convert_pytorch_checkpoint, load_state_dict
from aurora.insolation import insolation
from aurora.model.log_transform import log_transform, log_untransform
from aurora.model.v1p5 import V1P5_ROLLOUT_INPUT_CLIPPING, AuroraV1p5
from aurora.rollout import ModelStep, advance_batch
from tests.reference.venv import case_dir
from tests.test_parity import (
    TINY,
    _assert_close,
    _errors,
    _jax_model,
    _load_case,
    _spec,
)

RUNNER = Path(__file__).parent / "reference" / "run_v1p5.py"
TINY_FLOAT32 = {**TINY, "autocast": False}
INPUT_VARS = [v for v in AuroraV1p5.surf_vars if v not in AuroraV1p5.output_only_surf_vars]


def _v1p5_spec(kwargs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A V1.5 case: the batch lacks the output-only variables, as analyses do."""
    return _spec("AuroraV1p5", kwargs, surf_vars=INPUT_VARS, **extra)


def _compare(spec: dict[str, Any], model: aurora.Aurora | None = None) -> dict[str, float]:
    """tests/test_parity.py's comparison, through run_v1p5.py and with the spec's sub-steps;
    `model` replaces the spec's on our side (e.g. the same weights computing in float16)."""
    model, params, batch, ref = _load_case(spec, case_dir(spec, runner=RUNNER), model)
    fine = spec.get("fine_lead_times")
    with jax.default_matmul_precision("highest"):
        predictions = aurora.rollout(model, params, batch, spec["steps"], fine_lead_times=fine)
        errors = _errors(_same_infinities_zeroed(predictions, ref), ref)
    # Every prediction the reference made (sub-steps included) was compared, and none is NaN.
    assert {k.split("/")[0] for k in errors} == {k.split("/")[0] for k in ref}
    assert not [k for k, e in errors.items() if np.isnan(e)]
    return errors


def _same_infinities_zeroed(
    predictions: Iterable[Batch], ref: dict[str, np.ndarray]
) -> Iterator[Batch]:
    """The predictions, with the infinities the reference has at the same places zeroed on both
    sides (in `ref` in place): random full-size weights predict `scaled_*` values whose
    `exp` overflows float32 on both sides. Any other non-finite value still fails."""
    for step, pred in enumerate(predictions):
        fields = {}
        for kind in ("surf", "atmos"):
            fields[kind] = {}
            for name, value in getattr(pred, f"{kind}_vars").items():
                key, value = f"{step}/{kind}/{name}", np.asarray(value)
                same = np.isinf(ref[key]) & (value == ref[key])
                ref[key], fields[kind][name] = np.where(same, 0, ref[key]), np.where(same, 0, value)
        yield pred.replace(surf_vars=fields["surf"], atmos_vars=fields["atmos"])


@pytest.mark.reference
@pytest.mark.parametrize("fine_lead_times", [None, [1.5, 6.0]])
def test_tiny_v1p5_matches_reference(fine_lead_times: list[float] | None) -> None:
    """Three 6 h steps (with sub-steps at 1.5 h from the same inputs): every output, output-only
    ones included, with the log transform, prescribed insolation and default clipping."""
    spec = _v1p5_spec(TINY_FLOAT32, steps=3, fine_lead_times=fine_lead_times)
    errors = _compare(spec)
    assert {"0/surf/scaled_tp_1h", "0/surf/blh", "2/surf/insolation"} <= set(errors)
    _assert_close(errors)


@pytest.mark.slow
@pytest.mark.reference
def test_v1p5_full_architecture_matches_reference_small_grid() -> None:
    """AuroraV1p5 at full size (float32) on a small grid, three steps."""
    spec = _v1p5_spec({"autocast": False}, steps=3, h=49, w=96, levels=(50, 250, 500, 850))
    _assert_close(_compare(spec))


def _tiny_model(**kwargs: Any) -> AuroraV1p5:
    return AuroraV1p5(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in {**TINY_FLOAT32, **kwargs}.items()}
    )


def _tiny_batch(surf_vars: list[str], seed: int = 0) -> Batch:
    rng = np.random.default_rng(seed)
    h, w, levels = 16, 32, (100, 500, 850)
    return Batch(
        surf_vars={v: np.abs(rng.standard_normal((1, 2, h, w), np.float32)) for v in surf_vars},
        static_vars={v: rng.standard_normal((h, w), np.float32) for v in AuroraV1p5.static_vars},
        atmos_vars={v: rng.standard_normal((1, 2, 3, h, w), np.float32) for v in "zuvtq"},
        metadata=Metadata(
            lat=tuple(np.linspace(90, -90, h + 1)[:-1]),
            lon=tuple(np.linspace(0, 360, w, endpoint=False)),
            time=(np.datetime64("2020-06-01T12:00"),),
            atmos_levels=levels,
        ),
    )


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelStep, Any, Batch]:
    """One compiled step shared by the tests below (compiling the 63-variable model is slow)."""
    model = _tiny_model()
    batch = _tiny_batch(INPUT_VARS)
    return ModelStep(model), jax.jit(model.init)(jax.random.key(0), batch)["params"], batch


def test_output_only_variables_are_predicted_from_zeros_and_dropped_from_the_next_input(
    tiny: tuple[ModelStep, Any, Batch],
) -> None:
    step, params, batch = tiny
    model = step.model
    pred = step(params, batch)
    assert set(pred.surf_vars) == set(model.surf_vars)
    # Given output-only inputs (physical zeros here, far from the normalised zeros) change
    # nothing: the model overwrites them with normalised zeros, as microsoft-aurora does.
    zeros = np.zeros_like(batch.surf_vars["2t"])
    full = batch.replace(
        surf_vars={**batch.surf_vars, **dict.fromkeys(model.output_only_surf_vars, zeros)}
    )
    with_inputs = step(params, full)
    for name, value in pred.surf_vars.items():
        np.testing.assert_allclose(with_inputs.surf_vars[name], value, rtol=1e-6, atol=1e-6)
    assert set(advance_batch(batch, pred).surf_vars) == set(INPUT_VARS)


def test_output_only_variables_must_be_model_variables() -> None:
    with pytest.raises(ValueError, match="Output-only surface"):
        _tiny_model(output_only_surf_vars=("tp",))._check_supported()


def test_insolation_is_the_prescribed_one_at_the_valid_time(
    tiny: tuple[ModelStep, Any, Batch],
) -> None:
    step, params, batch = tiny
    pred = step(params, batch, jnp.array([1.5]))
    meta = pred.metadata
    assert int(meta.time[0] - batch.metadata.time[0]) == 90
    expected = insolation(meta.time, np.asarray(meta.lat), np.asarray(meta.lon))[:, None]
    np.testing.assert_allclose(pred.surf_vars["insolation"], expected, rtol=0, atol=1e-6)


def test_scaled_variables_are_log_transformed_around_the_model(
    tiny: tuple[ModelStep, Any, Batch],
) -> None:
    """Zero stays zero, the inverse undoes it, and the model reads the transformed values: a
    physical amount given as its transform is a different input."""
    x = jnp.array([0.0, 1e-4, 0.01, 2.0])
    np.testing.assert_allclose(log_untransform(log_transform(x)), x, rtol=1e-5, atol=1e-9)
    assert float(log_transform(jnp.float32(0.0))) == 0.0
    step, _, batch = tiny
    normed = step.model._pre_norm_hook(batch)
    np.testing.assert_allclose(
        normed.surf_vars["scaled_sd"], log_transform(batch.surf_vars["scaled_sd"]), rtol=1e-6
    )
    np.testing.assert_array_equal(normed.surf_vars["sp"], batch.surf_vars["sp"])


def test_default_input_clipping_merges_given_bounds() -> None:
    model = _tiny_model(rollout_input_clipping={"tcc": {"min": 0.1}, "2t": {"max": 300.0}})
    bounds = model.rollout_input_clipping
    assert bounds["tcc"] == {"min": 0.1}
    assert bounds["2t"] == {"max": 300.0}
    assert bounds["scaled_sd"] == {"min": 0.0, "max": 10.0}
    assert set(bounds) == set(V1P5_ROLLOUT_INPUT_CLIPPING) | {"2t"}
    assert model.clone().rollout_input_clipping == bounds


def test_default_v1p5_runs_in_float16() -> None:
    """microsoft-aurora's default: encoder, backbone and decoder autocast to float16 (float16-safe
    attention); tests/test_fp16.py checks the numbers."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    model = AuroraV1p5(**kwargs)
    batch = _tiny_batch(INPUT_VARS)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
    assert shapes["params"]["decoder"]


def _id_based(state: dict[str, np.ndarray], model: AuroraV1p5) -> dict[str, np.ndarray]:
    """The older layout of a name-based state dict: one embedding and one head matrix, with the
    variables in the model's order (what `_adapt_checkpoint_v1p5` splits), behind `net.`."""
    d = dict(state)
    embed = "encoder.surf_token_embeds.weights."
    names = model.surf_vars + model.static_vars
    d["encoder.surf_token_embeds.weight"] = np.concatenate([d.pop(embed + v) for v in names], 1)
    embed = "encoder.atmos_token_embeds.weights."
    atmos = [d.pop(embed + v) for v in model.atmos_vars]
    d["encoder.atmos_token_embeds.weight"] = np.concatenate(atmos, 1)
    for kind, variables in (("surf", model.surf_vars), ("atmos", model.atmos_vars)):
        weights = [d.pop(f"decoder.{kind}_heads.{v}.weight") for v in variables]
        biases = [d.pop(f"decoder.{kind}_heads.{v}.bias") for v in variables]
        d[f"decoder.{kind}_head.weight"] = np.stack(weights, 1).reshape(-1, weights[0].shape[-1])
        d[f"decoder.{kind}_head.bias"] = np.stack(biases, 1).reshape(-1)
    return {f"net.{k}": v for k, v in d.items()}


@pytest.mark.reference
def test_v1p5_checkpoint_in_the_older_id_based_layout() -> None:
    """The ID-based layout converts to the same parameters as the name-based one, split over the
    model's variables (surface then static); a wrong variable count is an error."""
    spec = _v1p5_spec(TINY_FLOAT32, steps=3)
    state = load_state_dict(case_dir(spec, runner=RUNNER) / "state_dict.ckpt")
    model = _jax_model(spec)
    by_name = convert_pytorch_checkpoint(state, model)
    by_id = convert_pytorch_checkpoint(_id_based(state, model), model)
    flat = jax.tree_util.tree_leaves_with_path(by_name)
    assert len(flat) == len(jax.tree_util.tree_leaves(by_id))
    for path, value in flat:
        np.testing.assert_array_equal(value, _get(by_id, path), err_msg=str(path))
    # Split over the published variables whatever the model's: a model without `insolation`
    # gets the same matrices for the others.
    fewer = model.clone(surf_vars=model.surf_vars[:-1], output_only_surf_vars=())
    adapted = fewer.adapt_state_dict(_id_based(state, model))
    np.testing.assert_array_equal(
        adapted["decoder.surf_heads.2t.weight"], state["decoder.surf_heads.2t.weight"]
    )
    older = _id_based(state, model)
    older["net.encoder.surf_token_embeds.weight"] = older["net.encoder.surf_token_embeds.weight"][
        :, 1:
    ]
    with pytest.raises(ConversionError, match="variables"):
        model.adapt_state_dict(older)
    assert model.checkpoint_layout == "v1p5"


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        tree = tree[key.key]
    return tree


def _era5_file(path: Path, names: list[str], static: list[str]) -> Path:
    """A tiny ERA5-like NetCDF file: `names` over time, `static` with one time (as the CDS writes
    invariants)."""
    rng = np.random.default_rng(0)
    coords = {
        "valid_time": np.array(["2020-01-01T00", "2020-01-01T06"], dtype="datetime64[ns]"),
        "latitude": np.linspace(90, -90, 5),
        "longitude": np.linspace(0, 360, 8, endpoint=False),
    }
    fields = {n: (("valid_time", "latitude", "longitude"), rng.random((2, 5, 8))) for n in names}
    for n in static:
        fields[n] = (
            ("valid_time", "latitude", "longitude"),
            np.repeat(rng.random((1, 5, 8)), 2, 0),
        )
    xr.Dataset({k: (d, v.astype(np.float32)) for k, (d, v) in fields.items()}, coords).to_netcdf(
        path
    )
    return path


def test_readers_map_era5_names_to_the_v1p5_variables(tmp_path: Path) -> None:
    """ECMWF / new-CDS short names and CDS long names come out under AuroraV1p5's names;
    Aurora 1.5's invariants are static; every mapped name is one of the model's variables."""
    from data_builders.readers import aurora_groups, open_dataset

    short = ["d2m", "u100", "v100", "siconc", "sd", "tp", "sf", "uvb", "ssrd", "ttr", "tcwv"]
    short += ["tcc", "sp", "lcc", "mcc", "hcc", "skt", "stl1", "swvl1", "i10fg", "blh"]
    invariants = ["anor", "isor", "cvh", "cl", "dl", "cvl", "slor", "sdfor", "sdor"]
    groups = aurora_groups(open_dataset(_era5_file(tmp_path / "short.nc", short, invariants)))
    model = AuroraV1p5(autocast=False)
    assert set(groups["surf"]) == set(model.surf_vars) - {"insolation", "2t", "10u", "10v", "msl"}
    assert set(groups["static"]) == set(invariants) <= set(model.static_vars)
    assert groups["surf"]["scaled_tp_1h"].attrs["source_name"] == "tp"
    long = ["2m_dewpoint_temperature", "sea_ice_cover", "snow_depth", "total_precipitation"]
    long += ["top_net_thermal_radiation", "downward_uv_radiation_at_the_surface"]
    ds = open_dataset(_era5_file(tmp_path / "long.nc", long, ["standard_deviation_of_orography"]))
    assert set(ds.data_vars) == {"2d", "ci", "scaled_sd", "scaled_tp_1h", "ttr_1h", "uvb_1h"} | {
        "sdor"
    }
    with xr.open_dataset(tmp_path / "long.nc") as raw:
        np.testing.assert_array_equal(ds["scaled_tp_1h"], raw["total_precipitation"])
