"""`AuroraWave` through the Trainer and the evaluation: NaN over land is data, not an error.

The wave fields (`trainers.masking.MASKED_SURF_VARS`) are NaN over land and where a wave system
is absent, in the data and in the model's prediction; losses and scores take a masked mean over
the points where both exist, with finite gradients, and compare directions by their angular
difference. A NaN in any other variable still shows. The evaluation reads the raw variables a
prediction holds (`mwd`, not the model's `mwd_sin` / `mwd_density`) and the inputs it needs
(`dwi`), and scores only the former.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aurora.batch import Batch, Metadata
from aurora.model.wave import AuroraWave
from aurora.normalisation import atmos_location_scale, surf_location_scale
from data_builders.pipeline import Pipeline, WeatherSource
from tests.helpers import TINY_KWARGS
from tests.test_variable_lead_training import Logged
from trainers.evaluation.metrics import lat_weights, score_batch
from trainers.evaluation.scoring import evaluate
from trainers.evaluation.states import model_variables, scored_variables
from trainers.loss import (
    aurora_mae,
    latitude_weighted_mae,
    latitude_weighted_mse,
    latitude_weights,
)
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

LAT, LON = (10.0, 0.0), (0.0, 10.0, 20.0)
NAN = np.nan


def _batch(surf: dict[str, list[list[float]]]) -> Batch:
    """One `(1, 1, 2, 3)` field per surface variable, on a 2 x 3 grid."""
    return Batch(
        surf_vars={k: jnp.asarray(np.array(v, np.float32)[None, None]) for k, v in surf.items()},
        static_vars={},
        atmos_vars={},
        metadata=Metadata(lat=LAT, lon=LON, time=(np.datetime64("2020-01-01"),), atmos_levels=()),
    )


# Land in the last column; an absent wave system in the target at (0, 0), a predicted one at
# (1, 1). mwd crosses north: 359° against 1° is 2° off.
PRED = {
    "2t": [[280.0, 281.0, 282.0], [283.0, 284.0, 285.0]],
    "swh": [[1.0, 2.0, NAN], [3.0, NAN, NAN]],
    "mwd": [[180.0, 90.0, NAN], [359.0, NAN, NAN]],
}
TARGET = {
    "2t": [[281.0, 281.0, 280.0], [283.0, 286.0, 285.0]],
    "swh": [[NAN, 2.5, NAN], [2.0, 1.0, NAN]],
    "mwd": [[NAN, 100.0, NAN], [1.0, 10.0, NAN]],
}


CLIMATE = {
    "2t": [[280.0, 280.0, 280.0], [284.0, 284.0, 284.0]],
    "swh": [[1.5, 1.5, NAN], [2.5, NAN, NAN]],
    "mwd": [[90.0, 90.0, NAN], [90.0, NAN, NAN]],
}


def _by_hand(weights: np.ndarray) -> dict[str, float]:
    """Per-variable weighted MAE on normalised values over the points both sides have."""
    out = {}
    for name in PRED:
        p, t = np.array(PRED[name], np.float64), np.array(TARGET[name], np.float64)
        ok = ~np.isnan(p) & ~np.isnan(t)
        error = p[ok] - t[ok]
        if name == "mwd":  # radians
            error = np.deg2rad((error + 180) % 360 - 180)
        error = np.abs(error) / (1 if name == "mwd" else surf_location_scale(name)[1])
        w = np.broadcast_to(weights, p.shape)[ok]
        out[name] = float(np.sum(w * error) / np.sum(w))
    return out


def test_masked_loss_equals_a_hand_computation() -> None:
    """Only the points both sides have count; 359° against 1° is 2° off (in radians, the unit
    of the model's sine and cosine); 2t keeps every point."""
    loss, terms = aurora_mae(_batch(PRED), _batch(TARGET), surf_weights={"2t": 2.0}, alpha=0.5)
    expected = _by_hand(np.ones((2, 1)))
    assert expected["swh"] == pytest.approx((0.5 + 1.0) / 2 / 1.38128, rel=1e-5)
    assert expected["mwd"] == pytest.approx(np.deg2rad((10 + 2) / 2), rel=1e-6)
    for name, value in expected.items():
        assert float(terms[f"mae/{name}"]) == pytest.approx(value, rel=1e-5), name
    total = 0.5 * (2.0 * expected["2t"] + expected["swh"] + expected["mwd"]) / 3
    assert float(loss) == pytest.approx(total, rel=1e-5)

    _, lat_terms = latitude_weighted_mae(_batch(PRED), _batch(TARGET))
    by_lat = _by_hand(latitude_weights(LAT))
    for name, value in by_lat.items():
        assert float(lat_terms[f"mae/{name}"]) == pytest.approx(value, rel=1e-5), name


@pytest.mark.parametrize("loss_fn", [aurora_mae, latitude_weighted_mse], ids=["mae", "lat_mse"])
def test_masked_loss_has_finite_gradients_that_skip_the_masked_points(loss_fn) -> None:
    """The masked points never enter the arithmetic (a square's gradient at NaN times zero is
    NaN, whatever is selected after it)."""
    target = _batch(TARGET)

    def loss(surf: dict[str, jax.Array]) -> jax.Array:
        return loss_fn(_batch(PRED).replace(surf_vars=surf), target)[0]

    grads = jax.grad(loss)(_batch(PRED).surf_vars)
    for name, g in grads.items():
        assert np.isfinite(g).all(), name
    missing = np.isnan(np.array(PRED["swh"])) | np.isnan(np.array(TARGET["swh"]))
    np.testing.assert_array_equal(np.asarray(grads["swh"][0, 0]) == 0, missing)


def test_a_nan_in_a_variable_the_model_does_not_mask_surfaces() -> None:
    """2t is not a wave field: its NaN is a data error and makes the loss and its score NaN."""
    broken = {**TARGET, "2t": [[NAN, 281.0, 280.0], [283.0, 286.0, 285.0]]}
    loss, terms = aurora_mae(_batch(PRED), _batch(broken))
    assert np.isnan(float(loss)) and np.isnan(float(terms["mae/2t"]))
    assert np.isfinite(float(terms["mae/swh"]))
    sums = score_batch(_batch(PRED), _batch(broken))
    assert np.isnan(float(sums["surf"]["2t"]["mae"]))
    assert np.isfinite(float(sums["surf"]["swh"]["mae"]))


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_scores_leave_out_missing_wave_points(xp) -> None:
    """RMSE, MAE, bias (and ACC) over the points both sides have, latitude-weighted; directions
    by angle; the same in numpy and in jit-able jax."""
    as_xp = lambda b: jax.tree.map(xp.asarray, b)
    sums = score_batch(as_xp(_batch(PRED)), as_xp(_batch(TARGET)), as_xp(_batch(CLIMATE)))
    weights = lat_weights(LAT)[:, None]
    for name in PRED:
        p, t = np.array(PRED[name], np.float64), np.array(TARGET[name], np.float64)
        ok = ~np.isnan(p) & ~np.isnan(t)
        if name == "swh":  # ACC over the same points
            c = np.array(CLIMATE[name], np.float64)
            w, fa, ta = np.broadcast_to(weights, p.shape)[ok], (p - c)[ok], (t - c)[ok]
            acc = np.sum(w * fa * ta) / np.sqrt(np.sum(w * fa**2) * np.sum(w * ta**2))
            assert float(sums["surf"][name]["acc"]) == pytest.approx(acc, rel=1e-5)
        error = p - t
        if name == "mwd":
            error = (error + 180) % 360 - 180
        w = np.broadcast_to(weights, p.shape)[ok]
        mean = lambda x, w=w, ok=ok: np.sum(w * x[ok]) / np.sum(w)
        got = {k: float(v) for k, v in sums["surf"][name].items() if k != "acc"}
        assert got["mse"] == pytest.approx(mean(error**2), rel=1e-5), name
        assert got["mae"] == pytest.approx(mean(np.abs(error)), rel=1e-5), name
        assert got["bias"] == pytest.approx(mean(error), rel=1e-5), name


def _wave_source(
    times: int = 12, h: int = 8, w: int = 16, with_dwi: bool = False, seed: int = 0
) -> WeatherSource:
    """6-hourly states: 2t, wave height and direction (NaN over a land block and, for the
    direction, where no wave system is), t at two levels; `lsm` and bathymetry `wmb`."""
    rng = np.random.default_rng(seed)
    land = np.zeros((h, w), bool)
    land[2:5, 3:7] = True
    levels = (500.0, 850.0)
    t_loc, t_scale = atmos_location_scale("t", levels)
    base = {
        "2t": surf_location_scale("2t")[0] + 5 * rng.standard_normal((h, w)),
        "swh": np.abs(2 + rng.standard_normal((h, w))),
        "mwd": rng.uniform(0, 360, (h, w)),
        "t": t_loc + t_scale * rng.standard_normal((len(levels), h, w)),
    }
    records = []
    for i in range(times):
        jitter = lambda shape: 0.05 * rng.standard_normal(shape)
        swh = np.where(land, NAN, base["swh"] + jitter((h, w)))
        surf = {
            "2t": base["2t"] + jitter((h, w)),
            "swh": swh,
            "mwd": np.where(land, NAN, (base["mwd"] + 5 * i) % 360),
        }
        if with_dwi:
            surf |= {"wind": np.where(land, NAN, 8.0), "dwi": np.where(land, NAN, 45.0)}
        records.append(
            {
                "time": i * 6 * 3600,
                "surf": {k: v.astype(np.float32) for k, v in surf.items()},
                "atmos": {"t": (base["t"] + jitter(base["t"].shape)).astype(np.float32)},
            }
        )
    return WeatherSource(
        records=records,
        lat=np.linspace(90, -90, h + 1)[:-1],
        lon=np.arange(w) * 360 / w,
        levels=levels,
        times=np.arange(times) * 6 * 3600,
        static={"lsm": land.astype(np.float32), "wmb": np.where(land, 0.0, 100.0).astype("f4")},
        name="waves",
    )


def test_evaluation_reads_the_inputs_and_scores_the_raw_wave_variables() -> None:
    """`mwd` (not `mwd_sin` / `mwd_density`) is read and scored; `dwi` is read for the inputs
    (the model turns it into wind components) and not scored; `wind` is both."""
    model = AuroraWave(surf_vars=("2t", "swh", "mwd", "wind", "10u_wave", "10v_wave"))
    assert model.output_surf_vars == ("2t", "swh", "mwd", "wind", "10u_wave", "10v_wave")
    surf, atmos, _ = model_variables(model, _wave_source(times=2, with_dwi=True))
    assert atmos == ["t"]
    assert surf == ["2t", "swh", "mwd", "wind", "dwi"]
    assert scored_variables(model, surf) == ["2t", "swh", "mwd", "wind"]


@pytest.mark.slow  # compiling a real model's training step: a minute or more on 2 cores
def test_tiny_aurora_wave_fits_through_the_trainer_and_is_scored_on_raw_variables() -> None:
    """NaN over land in inputs and targets: every step's loss and gradients are finite, the
    loss falls, and the evaluation scores mwd and swh over the ocean only, mwd by angle."""
    model = AuroraWave(
        surf_vars=("2t", "swh", "mwd"),
        static_vars=("lsm", "wmb"),
        atmos_vars=("t",),
        use_lora=False,
        **TINY_KWARGS,
    )
    source = _wave_source()
    p = Pipeline(source, rollout_steps=1, batch_size=2, seed=0, num_threads=0)
    writer = Logged()
    optimizer = ml_collections.ConfigDict({"learning_rate": 3e-3, "schedule": "constant"})
    trainer = Trainer(
        RolloutStrategy(model, steps=1),
        optimizer=optimizer,
        writers=[writer],
        max_steps=8,
        log_every_n_steps=1,
    )
    trainer.fit(p)
    logged = writer.scalars
    losses = [logged[s]["train/loss"] for s in sorted(logged)]
    assert all(np.isfinite(losses)), losses
    assert all(logged[s]["train/grads_finite"] == 1.0 for s in logged), logged
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert {"train/mae/mwd", "train/mae/swh"} <= set(logged[1])
    assert not any("density" in k or "_sin" in k for k in logged[1])

    rows = evaluate(model, trainer.state.params, source, steps=1, init_hours=None)
    scored = {r["variable"] for r in rows if r["model"] == "aurora"}
    assert scored == {"2t", "swh", "mwd", "t"}
    for row in rows:
        assert np.isfinite(row["rmse"]), row
    # The direction turns 5° a step, across north at some points: persistence is 5° off.
    (turn,) = [r["rmse"] for r in rows if r["model"] == "persistence" and r["variable"] == "mwd"]
    assert turn == pytest.approx(5.0, rel=1e-4)


@pytest.mark.slow  # compiling a model's forecast step: about twenty seconds on 2 cores
def test_forecasts_from_wind_direction_score_and_store_only_predicted_variables(tmp_path) -> None:
    """A source with `wind` and its direction `dwi`: `dwi` reaches the inputs, and neither the
    model, persistence nor climatology is scored on it; the forecast file holds what the
    prediction does."""
    import xarray as xr

    from trainers.evaluation.jobs import predict

    model = AuroraWave(
        surf_vars=("2t", "swh", "mwd", "wind", "10u_wave", "10v_wave"),
        static_vars=("lsm", "wmb"),
        atmos_vars=("t",),
        use_lora=False,
        **TINY_KWARGS,
    )
    source = _wave_source(times=4, with_dwi=True)
    p = Pipeline(source, rollout_steps=1, batch_size=1, num_threads=0)
    params = model.init(jax.random.PRNGKey(0), p.dataset[0][0])["params"]
    rows = evaluate(model, params, source, steps=1, init_hours=None)
    for baseline in ("aurora", "persistence", "climatology"):
        scored = {r["variable"] for r in rows if r["model"] == baseline}
        assert scored == {"2t", "swh", "mwd", "wind", "t"}, baseline
    paths = predict(model, params, source, steps=1, out_dir=tmp_path, init_hours=None)
    with xr.open_dataset(paths["netcdf"]) as ds:
        assert {"mwd", "swh", "wind"} <= set(ds.data_vars)
        assert not {"dwi", "mwd_sin", "mwd_density"} & set(ds.data_vars)
        assert ds["mwd"].isnull().any() and ds["mwd"].notnull().any()  # NaN over land


def test_a_target_with_wind_direction_meets_the_predicted_wind_components() -> None:
    """Data hold wind speed and direction `dwi`; the model predicts components: the Trainer's
    loss compares them after the model's `_pre_norm_hook` (NaN over land stays masked)."""
    model = AuroraWave(surf_vars=("wind", "10u_wave", "10v_wave"))
    east = {"wind": [[10.0, 10.0, NAN], [10.0, 10.0, NAN]], "dwi": [[90.0] * 2 + [NAN]] * 2}
    pred = {
        "wind": [[10.0, 10.0, NAN], [10.0, 10.0, NAN]],
        "10u_wave": [[-9.0, -9.0, NAN], [-9.0, -9.0, NAN]],  # 1 m/s too slow
        "10v_wave": [[0.0, 0.0, NAN], [0.0, 0.0, NAN]],
    }
    loss, terms = RolloutStrategy(model, steps=1).step_loss(_batch(pred), _batch(east))
    scale = surf_location_scale("10u_wave")[1]
    assert float(terms["mae/10u_wave"]) == pytest.approx(1 / scale, rel=1e-5)
    assert float(terms["mae/10v_wave"]) == pytest.approx(0, abs=1e-5)
    assert float(terms["mae/wind"]) == 0 and np.isfinite(float(loss))
