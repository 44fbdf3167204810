"""Batch / Metadata: conventions of microsoft-aurora, jit-friendliness, normalisation, files."""

from __future__ import annotations

from datetime import datetime

import jax
import numpy as np
import pytest

from aurora.batch import Batch, Metadata, minutes_to_datetimes, to_minutes
from aurora.model.time_encoding import absolute_time_encoding
from aurora.normalisation import aurora_stats, level_to_str
from tests.helpers import random_batch, tiny_model


def _meta(**overrides):
    kwargs = dict(
        lat=np.linspace(90, -90, 5),
        lon=np.arange(0, 360, 90.0),
        time=(datetime(2020, 1, 1, 6),),
        atmos_levels=(500, 850),
    )
    return Metadata(**{**kwargs, **overrides})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"lat": np.linspace(-90, 90, 5)}, "strictly decreasing"),
        ({"lat": np.linspace(91, -90, 5)}, r"\[-90, 90\]"),
        ({"lon": np.arange(-180, 180, 90.0)}, r"\[0, 360\)"),
        ({"lon": np.array([0.0, 90.0, 90.0, 180.0])}, "strictly increasing"),
    ],
)
def test_grid_conventions_are_enforced(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _meta(**overrides)


def test_times_round_trip_as_int32_minutes() -> None:
    times = [datetime(1940, 1, 1), datetime(2020, 6, 1, 12, 30), datetime(2100, 12, 31, 18)]
    minutes = to_minutes(times)
    assert minutes.dtype == np.int32
    assert minutes_to_datetimes(minutes) == tuple(times)
    assert np.array_equal(to_minutes(np.array(times, dtype="datetime64[ns]")), minutes)
    with pytest.raises(ValueError, match="whole minute"):
        to_minutes([datetime(2020, 1, 1, 0, 0, 30)])


def test_time_encoding_matches_float64_reference_formula() -> None:
    """microsoft-aurora: hours since 1970 as float32, expanded in float64."""
    times = [
        datetime(1979, 1, 1),
        datetime(2020, 6, 1, 12),
        datetime(2016, 9, 25, 6),
        datetime(2099, 3, 1, 18),
    ]
    hours = np.array(
        [(np.datetime64(t) - np.datetime64("1970-01-01")) / np.timedelta64(1, "h") for t in times],
        np.float32,
    )
    wavelengths = np.logspace(0, np.log10(24 * 365.25), 256)
    phase = hours.astype(np.float64)[:, None] * (2 * np.pi / wavelengths)
    expected = np.concatenate([np.sin(phase), np.cos(phase)], axis=-1)
    got = np.asarray(jax.jit(absolute_time_encoding, static_argnums=1)(to_minutes(times), 512))
    assert np.abs(got - expected).max() < 1e-6


def test_new_times_do_not_recompile() -> None:
    batch = random_batch(tiny_model())
    traces = []

    @jax.jit
    def f(b: Batch):
        traces.append(1)
        return b.metadata.time + 1

    f(batch)
    f(batch.replace(metadata=batch.metadata.replace(time=to_minutes([datetime(2021, 1, 1)]))))
    assert len(traces) == 1


def test_normalise_uses_aurora_table_and_round_trips() -> None:
    batch = random_batch(tiny_model())
    normed = batch.normalise()
    location, scale = aurora_stats()["z_500"]
    i = batch.metadata.atmos_levels.index(500.0)
    np.testing.assert_allclose(
        normed.atmos_vars["z"][:, :, i],
        (batch.atmos_vars["z"][:, :, i] - location) / scale,
        rtol=1e-5,
    )
    back = normed.unnormalise()
    np.testing.assert_allclose(back.surf_vars["msl"], batch.surf_vars["msl"], rtol=1e-6)
    assert level_to_str(7.5) == "7_5" and level_to_str(500.0) == "500"
    with pytest.raises(KeyError, match="r_100"):
        batch.replace(atmos_vars={"r": batch.atmos_vars["t"]}).normalise()


def test_crop_drops_one_latitude_like_microsoft_aurora() -> None:
    model = tiny_model()
    batch = random_batch(model, h=17)  # 17 = 4 * 4 + 1
    cropped = batch.crop(4)
    assert cropped.spatial_shape == (16, 32)
    assert cropped.metadata.lat == batch.metadata.lat[:-1]
    with pytest.raises(ValueError, match="at most be one latitude"):
        random_batch(model, h=18).crop(4)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        random_batch(model, w=30).crop(4)


def test_netcdf_round_trip(tmp_path) -> None:
    batch = random_batch(tiny_model())
    path = tmp_path / "batch.nc"
    batch.to_netcdf(path)
    back = Batch.from_netcdf(path)
    for group in ("surf_vars", "static_vars", "atmos_vars"):
        for k, v in getattr(batch, group).items():
            np.testing.assert_array_equal(getattr(back, group)[k], v)
    assert back.metadata.lat == batch.metadata.lat
    assert back.metadata.datetimes() == batch.metadata.datetimes()


def test_regrid_to_coarser_global_grid() -> None:
    batch = random_batch(tiny_model(), h=16, w=32)
    coarse = batch.regrid(22.5)
    assert coarse.spatial_shape == (9, 16)
    assert coarse.metadata.lat[0] == 90.0 and coarse.metadata.lon[-1] == 337.5
