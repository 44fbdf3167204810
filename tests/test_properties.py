"""Property test: arbitrary small files through the readers and the pipeline.

Hypothesis writes real netCDF files with random grids (ascending or descending latitudes, 0..360
or -180..180 longitudes, shuffled), random time orders (duplicates and gaps included), random
variable sets and random NaNs. Each either reads into the canonical form with every value where it
belongs, or raises our `DataError`; never another exception, never silently wrong data.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from aurora.normalisation import atmos_location_scale, surf_location_scale
from data_builders.errors import DataError
from data_builders.pipeline import Pipeline, WeatherSource
from data_builders.readers import open_dataset

LEVELS = (500.0, 850.0)


@st.composite
def files(draw: st.DrawFn) -> dict:
    n_lat = draw(st.integers(2, 6))
    n_lon = draw(st.integers(2, 8))
    lat = np.linspace(80, -80, n_lat)
    if draw(st.booleans()):
        lat = lat[::-1]
    step = 360 / n_lon
    lon = np.arange(n_lon) * step
    if draw(st.booleans()):
        lon = np.sort(np.where(lon >= 180, lon - 360, lon))  # -180..180, as such files come
    if draw(st.integers(0, 9)) == 0:
        lon = np.asarray(draw(st.permutations(lon.tolist())))  # scrambled: must be refused or fixed
    unique = draw(st.integers(0, 3)) > 0  # sometimes duplicate times
    hours = draw(
        st.lists(st.integers(0, 8).map(lambda k: 6 * k), min_size=1, max_size=5, unique=unique)
    )
    times = pd.Timestamp("2022-01-01") + pd.to_timedelta(hours, "h")
    surf = draw(st.sets(st.sampled_from(["2t", "msl"]), max_size=2))
    atmos = draw(st.sets(st.sampled_from(["t", "z"]), max_size=2))
    nan_at = draw(
        st.one_of(
            st.none(),
            st.none(),
            st.none(),
            st.tuples(
                st.integers(0, len(hours) - 1), st.integers(0, n_lat - 1), st.integers(0, n_lon - 1)
            ),
        )
    )
    return {
        "lat": lat,
        "lon": np.asarray(lon),
        "times": times,
        "surf": sorted(surf),
        "atmos": sorted(atmos),
        "nan_at": nan_at,
    }


def _field(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Plausible values (the readers check units through typical magnitudes per level)."""
    if name in ("2t", "msl"):
        location, scale = surf_location_scale(name)
    else:
        location, scale = (np.reshape(x, (-1, 1, 1)) for x in atmos_location_scale(name, LEVELS))
    return (location + scale * rng.standard_normal(shape)).astype(np.float32)


def _write(spec: dict, path: Path) -> xr.Dataset:
    rng = np.random.default_rng(0)
    nt, ny, nx = len(spec["times"]), len(spec["lat"]), len(spec["lon"])
    data = {}
    for v in spec["surf"]:
        data[v] = (("time", "latitude", "longitude"), _field(v, (nt, ny, nx), rng))
    for v in spec["atmos"]:
        data[v] = (
            ("time", "level", "latitude", "longitude"),
            _field(v, (nt, len(LEVELS), ny, nx), rng),
        )
    if spec["nan_at"] is not None and data:
        first = next(iter(data.values()))[1]
        i, y, x = spec["nan_at"]
        first[(i, ..., y, x)] = np.nan
    ds = xr.Dataset(
        data,
        coords={
            "time": spec["times"],
            "level": ("level", np.array(LEVELS), {"units": "hPa"}),
            "latitude": spec["lat"],
            "longitude": spec["lon"],
        },
    )
    for v in spec["surf"] + spec["atmos"]:
        ds[v].attrs["units"] = {"2t": "K", "msl": "Pa", "t": "K", "z": "m**2 s**-2"}[v]
    ds.to_netcdf(path)
    return ds


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files())
def test_readers_and_pipeline_give_canonical_data_or_our_error(spec: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.nc"
        original = _write(spec, path)
        try:
            ds = open_dataset(path)
        except DataError as e:
            assert "random.nc" in str(e), f"the error names the file: {e}"
            event(f"DataError: {str(e)[-70:]}")
            return
        event("read")

        # Canonical orientation.
        assert np.all(np.diff(ds.latitude.values) < 0)
        assert (
            np.all(np.diff(ds.longitude.values) > 0)
            and ds.longitude.min() >= 0
            and ds.longitude.max() < 360
        )
        assert np.all(np.diff(ds.time.values.astype("int64")) > 0)
        # Every value where it belongs: the original at (time, lat, lon) equals the canonical value
        # at the same time and latitude and the longitude taken modulo 360.
        for v in spec["surf"] + spec["atmos"]:
            src = original[v].assign_coords(longitude=original.longitude % 360)
            for t in np.unique(original.time.values):
                a = src.sel(time=t).transpose(..., "latitude", "longitude")
                b = ds[v].sel(time=t)
                b = b.sel(latitude=a.latitude, longitude=a.longitude)
                np.testing.assert_array_equal(a.values, b.values)

        # Through the pipeline: windows of existing consecutive times only, no NaN passed on.
        if not (spec["surf"] or spec["atmos"]):
            return
        records = [
            {
                "time": int(pd.Timestamp(t).timestamp()),
                "surf": {v: ds[v].sel(time=t).values for v in spec["surf"]},
                "atmos": {v: ds[v].sel(time=t).values for v in spec["atmos"]},
            }
            for t in ds.time.values
        ]
        source = WeatherSource(
            records=records, lat=ds.latitude.values, lon=ds.longitude.values, levels=LEVELS
        )
        try:
            pipeline = Pipeline(source, rollout_steps=1, batch_size=1, shuffle=False, num_threads=0)
        except DataError:
            seconds = {int(r["time"]) for r in records}
            assert not any(t - 21600 in seconds and t + 21600 in seconds for t in seconds), (
                "a window existed"
            )
            return
        event("pipeline batches")
        for inputs, targets in pipeline.iterator(0):
            now = int(inputs.metadata.time[0]) * 60
            assert int(targets[0].metadata.time[0]) * 60 == now + 21600
            for v, x in inputs.atmos_vars.items():
                np.testing.assert_array_equal(
                    x[0, 1], ds[v].sel(time=pd.Timestamp(now, unit="s")).values
                )
