"""WeatherBench2's protocol on the bundled real samples, against independent numpy computations.

Day-of-year climatologies (computed, written in WB2's layout, read back), ACC against them,
00/12 UTC inits, scores on a conservatively regridded evaluation grid, one read per state, and
forecasts streamed to WB2's zarr layout (exact round trip, appendable, resumable). The models
are stand-ins that forecast their newest input state, so every expected number is plain numpy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from aurora.batch import Batch
from data_builders.pipeline import WeatherSource
from data_builders.readers import open_dataset
from tests.test_evaluation import LastState
from trainers import evaluation
from trainers.evaluation import climatology as clim_mod

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
NATL = DATA / "hres_an_sfc_pl_20160925-20161001_12h_10deg_natlantic.nc"
HOUR = 3600


class Persist(LastState):
    """A stand-in model: forecasts its newest input state (so its scores are persistence's)."""

    def __init__(self, surf: tuple[str, ...], atmos: tuple[str, ...], hours: int) -> None:
        self.surf_vars, self.atmos_vars, self.timestep_minutes = surf, atmos, hours * 60
        self.calls = 0

    def apply(self, variables: Any, batch: Batch) -> Batch:
        self.calls += 1  # counts traces under jit
        return super().apply(variables, batch)


class CountingRecords:
    """The records of a source, counting reads by time."""

    def __init__(self, records: list[dict]) -> None:
        self.records, self.reads = records, {}

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        t = self.records[i]["time"]
        self.reads[t] = self.reads.get(t, 0) + 1
        return self.records[i]


def source_of(
    ds: xr.Dataset, surf: tuple, atmos: tuple, name: str, shift: int = 0
) -> WeatherSource:
    secs = ds.time.values.astype("datetime64[s]").astype(np.int64) + shift
    records = [
        {
            "time": int(t),
            "surf": {k: ds[k].values[i] for k in surf},
            "atmos": {k: ds[k].values[i] for k in atmos},
        }
        for i, t in enumerate(secs)
    ]
    return WeatherSource(
        records=CountingRecords(records),
        lat=ds.latitude.values,
        lon=ds.longitude.values,
        levels=tuple(ds.level.values.tolist()),
        times=secs,
        name=name,
    )


@pytest.fixture(scope="module")
def natl() -> tuple[xr.Dataset, WeatherSource]:
    ds = open_dataset(NATL, variables=["msl", "10u", "t", "u"])
    return ds, source_of(ds, ("msl", "10u"), ("t", "u"), "natl")


@pytest.fixture(scope="module")
def hres() -> xr.Dataset:
    return open_dataset(HRES_PL, variables=["z", "t", "u"], levels=[500, 850])


def band_weights(lat: np.ndarray, half: float) -> np.ndarray:
    up, lo = np.clip(lat + half, -90, 90), np.clip(lat - half, -90, 90)
    w = np.sin(np.deg2rad(up)) - np.sin(np.deg2rad(lo))
    return w / w.mean()


# ---- the climatology ----------------------------------------------------------------------------


def numpy_climatology(times: np.ndarray, values: np.ndarray, hour: int, window: int) -> np.ndarray:
    """WB2's recipe written out: a (year, day 1..366) table per hour, day 366 filled from 365,
    wrapped, and a triangular-weighted mean over years and window skipping missing days."""
    t = times.astype("datetime64[s]")
    years = t.astype("datetime64[Y]").astype(int) + 1970
    doy = (t.astype("datetime64[D]") - t.astype("datetime64[Y]").astype("datetime64[D]")).astype(
        int
    ) + 1
    hours = (t - t.astype("datetime64[D]")).astype(int) // 3600
    uniq = sorted(set(years.tolist()))
    table = np.full((len(uniq), 366, *values.shape[1:]), np.nan)
    for i in np.flatnonzero(hours == hour):
        table[uniq.index(years[i]), doy[i] - 1] = values[i]
    table[:, 365] = np.where(np.isnan(table[:, 365]), table[:, 364], table[:, 365])
    half = window // 2
    weights = np.array([1 - abs(j - half) / half for j in range(window)])
    out = np.full((366, *values.shape[1:]), np.nan)
    for d in range(366):
        days = [(d + j - half) % 366 for j in range(window)]
        x = table[:, days]  # (year, window, ...)
        w = np.broadcast_to(weights[None, :, *([None] * (x.ndim - 2))], x.shape)
        ok = ~np.isnan(x)
        if (w * ok).sum(axis=(0, 1)).min() > 0:
            out[d] = np.where(ok, x * w, 0).sum(axis=(0, 1)) / (w * ok).sum(axis=(0, 1))
    return out


def test_computed_climatology_matches_wb2_recipe_in_numpy(natl: tuple) -> None:
    ds, source = natl
    clim = evaluation.compute_climatology(source, hour_interval=12, window_size=5)
    assert dict(clim.sizes) == {
        "dayofyear": 366,
        "hour": 2,
        "level": 2,
        "latitude": ds.sizes["latitude"],
        "longitude": ds.sizes["longitude"],
    }
    assert set(clim.data_vars) == {
        "mean_sea_level_pressure",
        "10m_u_component_of_wind",
        "temperature",
        "u_component_of_wind",
    }
    assert clim["temperature"].dims == ("dayofyear", "hour", "level", "latitude", "longitude")
    times = source.times
    for short, long in (("msl", "mean_sea_level_pressure"), ("t", "temperature")):
        x = ds[short].values.astype(np.float64)
        for j, hour in enumerate((0, 12)):
            want = numpy_climatology(times, x, hour, 5)
            got = clim[long].values[:, j]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
    assert np.isnan(clim["temperature"].values[0]).all()  # January: no state's window reaches


def test_climatology_wraps_the_year_and_fills_day_366(natl: tuple) -> None:
    """The sample moved to 29 Dec 2015 .. 4 Jan 2016 (not a leap year, then a leap year)."""
    ds, _ = natl
    shift = int(
        (np.datetime64("2015-12-29") - np.datetime64("2016-09-25")) / np.timedelta64(1, "s")
    )
    source = source_of(ds, ("msl",), (), "natl-new-year", shift)
    clim = evaluation.compute_climatology(source, hour_interval=12, window_size=9)
    x = ds["msl"].values.astype(np.float64)
    for j, hour in enumerate((0, 12)):
        want = numpy_climatology(source.times, x, hour, 9)
        got = clim["mean_sea_level_pressure"].values[:, j]
        np.testing.assert_allclose(got, want, rtol=1e-6, equal_nan=True)
        assert np.isfinite(got[[0, 360, 365]]).all()  # 1 Jan, 27 Dec and day 366 wrap round


def test_climatology_command_writes_wb2_layout(tmp_path: Path) -> None:
    out = tmp_path / "clim.zarr"
    args = ["--variables", "msl", "t", "--hour-interval", "12", "--window-size", "3"]
    clim_mod.main(["compute", "--out", str(out), "--paths", str(NATL), *args])
    with xr.open_zarr(out) as f:
        assert f["temperature"].dims == ("dayofyear", "hour", "level", "latitude", "longitude")
        assert list(f.hour.values) == [0, 12] and f.attrs["window_size"] == 3


def test_acc_with_day_of_year_climatology_matches_numpy(natl: tuple, tmp_path: Path) -> None:
    """A WB2-layout store (long names, latitude ascending as WB2's) read back and used for ACC."""
    ds, source = natl
    clim = evaluation.compute_climatology(source, hour_interval=12, window_size=61)
    store = tmp_path / "clim.zarr"
    clim.isel(latitude=slice(None, None, -1)).to_zarr(store, zarr_format=2)
    model = Persist(("msl", "10u"), ("t", "u"), 12)
    opened = evaluation.open_climatology(
        str(store), surf=model.surf_vars, atmos=model.atmos_vars, levels=source.levels,
        lat=source.lat, lon=source.lon,
    )  # fmt: skip
    rows = evaluation.evaluate(model, {}, source, steps=2, step_hours=12, climatology=opened)  # type: ignore[arg-type]
    assert evaluation.climatology_kind(opened, source).startswith("WB2 day-of-year climatology")
    lat = ds.latitude.values[:-1]  # the patch-2 model drops the last row
    w = band_weights(lat, 5.0)[:, None]
    times = source.times
    for name, level, j in (("msl", None, None), ("t", 850.0, 1)):
        x = ds[name].values.astype(np.float64)
        x = x if j is None else x[:, j]
        ref = {h: numpy_climatology(times, x, h, 61)[..., :-1, :] for h in (0, 12)}
        x = x[..., :-1, :]
        for k in (1, 2):
            accs = []
            for i in range(1, len(times) - k):
                v = np.datetime64(int(times[i + k]), "s")
                doy = int((v.astype("datetime64[D]") - v.astype("datetime64[Y]")).astype(int)) + 1
                c = ref[int(v.astype("datetime64[h]").astype(int) % 24)][doy - 1]
                f, o = x[i] - c, x[i + k] - c
                accs.append(np.mean(w * f * o) / np.sqrt(np.mean(w * f**2) * np.mean(w * o**2)))
            (row,) = [
                r
                for r in rows
                if (r["model"], r["variable"], r["level"], r["lead_time_h"])
                == ("persistence", name, level, 12.0 * k)
            ]
            assert row["acc"] == pytest.approx(np.mean(accs), rel=1e-5)
            assert row["n"] == len(accs)


# ---- protocol: init hours, evaluation grid ------------------------------------------------------


def test_inits_at_00_and_12_utc_by_default(hres: xr.Dataset) -> None:
    source = source_of(hres, (), ("z", "t", "u"), "hres")
    model = Persist((), ("z", "t", "u"), 6)
    rows = evaluation.evaluate(model, {}, source, steps=2)  # type: ignore[arg-type]
    # 8 states 6-hourly from 3 June 00 UTC: inits 3 June 12, 4 June 00 and 12 UTC
    assert {r["n"] for r in rows if r["lead_time_h"] == 6} == {3}
    assert {r["n"] for r in rows if r["lead_time_h"] == 12} == {2}  # 5 June 00 UTC is missing
    every = evaluation.evaluate(model, {}, source, steps=1, init_hours=None)  # type: ignore[arg-type]
    assert {r["n"] for r in every} == {6}
    with pytest.raises(ValueError, match="no time at hours"):
        evaluation.evaluate(model, {}, source, steps=1, init_hours=(3,))  # type: ignore[arg-type]


def conservative_numpy(x: np.ndarray, lat_s, lon_s, lat_t, lon_t) -> np.ndarray:
    """Area-weighted mean of the source cells overlapping each target cell (2-D loops)."""
    ds_, dt = abs(lat_s[0] - lat_s[1]), abs(lat_t[0] - lat_t[1])
    out = np.zeros((*x.shape[:-2], len(lat_t), len(lon_t)))
    for a, la in enumerate(lat_t):
        for b, lo in enumerate(lon_t):
            num = den = 0.0
            for i, ls in enumerate(lat_s):
                top = min(la + dt / 2, ls + ds_ / 2, 90.0)
                bottom = max(la - dt / 2, ls - ds_ / 2, -90.0)
                if top <= bottom:
                    continue
                band = np.sin(np.deg2rad(top)) - np.sin(np.deg2rad(bottom))
                for j, lons in enumerate(lon_s):
                    d = (lons - lo + 180) % 360 - 180  # source centre relative to target
                    width = min(dt / 2, d + ds_ / 2) - max(-dt / 2, d - ds_ / 2)
                    if width > 0:
                        num = num + band * width * x[..., i, j]
                        den += band * width
            out[..., a, b] = num / den
    return out


def test_scores_on_a_regridded_evaluation_grid_match_numpy(hres: xr.Dataset) -> None:
    source = source_of(hres, (), ("z", "t", "u"), "hres")
    model = Persist((), ("z", "t", "u"), 6)
    mean = evaluation.source_mean(source)
    rows = evaluation.evaluate(
        model, {}, source, steps=1, init_hours=None, grids=("30",), climatology=mean
    )  # type: ignore[arg-type]
    assert {r["grid"] for r in rows} == {"model", "30"}
    lat_s, lon_s = hres.latitude.values[:-1], hres.longitude.values  # 90 .. -80 after the crop
    lat_t, lon_t = np.arange(90.0, -61.0, -30.0), np.arange(0.0, 360.0, 30.0)  # -90 not covered
    w = band_weights(lat_t, 15.0)[:, None]
    for name in ("z", "t"):
        x = conservative_numpy(
            hres[name].values.astype(np.float64)[..., :-1, :], lat_s, lon_s, lat_t, lon_t
        )
        c = conservative_numpy(
            mean["atmos"][name].astype(np.float64)[..., :-1, :], lat_s, lon_s, lat_t, lon_t
        )
        for j, level in enumerate((500.0, 850.0)):
            pairs = [(i, i + 1) for i in range(1, 7)]
            mse = [np.mean(w * (x[a, j] - x[b, j]) ** 2) for a, b in pairs]
            acc = [
                np.mean(w * (x[a, j] - c[j]) * (x[b, j] - c[j]))
                / np.sqrt(np.mean(w * (x[a, j] - c[j]) ** 2) * np.mean(w * (x[b, j] - c[j]) ** 2))
                for a, b in pairs
            ]
            (row,) = [
                r
                for r in rows
                if (r["model"], r["grid"], r["variable"], r["level"])
                == ("persistence", "30", name, level)
            ]
            assert row["rmse"] == pytest.approx(np.sqrt(np.mean(mse)), rel=1e-5)
            assert row["acc"] == pytest.approx(np.mean(acc), rel=1e-5)
            model_row = [
                r
                for r in rows
                if (r["model"], r["grid"], r["variable"], r["level"])
                == ("aurora", "30", name, level)
            ]
            assert model_row[0]["rmse"] == pytest.approx(row["rmse"], rel=1e-6)


# ---- bounded memory: one read per state; forecasts streamed to WB2 zarr -------------------------


def test_each_state_is_read_once(hres: xr.Dataset, tmp_path: Path) -> None:
    """Scoring 3 leads from every init: each of the 8 states is an input or truth many times."""
    source = source_of(hres, (), ("z", "t", "u"), "hres")
    model = Persist((), ("z", "t", "u"), 6)
    states = evaluation.SourceStates(
        source, (), ("z", "t", "u"),
        evaluation.job_uses(source, evaluation.init_times(source, 6), 6 * HOUR, [1, 2, 3]),
    )  # fmt: skip
    from trainers.evaluation.scoring import evaluate_with_examples

    zeros = {"surf": {}, "atmos": {k: np.zeros((2, 19, 36), np.float32) for k in "ztu"}}
    rows, _ = evaluate_with_examples(
        model, {}, source, steps=3, step_hours=6, climatology=zeros, batch_size=2,  # type: ignore[arg-type]
        name="m", init_hours=None, states=states,
    )  # fmt: skip
    assert rows
    reads = dict(source.records.reads)
    first = int(source.times[0])
    assert reads.pop(first) == 1 + 1  # and once to see which variables records hold
    assert sorted(reads) == sorted(source.times[1:].tolist()) and set(reads.values()) == {1}
    assert states.most_kept <= 3 + 2  # a rollout's span of states, not the whole source
    source.records.reads.clear()
    evaluation.predict(model, {}, source, steps=3, out_dir=tmp_path, init_hours=None)  # type: ignore[arg-type]
    assert set(source.records.reads.values()) == {1}


def test_predict_zarr_is_wb2_layout_round_trips_and_resumes(natl: tuple, tmp_path: Path) -> None:
    ds, source = natl
    model = Persist(("msl", "10u"), ("t", "u"), 12)
    paths = evaluation.predict(
        model, {}, source, steps=2, step_hours=12, out_dir=tmp_path, init_hours=(0,)
    )  # type: ignore[arg-type]
    with xr.open_zarr(paths["zarr"]) as f:
        assert f["temperature"].dims == (
            "time",
            "prediction_timedelta",
            "level",
            "latitude",
            "longitude",
        )
        assert f["mean_sea_level_pressure"].dims == (
            "time",
            "prediction_timedelta",
            "latitude",
            "longitude",
        )
        assert set(f.data_vars) == {
            "mean_sea_level_pressure",
            "10m_u_component_of_wind",
            "temperature",
            "u_component_of_wind",
        }
        np.testing.assert_array_equal(
            f.prediction_timedelta.values, np.array([12, 24], "timedelta64[h]")
        )
        assert (f.time.values.astype("datetime64[h]").astype(int) % 24 == 0).all()
        first = len(f.time)
    # re-run with the 12 UTC inits too: only those are forecast and appended
    source.records.reads.clear()
    paths = evaluation.predict(
        model, {}, source, steps=2, step_hours=12, out_dir=tmp_path, init_hours=(0, 12)
    )  # type: ignore[arg-type]
    noon = [t for t in evaluation.init_times(source, 12).tolist() if t % 86400 == 12 * HOUR]
    assert sorted(source.records.reads) == sorted({u for t in noon for u in (t - 12 * HOUR, t)})
    index = {int(t): i for i, t in enumerate(source.times)}
    with xr.open_zarr(paths["zarr"]) as f, xr.open_dataset(paths["netcdf"]) as g:
        inits = f.time.values.astype("datetime64[s]").astype(np.int64)
        assert len(inits) == len(evaluation.init_times(source, 12)) > first
        assert len(set(inits.tolist())) == len(inits)
        for i, t in enumerate(inits):  # a persistence forecast is the init's state, exactly
            for short, long in (("msl", "mean_sea_level_pressure"), ("t", "temperature")):
                for k in (0, 1):
                    np.testing.assert_array_equal(
                        f[long].values[i, k], ds[short].values[index[int(t)]][..., :-1, :]
                    )
        np.testing.assert_array_equal(
            np.sort(g.time.values.astype("datetime64[s]").astype(np.int64)), np.sort(inits)
        )
    # an interrupted run: the last init is marked unfinished and is forecast again
    import zarr

    group = zarr.open_group(str(paths["zarr"]), mode="r+", zarr_format=2, use_consolidated=False)
    group.attrs["complete_inits"] = len(inits) - 1
    source.records.reads.clear()
    evaluation.predict(
        model,
        {},
        source,
        steps=2,
        step_hours=12,
        out_dir=tmp_path,
        init_hours=(0, 12),
        formats=("zarr",),
    )  # type: ignore[arg-type]
    assert len(source.records.reads) == 2  # the two input states of that one init
    with xr.open_zarr(paths["zarr"]) as f:
        np.testing.assert_array_equal(f.time.values.astype("datetime64[s]").astype(np.int64), inits)


# ---- WB2 scores during fit ----------------------------------------------------------------------


def test_forecast_scores_callback_logs_physical_rmse_through_the_trainer(
    hres: xr.Dataset, tmp_path: Path
) -> None:
    """A tiny Aurora trained 2 steps on the 10° sample; after validation the callback's RMSE of
    z500 at +24 h equals numpy's on the same rollout, and every writer has it."""
    import csv

    import jax
    import ml_collections

    from callbacks.forecast_scores import ForecastScores
    from callbacks.writers import CsvWriter
    from data_builders.pipeline import Pipeline
    from data_builders.readers import regrid
    from tests.helpers import tiny_model
    from trainers.loss import LossConfig
    from trainers.strategies.rollout import RolloutStrategy
    from trainers.trainer import Trainer

    st = regrid(open_dataset(DATA / "era5_static_z_lsm_0.25deg.nc"), hres.latitude, hres.longitude)
    lsm = st.lsm.values.astype(np.float32)
    plain = source_of(hres, (), ("z", "t", "u"), "hres")
    source = WeatherSource(
        records=plain.records, lat=plain.lat, lon=plain.lon, levels=plain.levels,
        times=plain.times, static={"lsm": lsm}, name="hres",
    )  # fmt: skip
    model = tiny_model(
        surf_vars=(), static_vars=("lsm",), atmos_vars=("z", "t", "u"), patch_size=2,
        window_size=(2, 3, 6), encoder_depths=(1,), encoder_num_heads=(2,),
        decoder_depths=(1,), decoder_num_heads=(2,),
    )  # fmt: skip
    callback = ForecastScores(lead_hours=(6, 24), variables=[("z", 500), ("t", 850)])
    callback.attach_source(source)
    pipe = lambda shuffle: Pipeline(
        source, step_hours=6, batch_size=1, shuffle=shuffle, num_threads=0
    )
    optim = ml_collections.ConfigDict(
        {"learning_rate": 1e-3, "warmup_steps": 1, "schedule": "constant", "weight_decay": 0.0}
    )
    trainer = Trainer(
        RolloutStrategy(model, loss=LossConfig(atmos_weights={"z": 1.0, "t": 1.0, "u": 1.0})),
        optimizer=optim,
        callbacks=[callback],
        writers=[CsvWriter(tmp_path / "metrics.csv")],
        workdir=tmp_path,
        max_steps=2,
        val_check_interval=2,
        limit_val_batches=1,
    )
    trainer.fit(pipe(True), pipe(False))
    for writer in trainer.writers:
        writer.close()
    got = callback.last_metrics
    assert set(got) == {f"forecast/rmse/{v}/{h}h" for v in ("z500", "t850") for h in (6, 24)}
    with open(tmp_path / "metrics.csv") as f:
        logged = {r["tag"]: float(r["value"]) for r in csv.DictReader(f) if r["step"] == "2"}
    assert {k: logged[k] for k in got} == pytest.approx(got)
    # numpy: roll the trained model out from the one init with a truth 24 h later (3 June
    # 12 UTC; the sample ends 4 June 18 UTC) and score z500 against the truth
    params = trainer.state.params
    times = source.times
    lat = hres.latitude.values[:-1]
    w = band_weights(lat, 5.0)[:, None]
    errs = []
    for i in (2,):
        inputs = Batch(
            surf_vars={},
            static_vars={"lsm": lsm},
            atmos_vars={k: hres[k].values[i - 1 : i + 1][None] for k in ("z", "t", "u")},
            metadata=__import__("aurora").batch.Metadata(
                lat=hres.latitude.values,
                lon=hres.longitude.values,
                time=np.array([times[i] // 60], np.int32),
                atmos_levels=(500.0, 850.0),
            ),
        )
        from aurora.rollout import rollout

        pred = list(rollout(model, params, inputs, 4))[-1]
        z = np.asarray(jax.device_get(pred.atmos_vars["z"]))[0, 0, 0].astype(np.float64)
        errs.append(np.mean(w * (z - hres["z"].values[i + 4, 0, :-1]) ** 2))
    assert got["forecast/rmse/z500/24h"] == pytest.approx(np.sqrt(np.mean(errs)), rel=1e-4)
    assert 10 < got["forecast/rmse/z500/24h"] < 1e5  # physical units (m2 s-2), not normalised
