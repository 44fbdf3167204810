"""Ensemble forecasts: `--mode=predict` with members (WB2's ``realization`` dimension) and
`--mode=test` with CRPS and spread/skill (WeatherBench2's definitions)."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

from aurora.batch import Batch, Metadata
from aurora.rollout import ModelStep
from data_builders.readers import open_dataset, regrid
from tests.helpers import tiny_model
from tests.test_evaluation import HRES_PL, ONE_STAGE, STATIC, init, make_source
from trainers import evaluation
from trainers.evaluation import ensemble_metrics as em
from trainers.evaluation.forecasts import ensemble_stream, member_key
from trainers.evaluation.metrics import lat_weights, mae
from trainers.evaluation.scoring import ENSEMBLE_COLUMNS
from trainers.evaluation.states import SourceStates

# ---- scores against hand and numpy computations --------------------------------------------------


def test_crps_of_a_tiny_ensemble_by_hand() -> None:
    # One latitude row (weight 1), two points. Point 1: members 1, 2, 4 and truth 3:
    # skill = (2 + 1 + 1) / 3, spread = sum_{i != j} |x_i - x_j| / (3 * 2) = 2 * (1 + 3 + 2) / 6,
    # CRPS = 4/3 - 1 = 1/3. Point 2: members all 0, truth 1: skill 1, spread 0, CRPS 1.
    ens = np.array([[1.0, 0.0], [2.0, 0.0], [4.0, 0.0]])[:, None, :]  # (n, h=1, w=2)
    truth = np.array([[3.0, 1.0]])
    w = np.ones(1)
    for xp in (np, jnp):  # host (float64) and device (float32) paths
        e, y = xp.asarray(ens), xp.asarray(truth)
        assert float(em.crps_skill(e, y, w)) == pytest.approx((4 / 3 + 1) / 2, rel=1e-6)
        assert float(em.crps_spread(e, w)) == pytest.approx(2 / 2, rel=1e-6)
        assert float(em.crps(e, y, w)) == pytest.approx((1 / 3 + 1) / 2, rel=1e-6)


def test_crps_of_one_member_is_its_mae() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(1, 2, 3, 6, 8)), rng.normal(size=(2, 3, 6, 8))
    w = lat_weights(np.linspace(75, -75, 6))
    np.testing.assert_allclose(em.crps(x, y, w), mae(x[0], y, w), rtol=1e-12)
    assert not np.any(em.crps_spread(x, w)) and not np.any(em.ensemble_variance(x, w))


def test_crps_spread_is_the_mean_absolute_difference_of_distinct_members() -> None:
    rng = np.random.default_rng(1)
    n, x = 5, rng.normal(size=(5, 4, 6))
    w = lat_weights(np.linspace(60, -60, 4))
    pairs = sum(np.abs(x[i] - x[j]) for i, j in itertools.permutations(range(n), 2))
    want = np.mean(w[:, None] * pairs / (n * (n - 1)))
    assert em.crps_spread(x, w) == pytest.approx(want, rel=1e-12)
    got = jax.jit(em.crps_spread)(jnp.asarray(x, jnp.float32), w)
    assert float(got) == pytest.approx(want, rel=1e-5)


def _batch(fields: dict[str, np.ndarray], lat: np.ndarray, atmos: dict[str, np.ndarray]) -> Batch:
    b = next(iter(fields.values())).shape[0]
    return Batch(
        surf_vars=fields,
        static_vars={},
        atmos_vars=atmos,
        metadata=Metadata(
            lat=lat,
            lon=np.arange(8) * 45.0,
            time=np.zeros(b, np.int32),
            atmos_levels=(500.0, 850.0),
        ),
    )


def test_spread_skill_and_crps_totals_against_numpy() -> None:
    """Two batches of 3 samples, one masked out; sums through `jax.jit`, totals on the host."""
    rng = np.random.default_rng(2)
    n, lat = 4, np.linspace(67.5, -67.5, 4)
    w = lat_weights(lat)
    ens = rng.normal(size=(2, n, 3, 1, 4, 8)).astype(np.float32)  # (batch, member, b, t, h, w)
    ens_t = rng.normal(size=(2, n, 3, 1, 2, 4, 8)).astype(np.float32)
    truth = rng.normal(size=(2, 3, 1, 4, 8)).astype(np.float32)
    truth_t = rng.normal(size=(2, 3, 1, 2, 4, 8)).astype(np.float32)
    masks = [np.ones(3, np.float32), np.array([1, 0, 1], np.float32)]
    totals = em.EnsembleTotals((500.0, 850.0))
    score = jax.jit(em.score_ensemble)
    for i, mask in enumerate(masks):
        members = [_batch({"2t": ens[i, m]}, lat, {"t": ens_t[i, m]}) for m in range(n)]
        totals.add(score(members, _batch({"2t": truth[i]}, lat, {"t": truth_t[i]}), mask))
    rows = {(r["variable"], r["level"]): r for r in totals.rows()}

    def expect(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """x: (member, sample, h, w), y: (sample, h, w), float64 numpy."""
        spatial = lambda f: np.mean(w[:, None] * f, axis=(-2, -1))
        variance = spatial(np.var(x, axis=0, ddof=1)).mean()
        mean_mse = spatial((x.mean(axis=0) - y) ** 2).mean()
        skill = spatial(np.abs(x - y).mean(axis=0)).mean()
        pair = sum(np.abs(x[i] - x[j]) for i, j in itertools.permutations(range(n), 2))
        spread = spatial(pair / (n * (n - 1))).mean()
        return {
            "crps": skill - 0.5 * spread,
            "spread": math.sqrt(variance),
            "skill": math.sqrt(mean_mse),
            "spread_skill": math.sqrt((n + 1) / n) * math.sqrt(variance / mean_mse),
        }

    keep = np.concatenate(masks) > 0  # the samples scored
    members = lambda a: np.moveaxis(a, 1, 0).reshape(n, 6, 4, 8)[:, keep].astype(np.float64)
    samples = lambda a: a.reshape(6, 4, 8)[keep].astype(np.float64)
    cases = {
        ("2t", None): expect(members(ens[:, :, :, 0]), samples(truth[:, :, 0])),
        ("t", 850.0): expect(members(ens_t[:, :, :, 0, 1]), samples(truth_t[:, :, 0, 1])),
    }
    for key, want in cases.items():
        for metric, value in want.items():
            assert rows[key][metric] == pytest.approx(value, rel=1e-5), (key, metric)


# ---- jobs: predict and test with a tiny stochastic model --------------------------------------

BATCH = 3
"""Inits per batch in every job below: the sample's three 00/12 UTC inits, one compiled step."""
ATMOS = ("z", "t")


@pytest.fixture(scope="module")
def hres() -> Any:
    ds = open_dataset(HRES_PL, variables=list(ATMOS), levels=[500, 850])
    st = regrid(open_dataset(STATIC), ds.latitude.values, ds.longitude.values)
    static = {"lsm": st.lsm.values, "z": st.z_sfc.values}
    return make_source(ds, (), ATMOS, static, "hres_sample")


@pytest.fixture(scope="module")
def stochastic(hres: Any) -> tuple[ModelStep, Any]:
    """A tiny stochastic Aurora whose noise reaches the output: its zero-initialised layers (the
    conditioning's modulation, as in microsoft-aurora) get small random weights."""
    model = tiny_model(
        surf_vars=(),
        static_vars=("lsm", "z"),
        atmos_vars=ATMOS,
        patch_size=2,
        window_size=(2, 3, 6),
        stochastic=True,
        **ONE_STAGE,
    )
    params = init(model, hres)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [
        x if np.any(np.asarray(x)) else 0.05 * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return ModelStep(model), jax.tree.unflatten(tree, leaves)


def test_a_deterministic_model_refuses_members(hres: Any, tmp_path: Path) -> None:
    model = tiny_model(surf_vars=(), static_vars=("lsm", "z"), atmos_vars=("z", "u", "v", "t"))
    with pytest.raises(ValueError, match="members > 1 needs a stochastic model"):
        evaluation.predict(model, {}, hres, steps=1, out_dir=tmp_path, members=2)
    with pytest.raises(ValueError, match="members > 1 needs a stochastic model"):
        evaluation.evaluate(model, {}, hres, steps=1, members=2)


def test_members_come_from_the_seed_and_member_index(hres: Any, stochastic: tuple) -> None:
    step, params = stochastic
    inits = hres.times[1:2]

    def members(seed: int, n: int) -> list[np.ndarray]:
        states = SourceStates(hres, (), ATMOS)
        ((_, _, leads),) = ensemble_stream(
            step, params, hres, inits, states, steps=1, members=n, seed=seed, batch_size=BATCH
        )
        return [np.asarray(m.atmos_vars["z"]) for m in next(leads)]

    a, again, other = members(0, 2), members(0, 2), members(1, 2)
    assert np.array_equal(a[0], again[0]) and np.array_equal(a[1], again[1])
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[0], other[0])
    assert not np.array_equal(member_key(0, 0, 0), member_key(0, 1, 0))


def test_predict_writes_the_realization_dimension(
    hres: Any, stochastic: tuple, tmp_path: Path
) -> None:
    step, params = stochastic
    paths = evaluation.predict(
        step,
        params,
        hres,
        steps=2,
        out_dir=tmp_path,
        provenance={"model_preset": "tiny"},
        batch_size=BATCH,
        init_hours=(0, 12),
        members=3,
    )
    with xr.open_dataset(paths["netcdf"]) as nc, xr.open_zarr(paths["zarr"]) as zarr:
        for ds, name in ((nc, "z"), (zarr, "geopotential")):
            x = ds[name]
            assert x.dims[:3] == ("realization", "time", "prediction_timedelta")
            assert ds.sizes["realization"] == 3 and ds.sizes["time"] == 3
            assert ds["realization"].values.tolist() == [0, 1, 2]
            assert ds["realization"].attrs["standard_name"] == "realization"
            values = x.values
            assert np.isfinite(values).all()
            for i, j in itertools.combinations(range(3), 2):
                assert np.abs(values[i] - values[j]).max() > 0, (name, i, j)
        np.testing.assert_array_equal(nc["z"].values, zarr["geopotential"].values)
        assert nc.attrs["provenance_members"] == 3
        written = nc["z"].values
    # Resumable as before: a re-run finds every init written and adds nothing.
    evaluation.predict(step, params, hres, steps=2, out_dir=tmp_path, batch_size=BATCH, members=3)
    with xr.open_dataset(paths["netcdf"]) as nc:
        np.testing.assert_array_equal(nc["z"].values, written)
    with pytest.raises(ValueError, match="another layout"):
        evaluation.predict(step, params, hres, steps=2, out_dir=tmp_path, members=2)


def test_test_mode_reports_crps_and_spread_skill(
    hres: Any, stochastic: tuple, tmp_path: Path
) -> None:
    step, params = stochastic
    summary = evaluation.run_evaluation(
        step,
        params,
        hres,
        steps=2,
        out_dir=tmp_path,
        batch_size=BATCH,
        map_lead_steps=(),
        members=3,
    )
    assert summary["members"] == 3
    assert {Path(f).name for f in summary["figures"]} >= {"crps_vs_lead_z500.png"}
    with (tmp_path / "scores.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == ENSEMBLE_COLUMNS
        rows = list(reader)
    for row in rows:
        values = {c: float(row[c]) for c in ("rmse", "mae", "crps", "spread", "skill")}
        assert all(np.isfinite(v) for v in values.values()), row
        if row["model"] == "aurora":
            assert values["spread"] > 0 and values["crps"] > 0
            # WB2's skill is the RMSE of the ensemble mean, which is what the rmse column scores.
            assert values["skill"] == pytest.approx(values["rmse"], rel=1e-6)
        else:  # deterministic baselines are one-member ensembles: CRPS = MAE, no spread
            assert values["crps"] == pytest.approx(values["mae"], rel=1e-6)
            assert values["spread"] == 0 and float(row["spread_skill"]) == 0


@pytest.mark.slow
def test_predict_members_through_the_trainer(tmp_path: Path) -> None:
    """`--mode=predict` with `config.eval.members` (what main.py runs): refused for the demo's
    deterministic model, WB2's realization dimension for the same model made stochastic."""
    from configs import demo
    from trainers.run import run

    config = demo.get_config()
    config.eval.members, config.eval.steps = 2, 1
    with pytest.raises(ValueError, match="members > 1 needs a stochastic model"):
        run(config, tmp_path, "predict")
    config.model.kwargs.stochastic = True
    summary = run(config, tmp_path, "predict")
    with xr.open_dataset(summary["forecast"]) as ds:
        assert ds["z"].dims[:2] == ("realization", "time") and ds.sizes["realization"] == 2
        assert ds.attrs["provenance_members"] == 2
        assert ds.attrs["provenance_seed"] == config.seed
