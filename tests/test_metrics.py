"""WeatherBench2 scores against plain-numpy references, on real fields from tests/data.

Two grids: the global 10° HRES sample (rows on both poles) and grids without poles (the same
sample with its outer rows cropped, the offset WeatherBench1 5.625° grid, and the regional
North-Atlantic 10° sample with surface fields).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from aurora.batch import Batch, Metadata
from data_builders.readers import open_dataset
from trainers.evaluation import metrics

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
NATL = DATA / "hres_an_sfc_pl_20160925-20161001_12h_10deg_natlantic.nc"
WB1 = DATA / "weatherbench1_era5_static_5.625deg.nc"


# ---- independent references --------------------------------------------------------------------


def wb2_lat_weights(lat_deg: np.ndarray) -> np.ndarray:
    """WeatherBench2's get_lat_weights: ascending latitudes, cell bounds from -90 to 90."""
    ascending = lat_deg[::-1] if lat_deg[0] > lat_deg[-1] else lat_deg
    x = np.deg2rad(ascending)
    bounds = np.concatenate([[-np.pi / 2], (x[:-1] + x[1:]) / 2, [np.pi / 2]])
    w = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    w = w / w.mean()
    return w[::-1] if lat_deg[0] > lat_deg[-1] else w


def ref_scores(f: np.ndarray, o: np.ndarray, c: np.ndarray, w_lat: np.ndarray) -> dict[str, float]:
    """One 2-D field, written with np.average over a full 2-D weight array."""
    f, o, c = (np.asarray(a, np.float64) for a in (f, o, c))
    w = np.repeat(w_lat[:, None], f.shape[1], axis=1)
    fa, oa = f - c, o - c
    return {
        "mse": np.average((f - o) ** 2, weights=w),
        "rmse": np.sqrt(np.average((f - o) ** 2, weights=w)),
        "mae": np.average(np.abs(f - o), weights=w),
        "bias": np.average(f - o, weights=w),
        "acc": np.average(fa * oa, weights=w)
        / np.sqrt(np.average(fa**2, weights=w) * np.average(oa**2, weights=w)),
    }


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hres() -> dict[str, np.ndarray]:
    ds = open_dataset(HRES_PL, variables=["z", "t", "u"])
    return {
        "lat": ds.latitude.values,
        "lon": ds.longitude.values,
        "levels": tuple(ds.level.values.tolist()),
        **{k: ds[k].values for k in ("z", "t", "u")},  # (time, level, lat, lon)
    }


@pytest.fixture(scope="module")
def natl() -> dict[str, np.ndarray]:
    ds = open_dataset(NATL, variables=["msl", "10u", "t"])
    return {
        "lat": ds.latitude.values,
        "lon": ds.longitude.values,
        "levels": tuple(ds.level.values.tolist()),
        **{k: ds[k].values for k in ("msl", "10u", "t")},
    }


def make_batch(
    d: dict,
    surf: tuple[str, ...],
    atmos: tuple[str, ...],
    times: list[int],
    rows: slice = slice(None),
) -> Batch:
    """Batch of the given time indices (batch axis), history 1, latitude rows `rows`."""
    return Batch(
        surf_vars={k: d[k][times][:, None, rows] for k in surf},
        static_vars={},
        atmos_vars={k: d[k][times][:, None, :, rows] for k in atmos},
        metadata=Metadata(
            lat=d["lat"][rows],
            lon=d["lon"],
            time=np.zeros(len(times), np.int32),
            atmos_levels=d["levels"],
        ),
    )


# ---- latitude weights ---------------------------------------------------------------------------


def test_lat_weights_match_weatherbench2_on_global_grid_with_poles(hres: dict) -> None:
    lat = hres["lat"]
    assert lat[0] == 90 and lat[-1] == -90 and len(lat) == 19
    w = metrics.lat_weights(lat)
    np.testing.assert_allclose(w, wb2_lat_weights(lat), rtol=1e-12)
    assert w.mean() == pytest.approx(1.0)
    assert 0 < w[0] < 0.1 * w[9]  # the polar cap: small, not zero as cos(90°) would be
    np.testing.assert_allclose(w, w[::-1])


def test_lat_weights_match_weatherbench2_on_offset_grid_without_poles() -> None:
    lat = open_dataset(WB1).latitude.values  # 87.1875 .. -87.1875 after the reader's flip
    assert abs(lat).max() < 90
    np.testing.assert_allclose(metrics.lat_weights(lat), wb2_lat_weights(lat), rtol=1e-12)


def test_lat_weights_on_cropped_grid_are_cos_latitude(hres: dict) -> None:
    lat = hres["lat"][1:-1]  # 80 .. -80: no poles, evenly spaced
    cos = np.cos(np.deg2rad(lat))
    np.testing.assert_allclose(metrics.lat_weights(lat), cos / cos.mean(), rtol=1e-12)
    np.testing.assert_array_equal(metrics.lat_weights([45.0]), [1.0])


# ---- field metrics ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows", [slice(None), slice(1, -1), slice(2, 9)], ids=["poles", "cropped", "northern"]
)
def test_field_metrics_match_numpy_reference(hres: dict, rows: slice) -> None:
    """z, t, u at every level: forecast = state at t, truth = state 6 h later, clim = time mean."""
    lat = hres["lat"][rows]
    w = metrics.lat_weights(lat)
    for name in ("z", "t", "u"):
        x = hres[name][:, :, rows]
        f, o, c = x[2], x[3], x.mean(axis=0)  # (level, lat, lon)
        got = {m: getattr(metrics, m)(f, o, w) for m in ("mse", "rmse", "mae", "bias")}
        got["acc"] = metrics.acc(f, o, c, w)
        for m, values in got.items():
            assert values.shape == (len(hres["levels"]),)
            want = [ref_scores(f[i], o[i], c[i], w)[m] for i in range(len(values))]
            np.testing.assert_allclose(values, want, rtol=1e-10, err_msg=f"{name} {m}")


def test_surface_metrics_on_regional_grid_match_numpy_reference(natl: dict) -> None:
    w = metrics.lat_weights(natl["lat"])
    cos = np.cos(np.deg2rad(natl["lat"]))
    np.testing.assert_allclose(w, cos / cos.mean(), rtol=1e-12)  # 80..20N, no poles
    for name in ("msl", "10u"):
        x = natl[name]
        f, o, c = x[:-1], x[1:], x.mean(axis=0)  # every 12 h pair
        got = (
            metrics.rmse(f, o, w),
            metrics.mae(f, o, w),
            metrics.bias(f, o, w),
            metrics.acc(f, o, c, w),
        )
        for k, m in enumerate(("rmse", "mae", "bias", "acc")):
            want = [ref_scores(f[i], o[i], c, w)[m] for i in range(len(f))]
            np.testing.assert_allclose(got[k], want, rtol=1e-10, err_msg=f"{name} {m}")


def test_bias_sign_and_perfect_forecast(hres: dict) -> None:
    w = metrics.lat_weights(hres["lat"])
    o = hres["t"][0]
    assert np.all(metrics.bias(o + 1.5, o, w) == pytest.approx(1.5))  # forecast - truth
    assert np.all(metrics.rmse(o, o, w) == 0)
    np.testing.assert_allclose(metrics.acc(o, o, hres["t"].mean(0), w), 1.0, rtol=1e-12)


def test_jit_matches_numpy(hres: dict) -> None:
    w = metrics.lat_weights(hres["lat"])
    f, o, c = hres["z"][4], hres["z"][5], hres["z"].mean(0)
    jitted = jax.jit(
        lambda f, o, c: [
            metrics.rmse(f, o, w),
            metrics.mae(f, o, w),
            metrics.bias(f, o, w),
            metrics.acc(f, o, c, w),
        ]
    )
    got = jitted(f, o, c)
    want = [
        metrics.rmse(f, o, w),
        metrics.mae(f, o, w),
        metrics.bias(f, o, w),
        metrics.acc(f, o, c, w),
    ]
    for g, x in zip(got, want):
        assert isinstance(g, jax.Array)
        np.testing.assert_allclose(np.asarray(g), x, rtol=2e-5, atol=1e-3)


# ---- batches ------------------------------------------------------------------------------------


def test_score_batch_and_totals_aggregate_like_weatherbench2(natl: dict) -> None:
    """Two batches of samples: RMSE = sqrt(mean over samples of the per-sample MSE)."""
    w = metrics.lat_weights(natl["lat"])
    clim = Batch(
        surf_vars={k: natl[k].mean(0)[None, None] for k in ("msl", "10u")},
        static_vars={},
        atmos_vars={"t": natl["t"].mean(0)[None, None]},
        metadata=Metadata(
            lat=natl["lat"],
            lon=natl["lon"],
            time=np.zeros(1, np.int32),
            atmos_levels=natl["levels"],
        ),
    )
    totals = metrics.ScoreTotals(natl["levels"])
    pairs = [([0, 1, 2], [1, 2, 3]), ([5, 6], [6, 7])]
    for fi, oi in pairs:
        pred = make_batch(natl, ("msl", "10u"), ("t",), fi)
        truth = make_batch(natl, ("msl", "10u"), ("t",), oi)
        totals.add(metrics.score_batch(pred, truth, clim))
    rows = {(r["variable"], r["level"]): r for r in totals.rows()}
    assert set(rows) == {("msl", None), ("10u", None), ("t", 500.0), ("t", 850.0)}
    for (name, level), row in rows.items():
        fields = []
        for fi, oi in pairs:
            for a, b in zip(fi, oi):
                f, o = natl[name][a], natl[name][b]
                c = natl[name].mean(0)
                if level is not None:
                    k = natl["levels"].index(level)
                    f, o, c = f[k], o[k], c[k]
                fields.append(ref_scores(f, o, c, w))
        assert row["n"] == 5
        assert row["rmse"] == pytest.approx(np.sqrt(np.mean([s["mse"] for s in fields])), rel=1e-10)
        assert row["rmse"] != pytest.approx(
            np.mean([s["rmse"] for s in fields]), rel=1e-6
        )  # not the mean RMSE
        for m in ("mae", "bias", "acc"):
            assert row[m] == pytest.approx(np.mean([s[m] for s in fields]), rel=1e-10), (
                name,
                level,
                m,
            )


def test_score_batch_jit_matches_numpy_and_mask_drops_rows(hres: dict) -> None:
    pred = make_batch(hres, (), ("z", "t"), [1, 2, 3], rows=slice(0, -1))
    truth = make_batch(hres, (), ("z", "t"), [2, 3, 4], rows=slice(0, -1))
    clim = make_batch(
        {**hres, "z": hres["z"].mean(0, keepdims=True), "t": hres["t"].mean(0, keepdims=True)},
        (),
        ("z", "t"),
        [0],
        rows=slice(0, -1),
    )
    mask = np.array([1, 0, 1], np.float32)
    host = metrics.score_batch(pred, truth, clim, mask)
    dev = jax.jit(metrics.score_batch)(pred, truth, clim, mask)
    assert float(dev["n"]) == host["n"] == 2
    for name in ("z", "t"):
        for m in ("mse", "mae", "bias", "acc"):
            np.testing.assert_allclose(
                np.asarray(dev["atmos"][name][m]), host["atmos"][name][m], rtol=1e-5, atol=1e-4
            )
    # the masked-out middle row contributes nothing
    keep = metrics.score_batch(
        make_batch(hres, (), ("z",), [1, 3], rows=slice(0, -1)),
        make_batch(hres, (), ("z",), [2, 4], rows=slice(0, -1)),
        clim,
    )
    for m in ("mse", "mae", "bias", "acc"):
        np.testing.assert_allclose(host["atmos"]["z"][m], keep["atmos"]["z"][m], rtol=1e-12)


def test_score_batch_without_climatology_has_nan_acc_and_checks_grid(hres: dict) -> None:
    pred = make_batch(hres, (), ("t",), [0])
    totals = metrics.ScoreTotals(hres["levels"])
    totals.add(metrics.score_batch(pred, make_batch(hres, (), ("t",), [1])))
    assert all(np.isnan(r["acc"]) and r["rmse"] > 0 for r in totals.rows())
    with pytest.raises(ValueError, match="crop"):
        metrics.score_batch(pred, make_batch(hres, (), ("t",), [1], rows=slice(0, -1)))
