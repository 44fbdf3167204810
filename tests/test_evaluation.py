"""Evaluation, figures and forecast files with a tiny model on the bundled real samples.

Two sources, both read with `data_builders.readers.open_dataset`: the global 10° HRES sample (8
six-hourly states, z u v t r, static lsm/z regridded from the 0.25° ERA5 file) and the
North-Atlantic 10° analyses (12-hourly, surface msl 10u 10v and t u v on 2 levels), with one
state removed to make a gap. Baseline scores are recomputed here with plain numpy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
import xarray as xr
from matplotlib.image import imread

from aurora.batch import Batch, Metadata
from aurora.rollout import ModelStep
from data_builders.pipeline import WeatherSource
from data_builders.readers import open_dataset, regrid
from tests.helpers import tiny_model
from trainers import evaluation
from trainers.evaluation import COLUMNS, figures, forecast_io

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
NATL = DATA / "hres_an_sfc_pl_20160925-20161001_12h_10deg_natlantic.nc"
STATIC = DATA / "era5_static_z_lsm_0.25deg.nc"
HOUR = 3600
ONE_STAGE = {
    "encoder_depths": (1,),
    "encoder_num_heads": (2,),
    "decoder_depths": (1,),
    "decoder_num_heads": (2,),
}
"""A one-stage Swin: the same evaluation code paths, a third less compile time on 2 cores."""


def make_source(
    ds: xr.Dataset,
    surf: tuple[str, ...],
    atmos: tuple[str, ...],
    static: dict,
    name: str,
    drop: int | None = None,
) -> WeatherSource:
    secs = ds.time.values.astype("datetime64[s]").astype(np.int64)
    keep = [i for i in range(len(secs)) if i != drop]
    records = [
        {
            "time": int(secs[i]),
            "surf": {k: ds[k].values[i] for k in surf},
            "atmos": {k: ds[k].values[i] for k in atmos},
        }
        for i in keep
    ]
    levels = tuple(ds.level.values.tolist())
    stats = (
        {
            f"r_{lev:g}": (float(ds.r.values[:, j].mean()), float(ds.r.values[:, j].std()))
            for j, lev in enumerate(levels)
        }
        if "r" in atmos
        else {}
    )
    return WeatherSource(
        records=records,
        lat=ds.latitude.values,
        lon=ds.longitude.values,
        levels=levels,
        times=secs[keep],
        static=static,
        stats=stats,
        name=name,
    )


def init(model: Any, source: WeatherSource) -> Any:
    """Random parameters for `model` on the source's grid."""
    rec = source.records[0]
    inputs = Batch(
        surf_vars={k: np.stack([v, v])[None] for k, v in rec["surf"].items()},
        static_vars={k: np.asarray(v, np.float32) for k, v in source.static.items()},
        atmos_vars={k: np.stack([v, v])[None] for k, v in rec["atmos"].items()},
        metadata=Metadata(
            lat=source.lat,
            lon=source.lon,
            time=np.array([rec["time"] // 60], np.int32),
            atmos_levels=source.levels,
        ),
    )
    return jax.jit(model.init)(jax.random.key(0), inputs)["params"]


def band_weights(lat: np.ndarray, half: float) -> np.ndarray:
    """Area of the band lat ± half (clipped at the poles), mean 1: the reference weights."""
    up, lo = np.clip(lat + half, -90, 90), np.clip(lat - half, -90, 90)
    w = np.sin(np.deg2rad(up)) - np.sin(np.deg2rad(lo))
    return w / w.mean()


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hres() -> tuple[xr.Dataset, WeatherSource]:
    ds = open_dataset(HRES_PL, variables=["z", "u", "v", "t", "r"], levels=[500, 850])
    st = regrid(open_dataset(STATIC), ds.latitude.values, ds.longitude.values)
    static = {"lsm": st.lsm.values, "z": st.z_sfc.values}
    return ds, make_source(ds, (), ("z", "u", "v", "t", "r"), static, "hres_sample")


@pytest.fixture(scope="module")
def hres_run(
    hres: tuple[xr.Dataset, WeatherSource], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """run_evaluation once: 7 inits, 3 steps of 6 h, batches of 4 (the last one short)."""
    _, source = hres
    model = tiny_model(
        surf_vars=(),
        static_vars=("lsm", "z"),
        atmos_vars=("z", "u", "v", "t", "r"),
        patch_size=2,
        window_size=(2, 3, 6),
        surf_stats=source.stats,
        **ONE_STAGE,
    )
    params = init(model, source)
    out = tmp_path_factory.mktemp("eval")
    prov = {"model_preset": "tiny", "checkpoint_step": 0}
    summary = evaluation.run_evaluation(
        model, params, source, steps=3, out_dir=out, provenance=prov, batch_size=4, init_hours=None
    )
    header, rows = read_csv(out / "scores.csv")
    return {
        "out": out,
        "summary": summary,
        "header": header,
        "rows": rows,
        "model": model,
        "params": params,
    }


@pytest.fixture(scope="module")
def natl() -> tuple[xr.Dataset, WeatherSource]:
    ds = open_dataset(NATL, variables=["msl", "10u", "10v", "t", "u", "v"])
    return ds, make_source(ds, ("msl", "10u", "10v"), ("t", "u", "v"), {}, "natl_gap", drop=4)


def pick(
    rows: list[dict[str, str]], model: str, variable: str, level: str, lead: str
) -> dict[str, str]:
    (row,) = [
        r
        for r in rows
        if (r["model"], r["variable"], r["level"], r["lead_time_h"])
        == (model, variable, level, lead)
    ]
    return row


# ---- evaluate -----------------------------------------------------------------------------------


def test_scores_csv_has_the_columns_models_and_counts(hres_run: dict) -> None:
    assert tuple(hres_run["header"]) == COLUMNS
    rows = hres_run["rows"]
    assert {r["model"] for r in rows} == {"aurora", "persistence", "climatology"}
    assert {(r["variable"], r["level"]) for r in rows} == {
        (v, lev) for v in "zuvtr" for lev in ("500", "850")
    }
    # 8 states 6 h apart: inits 1..7; lead k has a truth for 7 - k of them
    for r in rows:
        assert int(r["n"]) == 7 - int(r["lead_time_h"]) // 6, r
        assert float(r["rmse"]) >= 0
    assert len(rows) == 3 * 10 * 3


def test_persistence_and_climatology_match_numpy(hres: tuple, hres_run: dict) -> None:
    ds, _ = hres
    lat = ds.latitude.values[:-1]  # the model (patch 2) drops the 19th row, -90
    w = band_weights(lat, 5.0)[:, None]
    for name in ("z", "t", "r"):
        x = ds[name].values.astype(np.float64)[..., :-1, :]  # (time, level, lat, lon)
        clim = ds[name].values.astype(np.float64).mean(0)[..., :-1, :]
        for j, level in enumerate(("500", "850")):
            for k in (1, 2, 3):
                inits = range(1, 8 - k)
                err = [np.mean(w * (x[i, j] - x[i + k, j]) ** 2) for i in inits]
                row = pick(hres_run["rows"], "persistence", name, level, f"{6 * k}")
                assert float(row["rmse"]) == pytest.approx(np.sqrt(np.mean(err)), rel=1e-5)
                assert float(row["bias"]) == pytest.approx(
                    np.mean([np.mean(w * (x[i, j] - x[i + k, j])) for i in inits]),
                    rel=1e-4,
                    abs=1e-3,
                )
                fa = [x[i, j] - clim[j] for i in inits]
                oa = [x[i + k, j] - clim[j] for i in inits]
                accs = [
                    np.mean(w * f * o) / np.sqrt(np.mean(w * f**2) * np.mean(w * o**2))
                    for f, o in zip(fa, oa)
                ]
                assert float(row["acc"]) == pytest.approx(np.mean(accs), rel=1e-4)
                cerr = [np.mean(w * (clim[j] - x[i + k, j]) ** 2) for i in inits]
                crow = pick(hres_run["rows"], "climatology", name, level, f"{6 * k}")
                assert float(crow["rmse"]) == pytest.approx(np.sqrt(np.mean(cerr)), rel=1e-5)
                assert crow["acc"] == "nan"  # the climatology has no anomaly


def test_model_scores_are_finite(hres_run: dict) -> None:
    for r in hres_run["rows"]:
        if r["model"] == "aurora":
            assert np.isfinite(float(r["rmse"])) and -1 <= float(r["acc"]) <= 1


def test_summary_and_figures(hres_run: dict) -> None:
    out, summary = hres_run["out"], hres_run["summary"]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["model_preset"] == "tiny" and summary["checkpoint_step"] == 0
    assert summary["data_source"] == "hres_sample" and summary["steps"] == 3
    assert summary["climatology"].startswith("source mean") and "8 states" in summary["climatology"]
    assert summary["lead_times_h"] == [6.0, 12.0, 18.0]
    figs = [Path(p) for p in summary["figures"]]
    assert len(figs) == 10 + 5  # RMSE curves for every variable and level, a map per variable
    for p in figs:
        assert p.is_file() and p.stat().st_size > 10_000, p
    img = imread(out / "figures" / "map_z500_6h.png")
    assert img.shape[1] > img.shape[0] > 300 and img[..., :3].std() > 0.1


class LastState:
    """A stand-in model that forecasts its newest input state: its rows must equal persistence."""

    surf_vars, atmos_vars, static_vars = ("msl", "10u", "10v"), ("t", "u", "v"), ()
    patch_size, timestep_minutes = 2, 12 * 60

    def apply(self, variables: Any, batch: Batch) -> Batch:
        last = lambda d: {k: v[:, -1:] for k, v in d.items()}
        meta = batch.metadata
        return Batch(
            surf_vars=last(batch.surf_vars),
            static_vars={},
            atmos_vars=last(batch.atmos_vars),
            metadata=meta.replace(
                time=meta.time + self.timestep_minutes, rollout_step=meta.rollout_step + 1
            ),
        )


def test_evaluate_counts_gaps_and_scores_surface_variables(natl: tuple) -> None:
    """12-hourly data with the 5th state removed: leads whose valid time is missing are skipped."""
    ds, source = natl
    rows = evaluation.evaluate(LastState(), {}, source, steps=2, step_hours=12, batch_size=4)  # type: ignore[arg-type]
    times = set(source.times.tolist())
    inits = [t for t in sorted(times) if t - 12 * HOUR in times]
    assert len(inits) == 12 - 2  # 13 states, one gone: it and the one after lose their history
    for k in (1, 2):
        want = sum(t + 12 * HOUR * k in times for t in inits)
        got = {r["n"] for r in rows if r["lead_time_h"] == 12 * k}
        assert got == {want}, (k, got, want)
    surface = [r for r in rows if r["variable"] == "msl"]
    assert {r["level"] for r in surface} == {None} and len(surface) == 3 * 2
    assert {r["level"] for r in rows if r["variable"] == "t"} == {500.0, 850.0}
    # persistence of msl at 12 h, against numpy on the regional grid (rows 80..30N, cos weights)
    x = ds["msl"].values.astype(np.float64)[:, :-1]
    keep = [i for i in range(13) if i != 4]
    idx = {
        int(t): i
        for t, i in zip(ds.time.values.astype("datetime64[s]").astype(np.int64), range(13))
    }
    pairs = [(idx[t], idx[t + 12 * HOUR]) for t in inits if t + 12 * HOUR in times]
    assert all(a in keep and b in keep for a, b in pairs)
    w = band_weights(ds.latitude.values[:-1], 5.0)[:, None]
    want = np.sqrt(np.mean([np.mean(w * (x[a] - x[b]) ** 2) for a, b in pairs]))
    (row,) = [r for r in surface if r["model"] == "persistence" and r["lead_time_h"] == 12]
    assert row["rmse"] == pytest.approx(want, rel=1e-5)
    persistence = {
        (r["variable"], r["level"], r["lead_time_h"]): r
        for r in rows
        if r["model"] == "persistence"
    }
    for r in rows:
        if r["model"] == "aurora":
            p = persistence[(r["variable"], r["level"], r["lead_time_h"])]
            assert (
                r["n"] == p["n"]
                and r["rmse"] == pytest.approx(p["rmse"], rel=1e-6)
                and r["acc"] == pytest.approx(p["acc"], rel=1e-6)
            )


def test_one_model_step_serves_evaluate_and_predict(natl: tuple, tmp_path: Path) -> None:
    """A `ModelStep` passed in place of the model is compiled once for both jobs."""
    _, source = natl

    class Counting(LastState):
        traces = 0

        def apply(self, variables: Any, batch: Batch) -> Batch:
            Counting.traces += 1  # runs only while tracing
            return super().apply(variables, batch)

    step = ModelStep(Counting())  # type: ignore[arg-type]
    kwargs = dict(steps=2, step_hours=12, batch_size=4)
    rows = evaluation.evaluate(step, {}, source, **kwargs)
    assert repr(rows) == repr(evaluation.evaluate(LastState(), {}, source, **kwargs))  # type: ignore[arg-type]
    path = evaluation.predict(step, {}, source, out_dir=tmp_path, **kwargs)["netcdf"]
    with xr.open_dataset(path) as f:
        assert f.sizes["time"] == len(evaluation.init_times(source, 12))
    assert Counting.traces == 1


def test_given_climatology_fields_or_function_of_valid_time(natl: tuple) -> None:
    """The default (source mean) passed explicitly, or as a function of valid time, scores alike."""
    _, source = natl

    def run(clim: Any) -> list[dict[str, Any]]:
        return evaluation.evaluate(
            LastState(), {}, source, steps=1, step_hours=12, climatology=clim
        )  # type: ignore[arg-type]

    mean = evaluation.source_mean(source)
    seen: list[int] = []
    default, fields, function = run(None), run(mean), run(lambda t: seen.append(t) or mean)
    assert (
        repr(default) == repr(fields) == repr(function)
    )  # repr: NaN (climatology ACC) equals itself
    assert sorted(set(seen)) == sorted(
        t + 12 * HOUR for t in evaluation.init_times(source, 12) if t + 12 * HOUR in source.times
    )
    assert evaluation.climatology_kind(None, source).startswith(
        "source mean: per-grid-point mean of the 12 states"
    )
    assert evaluation.climatology_kind(mean, source) == "given: time-independent fields"
    assert evaluation.climatology_kind(lambda t: mean, source) == "given: a function of valid time"


def test_write_scores_formats_levels_and_nan(tmp_path: Path) -> None:
    rows = [
        {
            "model": "aurora",
            "variable": "2t",
            "level": None,
            "lead_time_h": 6.0,
            "rmse": 1.25,
            "mae": 1.0,
            "bias": -0.5,
            "acc": 0.9,
            "n": 3,
        },
        {
            "model": "climatology",
            "variable": "z",
            "level": 500.0,
            "lead_time_h": 12.0,
            "rmse": 300.0,
            "mae": 250.0,
            "bias": 1.0,
            "acc": float("nan"),
            "n": 2,
        },
    ]
    paths = evaluation.write_scores(
        rows, tmp_path / "o", {"model_preset": "AuroraSmallPretrained", "checkpoint": tmp_path}
    )
    header, back = read_csv(paths["scores"])
    assert tuple(header) == COLUMNS
    assert [r["level"] for r in back] == ["", "500"] and back[1]["acc"] == "nan"
    assert [r["lead_time_h"] for r in back] == ["6", "12"]
    summary = json.loads(paths["summary"].read_text())
    assert summary["variables"] == ["2t", "z500"] and summary["checkpoint"] == str(tmp_path)


# ---- figures ------------------------------------------------------------------------------------


def test_plot_maps_surface_variable_on_regional_grid(natl: tuple, tmp_path: Path) -> None:
    ds, _ = natl
    lat, lon = ds.latitude.values, ds.longitude.values
    msl = ds["msl"].values

    def batch(i: int) -> Batch:
        return Batch(
            surf_vars={"msl": msl[i][None, None]},
            static_vars={},
            atmos_vars={},
            metadata=Metadata(lat=lat, lon=lon, time=[ds.time.values[i]], atmos_levels=()),
        )

    path = figures.plot_maps(batch(1), batch(0), "msl", None, 12, tmp_path / "m" / "msl.png")
    img = imread(path)
    assert path.stat().st_size > 10_000 and img[..., :3].std() > 0.1
    with pytest.raises(KeyError):
        figures.plot_maps(batch(1), batch(0), "msl", 500, 12, tmp_path / "x.png")


# ---- forecast files -----------------------------------------------------------------------------


def forecast_batches(ds: xr.Dataset, inits: list[int], steps: int) -> list[Batch]:
    """Real states as "predictions": step k of init i is the state at index i + k."""
    lat, lon, levels = ds.latitude.values, ds.longitude.values, tuple(ds.level.values.tolist())
    minutes = ds.time.values.astype("datetime64[m]").astype(np.int64)
    out = []
    for k in range(1, steps + 1):
        rows = [i + k for i in inits]
        out.append(
            Batch(
                surf_vars={v: ds[v].values[rows][:, None] for v in ("msl", "10u")},
                static_vars={},
                atmos_vars={v: ds[v].values[rows][:, None] for v in ("t", "u")},
                metadata=Metadata(
                    lat=lat, lon=lon, time=minutes[rows].astype(np.int32), atmos_levels=levels
                ),
            )
        )
    return out


def test_write_forecast_is_cf_and_round_trips(natl: tuple, tmp_path: Path) -> None:
    ds, _ = natl
    inits, steps = [0, 1, 2], 2
    preds = forecast_batches(ds, inits, steps)
    path = forecast_io.write_forecast(
        tmp_path / "fc.nc",
        ds.time.values[inits],
        preds,
        {"model_preset": "AuroraSmallPretrained", "checkpoint_step": 1200, "data": ["natl"]},
    )
    with xr.open_dataset(path) as f:
        assert f.attrs["Conventions"] == "CF-1.8"
        assert "AuroraSmallPretrained" in f.attrs["source"] and "1200" in f.attrs["source"]
        assert "write_forecast" in f.attrs["history"]
        assert json.loads(f.attrs["provenance"]) == {
            "model_preset": "AuroraSmallPretrained",
            "checkpoint_step": 1200,
            "data": ["natl"],
        }
        assert (
            f.attrs["provenance_checkpoint_step"] == 1200
            and f.attrs["provenance_data"] == '["natl"]'
        )
        assert f["t"].dims == ("time", "prediction_timedelta", "level", "latitude", "longitude")
        assert f["msl"].dims == ("time", "prediction_timedelta", "latitude", "longitude")
        assert (
            f["msl"].attrs["standard_name"] == "air_pressure_at_mean_sea_level"
            and f["msl"].attrs["units"] == "Pa"
        )
        assert f["10u"].attrs["standard_name"] == "eastward_wind"
        assert (
            f.latitude.attrs["units"] == "degrees_north"
            and f.longitude.attrs["units"] == "degrees_east"
        )
        assert f.level.attrs["units"] == "hPa"
        assert f.time.encoding["units"].startswith("hours since 1970-01-01")
        np.testing.assert_array_equal(f.time.values, ds.time.values[inits])
        np.testing.assert_array_equal(
            f.prediction_timedelta.values, np.array([12, 24], "timedelta64[h]")
        )
        np.testing.assert_array_equal(f.valid_time.values[:, 1], ds.time.values[[2, 3, 4]])
        for v in ("msl", "10u", "t", "u"):
            assert f[v].dtype == np.float32
            for k in range(steps):
                np.testing.assert_array_equal(
                    f[v].values[:, k], ds[v].values[[i + k + 1 for i in inits]]
                )
    # our reader flattens (init, lead) to valid time; overlapping inits are read one at a time
    back = open_dataset(path, init_time=ds.time.values[1])
    np.testing.assert_array_equal(back.time.values, ds.time.values[[2, 3]])
    for v in ("msl", "10u", "t", "u"):
        assert back[v].dtype == np.float32
        np.testing.assert_array_equal(back[v].values, ds[v].values[[2, 3]])


def test_write_forecast_rejects_mismatched_leads(natl: tuple, tmp_path: Path) -> None:
    ds, _ = natl
    preds = forecast_batches(ds, [0, 1], 1)
    with pytest.raises(ValueError, match="Leads differ"):
        forecast_io.write_forecast(tmp_path / "bad.nc", ds.time.values[[0, 2]], preds, {})


def test_predict_writes_a_forecast_of_every_init(hres: tuple, hres_run: dict) -> None:
    _, source = hres
    path = evaluation.predict(
        hres_run["model"],
        hres_run["params"],
        source,
        steps=2,
        out_dir=hres_run["out"] / "pred",
        provenance={"model_preset": "tiny"},
        batch_size=4,
        init_hours=None,
    )["netcdf"]
    with xr.open_dataset(path) as f:
        assert (
            f.sizes["time"] == 7
            and f.sizes["prediction_timedelta"] == 2
            and f.sizes["latitude"] == 18
        )
        assert set(f.data_vars) == {"z", "u", "v", "t", "r"}
        assert f.attrs["provenance_data_source"] == "hres_sample"
        assert np.isfinite(f["z"].values).all()
