"""Readers and regridding on real ERA5 / IFS HRES files (tests/data, see tests/data/README.md).

Every reader case runs on a real sample file; every error case on a small file written into
tmp_path from a real sample (units changed, bytes cut, axes shuffled), never on mocks.
"""

from __future__ import annotations

from pathlib import Path

import netCDF4
import numpy as np
import pytest
import xarray as xr

from data_builders.readers import (
    DataError,
    G,
    aurora_groups,
    nan_counts,
    open_dataset,
    regrid,
)

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
EDA = DATA / "era5_eda_pl_20170101T00-20170102T12_12h_3deg.nc"
FC = DATA / "hres_fc_2018040412_lead0-36h_pl_5deg.nc"
NATL = DATA / "hres_an_sfc_pl_20160925-20161001_12h_10deg_natlantic.nc"
STATIC = DATA / "era5_static_z_lsm_0.25deg.nc"
WB1 = DATA / "weatherbench1_era5_static_5.625deg.nc"
MISSING = DATA / "hres_an_t2m_20171018T00-12_2deg_with_missing.nc"
LEGACY_T2M = [
    DATA / "formats" / "cds_legacy_era5_sfc_t2m_2021030112_20deg.nc",
    DATA / "formats" / "cds_legacy_era5_sfc_t2m_2021030212_20deg.nc",
]
LEGACY_Z = DATA / "formats" / "cds_legacy_era5_static_z_0.25deg.nc"
LEGACY_LSM = DATA / "formats" / "cds_legacy_era5_static_lsm_0.25deg.nc"
NEWCDS_PL = DATA / "formats" / "newcds_EMULATED_era5_pl_member0_20170101-02_3deg.nc"
NEWCDS_SFC = DATA / "formats" / "newcds_EMULATED_era5_sfc_t2m_2017010112_0.25deg_europe.nc"

WB2_NAMES = {
    "u10": "10m_u_component_of_wind",
    "v10": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "w": "vertical_velocity",
    "z": "geopotential",
}


def raw(path: Path) -> xr.Dataset:
    """The file as xarray decodes it, fully loaded, without our canonicalisation."""
    with xr.open_dataset(path, decode_timedelta=True) as ds:
        return ds.load()


def plain(ds: xr.Dataset) -> xr.Dataset:
    """Drop on-disk encodings so a derived dataset can be written in another format."""
    ds = ds.copy()
    for v in ds.variables.values():
        v.encoding = {}
    return ds


def assert_canonical(ds: xr.Dataset) -> None:
    """The invariants every reader output must satisfy (module docstring of readers.py)."""
    lat, lon = ds["latitude"].values, ds["longitude"].values
    assert np.all(np.diff(lat) < 0)
    assert np.all(np.diff(lon) > 0) and lon.min() >= 0 and lon.max() < 360
    if "level" in ds.dims:
        assert ds["level"].dtype == np.float64 and np.all(np.diff(ds["level"].values) > 0)
    if "time" in ds.dims:
        assert ds["time"].dtype == np.dtype("datetime64[ns]")
        assert np.all(np.diff(ds["time"].values) > np.timedelta64(0))
    for key, da in ds.data_vars.items():
        assert da.dtype == np.float32, key
        order = ("time", "level", "latitude", "longitude")
        assert da.dims == tuple(d for d in order if d in da.dims), key
        assert "nan_count" in da.attrs


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------


def test_cf_netcdf_pressure_levels() -> None:
    ds = open_dataset(HRES_PL)
    src = raw(HRES_PL)
    assert_canonical(ds)
    assert set(ds.data_vars) == {"z", "t", "u", "v", "r"}  # r keeps its ECMWF short name
    assert list(ds["level"].values) == [300.0, 400.0, 500.0, 700.0, 850.0, 1000.0]
    assert ds.sizes == {"time": 8, "level": 6, "latitude": 19, "longitude": 36}
    np.testing.assert_array_equal(ds["z"].sel(level=500).values, src["z"].sel(level=500).values)
    assert ds["z"].attrs["units"] == "m**2 s**-2"
    assert "lead_time" in ds.coords and "forecast_reference_time" in ds.coords
    assert ds.attrs["source_repository"] == src.attrs["source_repository"]  # provenance kept
    assert nan_counts(ds) == dict.fromkeys(ds.data_vars, 0)


def test_regional_file_with_negative_longitudes() -> None:
    ds = open_dataset(NATL)
    src = raw(NATL)
    assert_canonical(ds)
    expected = [0, 10, 20, 30, 40, 290, 300, 310, 320, 330, 340, 350]
    assert list(ds["longitude"].values) == expected
    np.testing.assert_array_equal(
        ds["msl"].sel(longitude=290).values, src["msl"].sel(longitude=-70).values
    )
    assert ds["10u"].dims == ("time", "latitude", "longitude")
    assert ds["w"].dims == ("time", "level", "latitude", "longitude")
    groups = aurora_groups(ds)
    assert set(groups["surf"]) == {"10u", "10v", "msl"}
    assert set(groups["atmos"]) == {"t", "u", "v", "w"}
    assert groups["static"] == {}


def test_cds_legacy_packed_values_are_unpacked() -> None:
    ds = open_dataset(LEGACY_T2M[0])
    assert_canonical(ds)
    with netCDF4.Dataset(LEGACY_T2M[0]) as nc:
        nc.set_auto_maskandscale(False)
        var = nc["t2m"]
        packed = var[:]
        assert packed.dtype == np.int16
        expected = packed * var.scale_factor + var.add_offset
    np.testing.assert_allclose(ds["2t"].values, expected.astype(np.float32), rtol=1e-6)
    assert float(ds["2t"].min()) > 200 and float(ds["2t"].max()) < 320
    assert ds["time"].values[0] == np.datetime64("2021-03-01T12:00", "ns")


def test_cds_legacy_files_concatenate_along_time() -> None:
    ds = open_dataset(LEGACY_T2M)
    assert_canonical(ds)
    assert ds.sizes["time"] == 2
    assert list(ds["time"].values) == [
        np.datetime64("2021-03-01T12:00", "ns"),
        np.datetime64("2021-03-02T12:00", "ns"),
    ]


def test_cds_legacy_static_files_merge_and_match_unpacked_copy() -> None:
    ds = open_dataset([LEGACY_Z, LEGACY_LSM])
    assert_canonical(ds)
    assert ds["z_sfc"].dims == ("latitude", "longitude")
    assert ds["lsm"].dims == ("latitude", "longitude")
    ref = open_dataset(STATIC)  # the same fields, unpacked by the data curators
    with netCDF4.Dataset(LEGACY_Z) as nc:
        step = float(nc["z"].scale_factor)
    np.testing.assert_allclose(ds["z_sfc"].values, ref["z_sfc"].values, atol=step)
    np.testing.assert_allclose(ds["lsm"].values, ref["lsm"].values, atol=1e-4)
    assert set(aurora_groups(ds)["static"]) == {"z", "lsm"}
    assert ds["z_sfc"].attrs["aurora_name"] == "z"


def test_static_quarter_degree_file() -> None:
    ds = open_dataset(STATIC)
    assert_canonical(ds)
    assert ds.sizes == {"latitude": 721, "longitude": 1440}
    assert ds["latitude"].values[0] == 90 and ds["longitude"].values[-1] == 359.75
    assert float(ds["lsm"].min()) >= 0 and float(ds["lsm"].max()) <= 1
    assert float(ds["z_sfc"].max()) > 40000  # Himalaya: geopotential, not height


def test_new_cds_pressure_levels_equal_eda_member_0() -> None:
    new = open_dataset(NEWCDS_PL)  # valid_time, pressure_level, expver, scalar number
    eda = open_dataset(EDA, member=0)
    assert_canonical(new)
    assert set(new.coords) == {"time", "level", "latitude", "longitude"}  # expver, number gone
    xr.testing.assert_equal(new[["z", "t"]].drop_attrs(), eda[["z", "t"]].drop_attrs())


def test_new_cds_surface_regional_wraps_longitude() -> None:
    ds = open_dataset(NEWCDS_SFC)
    src = raw(NEWCDS_SFC)
    assert_canonical(ds)
    lon = ds["longitude"].values
    assert lon[0] == 0 and lon[-1] == 359.75 and 40 in lon and 350 in lon and 100 not in lon
    np.testing.assert_array_equal(
        ds["2t"].sel(longitude=350).values[0], src["t2m"].sel(longitude=-10).values[0]
    )


def test_ensemble_member_selection() -> None:
    src = raw(EDA)
    ds = open_dataset(EDA, member=3)
    assert_canonical(ds)
    np.testing.assert_array_equal(
        ds["t"].sel(level=850).values, src["t"].sel(member=3, level=850).values
    )
    assert not np.array_equal(ds["t"].values, open_dataset(EDA)["t"].values)
    with pytest.raises(DataError, match="member 42"):
        open_dataset(EDA, member=42)
    with pytest.raises(DataError, match="only member 0"):
        open_dataset(NEWCDS_PL, member=3)


def test_forecast_store_is_flattened_to_valid_times() -> None:
    ds = open_dataset(FC)
    assert_canonical(ds)
    init = np.datetime64("2018-04-04T12:00", "ns")
    leads = np.array([0, 12, 24, 36], dtype="timedelta64[h]").astype("timedelta64[ns]")
    np.testing.assert_array_equal(ds["time"].values, init + leads)
    np.testing.assert_array_equal(ds["lead_time"].values, leads)
    assert np.all(ds["forecast_reference_time"].values == init)
    src = raw(FC)
    np.testing.assert_array_equal(
        ds["t"].isel(time=2).sel(level=500).values,
        src["t"].isel(time=0, prediction_timedelta=2).sel(level=500).values,
    )
    xr.testing.assert_equal(open_dataset(FC, init_time="2018-04-04T12:00"), ds)
    with pytest.raises(DataError, match="init_time"):
        open_dataset(FC, init_time="2018-04-05T00:00")


def test_weatherbench2_forecast_zarr_with_overlapping_inits(tmp_path: Path) -> None:
    src = plain(raw(FC)).rename({k: v for k, v in WB2_NAMES.items() if k in raw(FC)})
    half_day = np.timedelta64(12, "h")
    later = src.assign_coords(time=src["time"] + half_day, valid_time=src["valid_time"] + half_day)
    store = tmp_path / "hres_forecasts.zarr"
    xr.concat([src, later], dim="time").to_zarr(store, zarr_format=2)
    with pytest.raises(DataError, match="duplicate valid times.*init_time"):
        open_dataset(store)
    ds = open_dataset(store, init_time="2018-04-05T00:00")
    assert_canonical(ds)
    assert set(ds.data_vars) == {"z", "t", "u"}
    assert ds["time"].values[0] == np.datetime64("2018-04-05T00:00", "ns")
    np.testing.assert_array_equal(ds["z"].values, open_dataset(FC)["z"].values)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_zarr_store_reads_like_netcdf(tmp_path: Path, zarr_format: int) -> None:
    store = tmp_path / "natlantic.zarr"
    plain(raw(NATL)).to_zarr(store, zarr_format=zarr_format, consolidated=zarr_format == 2)
    marker = ".zgroup" if zarr_format == 2 else "zarr.json"
    assert (store / marker).exists()
    xr.testing.assert_identical(
        open_dataset(store).drop_attrs(deep=True), open_dataset(NATL).drop_attrs(deep=True)
    )
    renamed = store.rename(tmp_path / "no_suffix")  # detected by its metadata file, not its name
    assert set(open_dataset(renamed).data_vars) == set(open_dataset(NATL).data_vars)


def test_weatherbench2_long_names_and_ascending_latitude(tmp_path: Path) -> None:
    src = plain(raw(NATL))
    src = src.rename({k: v for k, v in WB2_NAMES.items() if k in src})
    src = src.isel(latitude=slice(None, None, -1))
    store = tmp_path / "wb2.zarr"
    src.to_zarr(store, zarr_format=3, consolidated=False)
    ds = open_dataset(store)
    ref = open_dataset(NATL)
    assert set(ds.data_vars) == set(ref.data_vars)
    for key in ref.data_vars:
        np.testing.assert_array_equal(ds[key].values, ref[key].values)


def test_weatherbench1_static_orography_becomes_geopotential() -> None:
    ds = open_dataset(WB1)
    src = raw(WB1)
    assert_canonical(ds)
    assert set(ds.data_vars) == {"lsm", "slt", "z_sfc"}
    assert ds["latitude"].values[0] == pytest.approx(87.1875)
    np.testing.assert_allclose(ds["z_sfc"].values, G * src["orography"].values[::-1], rtol=1e-6)
    assert ds["z_sfc"].attrs["units"] == "m**2 s**-2"
    np.testing.assert_array_equal(ds["slt"].values, src["slt"].values[::-1])


def test_variable_and_level_selection() -> None:
    ds = open_dataset(HRES_PL, variables=["t", "z"], levels=[850, 500])
    assert list(ds.data_vars) == ["t", "z"]
    assert list(ds["level"].values) == [500.0, 850.0]


def test_pascal_levels_are_converted(tmp_path: Path) -> None:
    src = raw(HRES_PL)
    src = src.assign_coords(level=("level", src["level"].values * 100.0, {"units": "Pa"}))
    path = tmp_path / "pa_levels.nc"
    src.to_netcdf(path)
    xr.testing.assert_equal(open_dataset(path), open_dataset(HRES_PL))


# ---------------------------------------------------------------------------------------------
# NaNs
# ---------------------------------------------------------------------------------------------


def test_nan_is_an_error_naming_file_variable_and_time() -> None:
    with pytest.raises(DataError) as e:
        open_dataset(MISSING)
    msg = str(e.value)
    assert MISSING.name in msg and "t2m" in msg and "21699" in msg
    assert "2017-10-18T00:00:00" in msg and "2017-10-18T12:00:00" in msg


@pytest.mark.parametrize("how", ["zero", "mean", 250.0])
def test_nan_fill(how: str | float) -> None:
    ds = open_dataset(MISSING, fill_nan=how)
    assert_canonical(ds)
    src = raw(MISSING)["t2m"].values
    mask = np.isnan(src)
    assert nan_counts(ds) == {"2t": 21699} and "2t=21699" in ds.attrs["nan_counts"]
    out = ds["2t"].values
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out[~mask], src[~mask])
    if how == "mean":
        for i in range(2):
            assert np.allclose(out[i][mask[i]], np.nanmean(src[i]))
    else:
        assert np.all(out[mask] == (0.0 if how == "zero" else 250.0))


def test_nan_fill_per_variable_mapping() -> None:
    ds = open_dataset(MISSING, fill_nan={"2t": "mean"})
    assert ds["2t"].attrs["nan_fill"] == "mean"
    with pytest.raises(DataError, match="t2m"):
        open_dataset(MISSING, fill_nan={"msl": "zero"})


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_variable_names_file_and_variable() -> None:
    with pytest.raises(DataError, match=rf"{HRES_PL.name}.*missing variable.*'q'"):
        open_dataset(HRES_PL, variables=["t", "q"])
    with pytest.raises(DataError, match="z_sfc"):  # static z is found under its own key
        open_dataset(STATIC, variables=["z"])


def test_missing_level_names_file_variable_and_level() -> None:
    with pytest.raises(DataError, match=rf"{HRES_PL.name}: variable \w+ has no level 925"):
        open_dataset(HRES_PL, levels=[925])


def _write(ds: xr.Dataset, path: Path) -> Path:
    ds.to_netcdf(path)
    return path


@pytest.mark.parametrize("units", ["m", None])
def test_geopotential_height_is_refused(tmp_path: Path, units: str | None) -> None:
    src = raw(HRES_PL)
    attrs = {**src["z"].attrs, "units": units} if units else {}
    src["z"] = (src["z"] / G).assign_attrs(attrs)
    path = _write(src, tmp_path / "z_in_metres.nc")
    with pytest.raises(DataError, match=r"z_in_metres.nc: variable z \(z\).*geopotential height"):
        open_dataset(path)


def test_static_geopotential_height_is_refused(tmp_path: Path) -> None:
    src = raw(STATIC)
    src["z"] = (src["z"] / G).assign_attrs(units="")  # units blank: caught by magnitude
    path = _write(src, tmp_path / "orography_as_z.nc")
    with pytest.raises(DataError, match=r"orography_as_z.nc: variable z \(z_sfc\).*too small"):
        open_dataset(path)


@pytest.mark.parametrize("units", ["hPa", "Pa"])
def test_msl_in_hectopascal_is_refused(tmp_path: Path, units: str) -> None:
    src = raw(NATL)
    src["msl"] = (src["msl"] / 100).assign_attrs(units=units)  # "Pa" here is a lying label
    path = _write(src, tmp_path / "msl_hpa.nc")
    with pytest.raises(DataError, match=r"msl_hpa.nc: variable msl \(msl\).*(hPa|Pa)"):
        open_dataset(path)


def test_temperature_in_celsius_is_refused(tmp_path: Path) -> None:
    src = raw(LEGACY_T2M[0])
    src["t2m"] = (src["t2m"] - 273.15).assign_attrs(units="degC")
    path = _write(src, tmp_path / "t2m_celsius.nc")
    with pytest.raises(DataError, match=r"t2m_celsius.nc: variable t2m \(2t\).*Celsius"):
        open_dataset(path)


@pytest.mark.parametrize(
    "source", [LEGACY_T2M[0], LEGACY_Z, HRES_PL], ids=["netcdf3-small", "netcdf3-big", "netcdf4"]
)
def test_truncated_file_is_refused(tmp_path: Path, source: Path) -> None:
    data = source.read_bytes()
    path = tmp_path / f"half_{source.name}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"half_{source.name}.*(truncated|corrupt)"):
        open_dataset(path)


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.nc"
    empty.touch()
    with pytest.raises(DataError, match="empty.nc: empty file"):
        open_dataset(empty)
    with pytest.raises(DataError, match="no such file"):
        open_dataset(tmp_path / "absent.nc")


def test_unknown_layouts_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "notes.nc"
    text.write_text("not a netCDF file\n")
    with pytest.raises(DataError, match="notes.nc: unknown layout"):
        open_dataset(text)
    grib = tmp_path / "fields.grib"
    grib.write_bytes(b"GRIB" + bytes(100))
    with pytest.raises(DataError, match="fields.grib: unknown layout: GRIB"):
        open_dataset(grib)
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(DataError, match="folder: unknown layout"):
        open_dataset(folder)
    projected = _write(raw(NATL).rename(latitude="y", longitude="x"), tmp_path / "projected.nc")
    with pytest.raises(DataError, match="projected.nc: unknown layout: no 1-D latitude"):
        open_dataset(projected)
    steps = raw(NATL)[["msl"]].expand_dims(height=[2.0, 10.0])
    extra = _write(steps, tmp_path / "extra_dim.nc")
    expected = "extra_dim.nc: unknown layout: variable msl has dim.*height"
    with pytest.raises(DataError, match=expected):
        open_dataset(extra)


def test_duplicate_times_are_refused(tmp_path: Path) -> None:
    src = raw(LEGACY_T2M[0])
    path = _write(xr.concat([src, src], dim="time"), tmp_path / "twice.nc")
    with pytest.raises(DataError, match="twice.nc: duplicate times.*2021-03-01T12"):
        open_dataset(path)
    copy = tmp_path / "copy.nc"
    copy.write_bytes(LEGACY_T2M[0].read_bytes())
    expected = r"duplicate time 2021-03-01T12:00:00 for variable 2t in .*cds_legacy.*copy.nc"
    with pytest.raises(DataError, match=expected):
        open_dataset([LEGACY_T2M[0], copy])


@pytest.mark.parametrize("kind", ["shuffled", "repeated"])
def test_broken_latitude_is_refused(tmp_path: Path, kind: str) -> None:
    src = raw(NATL)
    lat = src["latitude"].values.copy()
    if kind == "shuffled":
        lat[[1, 2]] = lat[[2, 1]]
    else:
        lat[1] = lat[0]
    path = _write(src.assign_coords(latitude=lat), tmp_path / f"lat_{kind}.nc")
    with pytest.raises(DataError, match=f"lat_{kind}.nc: latitude is not strictly monotonic"):
        open_dataset(path)


def test_repeated_meridian_is_kept_once_or_refused(tmp_path: Path) -> None:
    src = raw(HRES_PL)
    wrap = src.isel(longitude=[0]).assign_coords(longitude=[360.0])
    path = _write(xr.concat([src, wrap], dim="longitude"), tmp_path / "lon_0_to_360.nc")
    xr.testing.assert_equal(open_dataset(path), open_dataset(HRES_PL))
    wrong = wrap.copy(deep=True)
    wrong["t"] = wrong["t"] + 1.0
    bad = _write(xr.concat([src, wrong], dim="longitude"), tmp_path / "lon_360_differs.nc")
    with pytest.raises(DataError, match="lon_360_differs.nc: longitude 0 appears twice"):
        open_dataset(bad)


def test_static_rules(tmp_path: Path) -> None:
    src = raw(WB1)
    times = np.array(["2018-01-01", "2018-01-02"], "datetime64[ns]")
    lsm = src[["lsm"]].expand_dims(time=times).copy(deep=True)
    same = _write(lsm, tmp_path / "lsm_two_times.nc")
    assert open_dataset(same)["lsm"].dims == ("latitude", "longitude")
    lsm["lsm"][1] = lsm["lsm"][1] * 0.5
    varies = _write(lsm, tmp_path / "lsm_varies.nc")
    with pytest.raises(DataError, match="lsm_varies.nc: static variable lsm changes with time"):
        open_dataset(varies)
    timeless = _write(src[["lsm"]].rename(lsm="sst"), tmp_path / "sst_no_time.nc")
    with pytest.raises(DataError, match="sst_no_time.nc: variable sst has no time"):
        open_dataset(timeless)


def test_grids_that_differ_name_both_files() -> None:
    expected = rf"grids differ between .*{HRES_PL.name} and .*{STATIC.name}"
    with pytest.raises(DataError, match=expected):
        open_dataset([HRES_PL, STATIC])


def test_variables_with_different_levels_or_times_are_refused(tmp_path: Path) -> None:
    src = raw(NEWCDS_PL)
    t_all = _write(src[["t"]], tmp_path / "t_all.nc")
    z_850 = _write(src[["z"]].isel(pressure_level=[0]), tmp_path / "z_850.nc")
    z_early = _write(src[["z"]].isel(valid_time=[0, 1]), tmp_path / "z_early.nc")
    with pytest.raises(DataError, match=r"t \(.*t_all.nc\) has levels \[500.0, 850.0\] but z"):
        open_dataset([t_all, z_850])
    both = open_dataset([t_all, z_850], levels=[850])
    xr.testing.assert_equal(both["z"], open_dataset(z_850)["z"])
    with pytest.raises(DataError, match="t_all.nc.*z_early.nc.*cover different times"):
        open_dataset([t_all, z_early])
    first_day = slice("2017-01-01", "2017-01-01T12")
    assert open_dataset([t_all, z_early], time=first_day).sizes["time"] == 2


# ---------------------------------------------------------------------------------------------
# Regridding
# ---------------------------------------------------------------------------------------------


def cell_area_weights(lat: np.ndarray, step: float) -> np.ndarray:
    """Exact sphere area of each latitude band of a regular grid (cells clipped at the poles)."""
    hi = np.deg2rad(np.clip(lat + step / 2, -90, 90))
    lo = np.deg2rad(np.clip(lat - step / 2, -90, 90))
    return np.sin(hi) - np.sin(lo)


def area_mean(da: xr.DataArray, step: float) -> float:
    w = cell_area_weights(da["latitude"].values, step)
    return float((da.mean("longitude") * w).sum() / w.sum())


@pytest.mark.parametrize("path", [HRES_PL, NATL], ids=["global", "regional"])
def test_bilinear_onto_same_grid_is_identity(path: Path) -> None:
    ds = open_dataset(path)
    out = regrid(ds, ds["latitude"].values, ds["longitude"].values, method="bilinear")
    for key in ds.data_vars:
        np.testing.assert_array_equal(out[key].values, ds[key].values)


def test_bilinear_is_periodic_in_longitude() -> None:
    ds = open_dataset(HRES_PL, variables=["t"], levels=[500])
    lon = ds["longitude"].values + 5.0  # 5, 15, ..., 355: the last one lies between 350 and 0
    out = regrid(ds, ds["latitude"].values, lon)
    t = ds["t"].values.astype(np.float64)
    expected = 0.5 * (t + np.roll(t, -1, axis=-1))
    np.testing.assert_allclose(out["t"].values, expected, rtol=1e-6)


def test_bilinear_refuses_targets_outside_a_regional_grid() -> None:
    ds = open_dataset(NATL)
    with pytest.raises(DataError, match="outside the regional source grid"):
        regrid(ds, ds["latitude"].values, np.array([100.0]))
    with pytest.raises(DataError, match="beyond the source"):
        regrid(ds, np.array([0.0]), ds["longitude"].values)


def test_bilinear_fills_poles_of_a_grid_without_pole_rows() -> None:
    ds = open_dataset(WB1)
    lat = np.linspace(90, -90, 33)
    out = regrid(ds, lat, ds["longitude"].values)
    np.testing.assert_array_equal(out["slt"].values[0], ds["slt"].values[0])


def test_conservative_coarsening_of_constant_is_constant() -> None:
    ds = open_dataset(STATIC)
    ds["lsm"] = xr.full_like(ds["lsm"], 0.7)
    out = regrid(ds, np.linspace(90, -90, 181), np.arange(0, 360, 1.0), method="conservative")
    np.testing.assert_allclose(out["lsm"].values, 0.7, rtol=1e-6)
    assert_canonical(out)


@pytest.mark.parametrize(
    ("path", "var", "step", "factor"),
    [(STATIC, "z_sfc", 0.25, 4), (EDA, "t", 3.0, 2), (WB1, "lsm", 5.625, 2)],
    ids=["0.25->1", "3->6", "5.625->11.25"],
)
def test_conservative_coarsening_preserves_area_mean(
    path: Path, var: str, step: float, factor: int
) -> None:
    ds = open_dataset(path, variables=[var])
    lat, lon = ds["latitude"].values, ds["longitude"].values
    new_step = step * factor
    if lat[0] == 90:
        new_lat = np.linspace(90, -90, round(180 / new_step) + 1)
    else:
        new_lat = np.arange(90 - new_step / 2, -90, -new_step)
    new_lon = np.arange(lon[0], 360, new_step)
    out = regrid(ds, new_lat, new_lon, method="conservative")
    src_field = ds[var].isel({d: 0 for d in ds[var].dims if d not in ("latitude", "longitude")})
    out_field = out[var].isel({d: 0 for d in out[var].dims if d not in ("latitude", "longitude")})
    assert area_mean(out_field, new_step) == pytest.approx(area_mean(src_field, step), rel=1e-5)


def test_conservative_is_area_weighted_block_mean_without_poles() -> None:
    ds = open_dataset(WB1, variables=["slt"])
    lat = ds["latitude"].values
    new_lat = lat.reshape(-1, 2).mean(axis=1)
    new_lon = ds["longitude"].values[::2] + 5.625 / 2
    out = regrid(ds, new_lat, new_lon, method="conservative")
    x = ds["slt"].values.astype(np.float64).reshape(16, 2, 32, 2)
    w = cell_area_weights(lat, 5.625).reshape(16, 2)[:, :, None, None]
    expected = (x * w).sum(axis=(1, 3)) / (w.sum(axis=1)[:, :, 0] * 2)
    np.testing.assert_allclose(out["slt"].values, expected, rtol=1e-6)


def test_regridded_static_merges_with_pressure_levels(tmp_path: Path) -> None:
    pl = open_dataset(HRES_PL)
    static = regrid(
        open_dataset(STATIC), pl["latitude"].values, pl["longitude"].values, method="conservative"
    )
    path = tmp_path / "static_10deg.nc"
    static.to_netcdf(path)
    ds = open_dataset([HRES_PL, path])
    assert_canonical(ds)
    groups = aurora_groups(ds)
    assert set(groups["static"]) == {"z", "lsm"} and "z" in groups["atmos"]
    assert ds["z_sfc"].dims == ("latitude", "longitude")
    assert ds["z"].dims == ("time", "level", "latitude", "longitude")
