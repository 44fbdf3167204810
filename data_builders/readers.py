"""Read ERA5 / IFS HRES files of every layout we meet into one canonical `xarray.Dataset`.

Users bring data from the old CDS (int16-packed NETCDF3 from `grib_to_netcdf`), the new CDS
(`valid_time`, `pressure_level`, `expver`, scalar `number`), WeatherBench2 zarr stores (long names,
forecast stores with `prediction_timedelta`), ensemble files, WeatherBench1 static files and our
own CF conversions. Wrong orientation or units ruin training silently, so everything is checked
here, once, and every problem raises `DataError` naming the file and the variable.

The canonical form is described in `open_dataset`.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from aurora.variables import ATMOS_VARS, STATIC_VARS
from aurora.variables import SURF_VARS as SURFACE_VARS
from data_builders.errors import DataError
from data_builders.regrid import regrid

__all__ = [
    "ATMOS_VARS",
    "CATEGORY_CODES",
    "MASKED_VARS",
    "STATIC_KEYS",
    "STATIC_VARS",
    "SURFACE_VARS",
    "DataError",
    "Fill",
    "G",
    "aurora_groups",
    "canonical_lazy",
    "category_of",
    "check_netcdf3_complete",
    "check_units",
    "fill_nans",
    "forecast_lead_dim",
    "handle_nans",
    "indicator_fields",
    "nan_counts",
    "open_dataset",
    "regrid",
    "select_lazy",
    "valid_times",
]

log = logging.getLogger(__name__)

G = 9.80665  # standard gravity, m s**-2: WeatherBench's orography = z_sfc / G
CATEGORY_CODES: dict[str, tuple[int, ...]] = {
    "slt": (0, 1, 2, 3, 4, 5, 6, 7),
    "tvh": (0, 3, 4, 5, 6, 18, 19),
    "tvl": (0, 1, 2, 7, 9, 10, 11, 13, 16, 17),
}
"""ECMWF's categorical invariants (soil type, type of high and of low vegetation; 0: none, e.g.
sea) and the codes ERA5 uses. Aurora 1.5 takes each code as a static indicator field named
``{field}_{code}`` (``slt_3 = (slt == 3)``), which `open_dataset` derives when it is requested."""
# Aurora static name -> dataset key; the ECMWF invariants from `anor` on are Aurora 1.5's.
STATIC_KEYS = {"lsm": "lsm", "slt": "slt", "z": "z_sfc"} | {
    name: name
    for name in ("anor", "isor", "cvh", "cl", "dl", "cvl", "slor", "sdfor", "sdor", "tvh", "tvl")
}
STATIC_KEYS |= {f"{f}_{c}": f"{f}_{c}" for f, codes in CATEGORY_CODES.items() for c in codes}
_INDICATOR = re.compile(r"^(slt|tvh|tvl)_(\d+)$")
_STATIC = frozenset(STATIC_KEYS.values())

PathArg = str | PathLike[str]
Fill = str | float

_WAVE_VARS = (
    *("swh", "mwd", "mwp", "pp1d", "shww", "mdww", "mpww", "shts", "mdts", "mpts"),
    *("swh1", "mwd1", "mwp1", "swh2", "mwd2", "mwp2", "wind", "dwi"),
)
_CAMS_VARS = (
    *("pm1", "pm2p5", "pm10", "tcco", "tc_no", "tcno2", "gtco3", "tcso2"),
    *("co", "no", "no2", "go3", "so2"),
)
_V1P5_SURF_VARS = ("2d", "tcwv", "tcc", "100u", "100v", "sp", "lcc", "mcc", "hcc", "skt")
_V1P5_SURF_VARS += ("stl1", "swvl1", "ci", "i10fg", "blh")
_V1P5_ACCUMULATIONS = {"uvb": "uvb_1h", "ssrd": "ssrd_1h", "ttr": "ttr_1h"}
_V1P5_ACCUMULATIONS |= {"tp": "scaled_tp_1h", "sf": "scaled_sf_1h"}
_NAMES = {
    # ECMWF / CDS short names (and our own output, so canonical files read back unchanged)
    "t2m": "2t",
    "2t": "2t",
    "u10": "10u",
    "10u": "10u",
    "v10": "10v",
    "10v": "10v",
    "msl": "msl",
    "z": "z",
    "t": "t",
    "u": "u",
    "v": "v",
    "q": "q",
    "lsm": "lsm",
    "slt": "slt",
    "z_sfc": "z_sfc",
    # CDS API / WeatherBench2 long names
    "2m_temperature": "2t",
    "10m_u_component_of_wind": "10u",
    "10m_v_component_of_wind": "10v",
    "mean_sea_level_pressure": "msl",
    "geopotential": "z",
    "temperature": "t",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "specific_humidity": "q",
    "land_sea_mask": "lsm",
    "soil_type": "slt",
    "geopotential_at_surface": "z_sfc",
    "relative_humidity": "r",
    "vertical_velocity": "w",
    # HRES-WAM / ERA5 ocean waves (AuroraWave): short names, then the CDS API's long names
    **{name: name for name in (*_WAVE_VARS, "wmb")},
    "significant_height_of_combined_wind_waves_and_swell": "swh",
    "mean_wave_direction": "mwd",
    "mean_wave_period": "mwp",
    "peak_wave_period": "pp1d",
    "significant_height_of_wind_waves": "shww",
    "mean_direction_of_wind_waves": "mdww",
    "mean_period_of_wind_waves": "mpww",
    "significant_height_of_total_swell": "shts",
    "mean_direction_of_total_swell": "mdts",
    "mean_period_of_total_swell": "mpts",
    "significant_wave_height_of_first_swell_partition": "swh1",
    "mean_wave_direction_of_first_swell_partition": "mwd1",
    "mean_wave_period_of_first_swell_partition": "mwp1",
    "significant_wave_height_of_second_swell_partition": "swh2",
    "mean_wave_direction_of_second_swell_partition": "mwd2",
    "mean_wave_period_of_second_swell_partition": "mwp2",
    "ocean_surface_stress_equivalent_10m_neutral_wind_speed": "wind",
    "10m_wind_direction": "dwi",
    "model_bathymetry": "wmb",
    # CAMS global atmospheric composition (AuroraAirPollution): the ADS NetCDF short names, then
    # the ADS API's long names (CAMS' "ozone" and "total_column_ozone" are `go3` and `gtco3`)
    **{name: name for name in _CAMS_VARS},
    "particulate_matter_1um": "pm1",
    "particulate_matter_2.5um": "pm2p5",
    "particulate_matter_10um": "pm10",
    "total_column_carbon_monoxide": "tcco",
    "total_column_nitrogen_monoxide": "tc_no",
    "total_column_nitrogen_dioxide": "tcno2",
    "total_column_ozone": "gtco3",
    "total_column_sulphur_dioxide": "tcso2",
    "carbon_monoxide": "co",
    "nitrogen_monoxide": "no",
    "nitrogen_dioxide": "no2",
    "ozone": "go3",
    "sulphur_dioxide": "so2",
    # ERA5 single levels for Aurora 1.5 (AuroraV1p5): ECMWF short names, the new CDS NetCDF names,
    # then the CDS API's long names. Accumulated fields map to the model's one-hour names: ERA5's
    # hourly accumulations (IFS forecasts accumulate from their start: difference them first).
    # Snow depth, precipitation and snowfall stay physical amounts (m of water equivalent) under
    # the model's `scaled_*` names; AuroraV1p5 log-transforms them itself.
    **{name: name for name in _V1P5_SURF_VARS},
    **{name: name for name in STATIC_KEYS},
    **{name: name for name in _V1P5_ACCUMULATIONS.values()},
    **_V1P5_ACCUMULATIONS,
    "scaled_sd": "scaled_sd",
    "sd": "scaled_sd",
    "d2m": "2d",
    "u100": "100u",
    "v100": "100v",
    "siconc": "ci",
    "2m_dewpoint_temperature": "2d",
    "total_column_water_vapour": "tcwv",
    "total_cloud_cover": "tcc",
    "100m_u_component_of_wind": "100u",
    "100m_v_component_of_wind": "100v",
    "surface_pressure": "sp",
    "low_cloud_cover": "lcc",
    "medium_cloud_cover": "mcc",
    "high_cloud_cover": "hcc",
    "skin_temperature": "skt",
    "soil_temperature_level_1": "stl1",
    "volumetric_soil_water_layer_1": "swvl1",
    "sea_ice_cover": "ci",
    "snow_depth": "scaled_sd",
    "instantaneous_10m_wind_gust": "i10fg",
    "boundary_layer_height": "blh",
    "downward_uv_radiation_at_the_surface": "uvb_1h",
    "surface_solar_radiation_downwards": "ssrd_1h",
    "top_net_thermal_radiation": "ttr_1h",
    "total_precipitation": "scaled_tp_1h",
    "snowfall": "scaled_sf_1h",
    "angle_of_sub_gridscale_orography": "anor",
    "anisotropy_of_sub_gridscale_orography": "isor",
    "high_vegetation_cover": "cvh",
    "lake_cover": "cl",
    "lake_total_depth": "dl",
    "low_vegetation_cover": "cvl",
    "slope_of_sub_gridscale_orography": "slor",
    "standard_deviation_of_filtered_subgrid_orography": "sdfor",
    "standard_deviation_of_orography": "sdor",
    "type_of_high_vegetation": "tvh",
    "type_of_low_vegetation": "tvl",
}
MASKED_VARS = frozenset(_WAVE_VARS)
"""Wave fields, which are NaN over land and where a wave system is absent: their NaNs are kept
(`AuroraWave` masks them), not refused, unless `fill_nan` says how to fill them. The bathymetry
`wmb` is not one of them: a static input must be finite (fill its land with zero)."""
_LAT = ("latitude", "lat")
_LON = ("longitude", "lon")
_LEVEL = ("level", "pressure_level", "isobaricInhPa", "plev")
_MEMBER = ("member", "number", "realization")
_LEAD = ("prediction_timedelta", "step", "lead_time")
_AUX = ("forecast_reference_time", "lead_time")
_CANON_DIMS = ("time", "level", "latitude", "longitude")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def open_dataset(
    paths: PathArg | Sequence[PathArg],
    *,
    variables: Sequence[str] | None = None,
    levels: Sequence[float] | None = None,
    member: int = 0,
    fill_nan: Fill | Mapping[str, Fill] | None = None,
    time: slice | Sequence[Any] | None = None,
    init_time: Any = None,
) -> xr.Dataset:
    """Read one or more files (netCDF or zarr) and return them as one canonical dataset.

    Surface, pressure-level and static files are merged on their common grid; files holding the
    same variables at different times are concatenated along time. Selections are applied
    before data are read, so big stores can be subset; the selected data are loaded into memory.

    Args:
        paths: One path or several (netCDF files, zarr stores).
        variables: Dataset keys (``2t``, ``z``, ``lsm``, ``z_sfc``, ``r`` ...); None: all.
        levels: Pressure levels in hPa to keep; None: all.
        member: Ensemble member label to select in ensemble files (0, the control).
        fill_nan: How to fill NaNs ("zero", "mean", a float, or a mapping from variable key to
            one of those); None: a NaN is an error.
        time: Valid times to keep, a slice or labels; None: all.
        init_time: The initialisation to read from a forecast store whose forecasts overlap.

    Returns:
        xr.Dataset: The canonical dataset:

        * Dimensions ``(time, level, latitude, longitude)`` for atmospheric variables,
          ``(time, latitude, longitude)`` for surface variables, ``(latitude, longitude)`` for
          static ones.
        * ``latitude`` strictly decreasing (90 -> -90; ascending files are flipped), ``longitude``
          ascending in [0, 360) (-180..180 and regional grids are wrapped and sorted, so a
          North-Atlantic file with lon -70..40 becomes 0..40, 290..350), both float64.
        * ``level`` in hPa, float64, ascending (Pa is converted when the level's ``units`` say Pa);
          ``levels=`` selects, it does not reorder.
        * ``time`` is datetime64[ns], strictly increasing, no duplicates.
        * Data variables are float32 in the source's units (checked), named by Aurora: surface
          ``2t 10u 10v msl``, atmospheric ``z u v t q``, static ``lsm slt z``. Other variables keep
          their ECMWF short names (``r``, ``w``, ...); WeatherBench2/CDS long names are mapped.
        * Static variables: ``lsm``, ``slt`` and surface geopotential, i.e. a ``z`` **without a
          level dimension** (also ``geopotential_at_surface``, and WeatherBench1 ``orography`` times
          9.80665). They lose their time dimension (old-CDS static downloads carry one time; several
          times must be identical). Because Aurora's static ``z`` and atmospheric ``z`` share a
          name, the static one is stored under the key ``z_sfc`` (attribute ``aurora_name = "z"``);
          `aurora_groups` returns all three groups keyed by Aurora names.
        * Aurora 1.5's indicator fields ``slt_k``, ``tvh_k``, ``tvl_k`` are static too: when
          requested and not in the files, they are derived from the categorical field (see
          `CATEGORY_CODES` and `indicator_fields`).
        * Forecast stores (dimension ``prediction_timedelta``, ``step`` or ``lead_time`` next to an
          init ``time``) are flattened to valid times: ``time = init + lead``, with the coordinates
          ``forecast_reference_time`` and ``lead_time`` kept along ``time``. If several inits give
          the same valid time that is a duplicate-time error; pass ``init_time=`` to read one
          forecast.
        * Ensemble files (dimension or scalar coordinate ``member``, ``number`` or ``realization``):
          the member whose label equals ``member`` (default 0, the control) is selected.
        * Each variable carries ``nan_count`` (NaNs in the source, before any fill), ``source_file``
          and ``source_name``; ``ds.attrs["nan_counts"]`` summarises them. A NaN is an error naming
          file, variable and times unless ``fill_nan`` says how to fill ("zero", "mean" = mean of
          that 2-D field, a float, or a mapping from variable key to one of those).

    Raises:
        DataError: For anything that cannot be made canonical, naming the file and variable.
    """
    path_list = [Path(paths)] if isinstance(paths, (str, PathLike)) else [Path(p) for p in paths]
    if not path_list:
        raise DataError("open_dataset: no paths given")
    wanted = None if variables is None else list(variables)
    opened: list[xr.Dataset] = []
    try:
        lazy = []
        for path in path_list:
            opened.append(_open_raw(path))
            lazy.append((path, canonical_lazy(opened[-1], path, member, init_time)))
        if wanted is not None:
            _check_requested(wanted, lazy)
        parts = [(p, _select_and_load(d, p, wanted, levels, fill_nan, time)) for p, d in lazy]
    finally:
        for raw in opened:  # everything needed is in memory now
            raw.close()
    ds = _combine([(p, d) for p, d in parts if d.data_vars], path_list)
    return ds if wanted is None else ds[wanted]


def valid_times(
    paths: PathArg | Sequence[PathArg],
    *,
    variables: Sequence[str] | None = None,
    member: int = 0,
    init_time: Any = None,
) -> np.ndarray:
    """The valid times the files hold, read from their metadata only (no data are loaded).

    Builders plan their work with it: which time chunks exist, before reading any of them.

    Args:
        paths: As for `open_dataset`.
        variables: Only files holding one of these keys count; None: every file with times.
        member: As for `open_dataset`.
        init_time: As for `open_dataset`.

    Returns:
        datetime64[ns], sorted, unique: the union over the files.
    """
    path_list = [Path(paths)] if isinstance(paths, (str, PathLike)) else [Path(p) for p in paths]
    wanted = None if variables is None else set(variables)
    found: list[np.ndarray] = []
    for path in path_list:
        raw = _open_raw(path)
        try:
            ds = canonical_lazy(raw, path, member, init_time)
            timed = [
                k
                for k, v in ds.data_vars.items()
                if "time" in v.dims and (wanted is None or k in wanted)
            ]
            if timed:
                found.append(ds["time"].values.astype("datetime64[ns]"))
        finally:
            raw.close()
    if not found:
        return np.array([], "datetime64[ns]")
    return np.unique(np.concatenate(found))


def _check_requested(wanted: list[str], lazy: list[tuple[Path, xr.Dataset]]) -> None:
    """Fail before reading any data when a requested variable is in none of the files."""
    found = {str(k) for _, d in lazy for k in d.data_vars}
    missing = [v for v in wanted if v not in found and category_of(v) not in found]
    if missing:
        names = ", ".join(str(p) for p, _ in lazy)
        hint = ""
        if "z" in missing and "z_sfc" in found:
            hint = " (static surface geopotential is stored as z_sfc)"
        lacking = sorted({f for f in map(category_of, missing) if f is not None})
        if lacking:
            hint += (
                f" (indicator fields are derived from the categorical field(s) {lacking}, "
                "which these files lack)"
            )
        raise DataError(f"{names}: missing variable(s) {missing}; found {sorted(found)}{hint}")


def aurora_groups(ds: xr.Dataset) -> dict[str, dict[str, xr.DataArray]]:
    """Split a canonical dataset into Aurora's surf/atmos/static groups, keyed by Aurora name.

    This is where the ``z_sfc`` key becomes static ``z`` again.

    Args:
        ds: A dataset from `open_dataset`.

    Returns:
        ``{"surf": {name: (time, lat, lon)}, "atmos": {name: (time, level, lat, lon)},
        "static": {name: (lat, lon)}}`` of data arrays.
    """
    groups: dict[str, dict[str, xr.DataArray]] = {"surf": {}, "atmos": {}, "static": {}}
    for key, da in ds.data_vars.items():
        if "time" not in da.dims:
            groups["static"][da.attrs.get("aurora_name", str(key))] = da
        elif "level" in da.dims:
            groups["atmos"][str(key)] = da
        else:
            groups["surf"][str(key)] = da
    return groups


def nan_counts(ds: xr.Dataset) -> dict[str, int]:
    """NaNs found in the source of each variable (before any fill).

    Args:
        ds: A dataset from `open_dataset`.

    Returns:
        Variable key -> number of NaNs.
    """
    return {str(k): int(v.attrs.get("nan_count", 0)) for k, v in ds.data_vars.items()}


# --------------------------------------------------------------------------------------------
# One file
# --------------------------------------------------------------------------------------------


def canonical_lazy(raw: xr.Dataset, path: Path, member: int, init_time: Any) -> xr.Dataset:
    """Canonical names, axes and grid order, still lazy: nothing but metadata is read yet.

    Public, like `select_lazy`, `check_units`, `handle_nans` and `fill_nans`, so that sources
    reading a store piece by piece (`data_builders.zarr_source`) apply the very steps
    `open_dataset` applies and give the same canonical form and the same `DataError` checks.

    Args:
        raw: The store as opened by xarray (lazy).
        path: The file or URL, for error messages.
        member: The ensemble member to select.
        init_time: The init to read from a forecast store (see `open_dataset`).

    Returns:
        The canonical dataset, still lazy (a forecast store with one init stays lazy too).
    """
    ds = _normalise_dims(raw, path, member, init_time)
    ds = _rename_variables(ds, path)
    ds = _fix_grid(ds, path)
    return _make_static(ds, path)


def _select_and_load(
    ds: xr.Dataset,
    path: Path,
    wanted: list[str] | None,
    levels: Sequence[float] | None,
    fill_nan: Fill | Mapping[str, Fill] | None,
    time: slice | Sequence[Any] | None,
) -> xr.Dataset:
    """Subset, read, then check units and NaNs on the values actually read; derive the
    requested indicator fields of categorical ones."""
    read = None if wanted is None else _with_categories(wanted, ds)
    ds = _load(select_lazy(ds, path, read, levels, time), path)
    check_units(ds, path)
    ds = handle_nans(ds, path, fill_nan)
    ds = _finish(ds, path)
    return ds if wanted is None else indicator_fields(ds, wanted)


def category_of(name: str) -> str | None:
    """The categorical field an indicator name such as ``slt_3`` is derived from, else None."""
    match = _INDICATOR.match(name)
    return match.group(1) if match else None


def _with_categories(wanted: list[str], ds: xr.Dataset) -> list[str]:
    """`wanted` plus the categorical fields its indicators are derived from in this file."""
    extra = [
        f
        for v in wanted
        if v not in ds.data_vars and (f := category_of(v)) is not None and f in ds.data_vars
    ]
    return [*wanted, *(f for f in dict.fromkeys(extra) if f not in wanted)]


def indicator_fields(ds: xr.Dataset, wanted: list[str]) -> xr.Dataset:
    """Derive the requested indicator fields ``{field}_{code}`` (1 where the categorical field is
    `code`, else 0) that the file does not hold itself; drop the categorical fields read only
    for them.

    A categorical field regridded by interpolation is no longer integer: it is rounded to the
    nearest code first, which undoes small disturbances (packing, interpolation next to equal
    codes), but a point interpolated between two different codes may round to a third: regrid
    categorical fields by nearest neighbour. A code found nowhere gives a field of zeros.

    Public for streaming sources (see `canonical_lazy`); `ds` must be loaded.
    """
    derived = {}
    for name in wanted:
        field = category_of(name)
        if name in ds.data_vars or field is None or field not in ds.data_vars:
            continue
        source = ds[field]
        code = int(name.rsplit("_", 1)[1])
        hot = (np.rint(source.values) == code).astype(np.float32)
        attrs = {**source.attrs, "aurora_name": name, "units": "(0 - 1)"}
        derived[name] = source.copy(data=hot).assign_attrs(attrs, long_name=f"{field} == {code}")
    unwanted = {category_of(v) for v in derived} - set(wanted)
    return ds.assign(derived).drop_vars(sorted(str(f) for f in unwanted))


def _file_kind(path: Path) -> str:
    """Say how to open `path` ('netcdf' or 'zarr'), refusing anything else with a clear error."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if path.suffix == ".zarr" or any((path / m).exists() for m in (".zgroup", "zarr.json")):
            return "zarr"
        raise DataError(f"{path}: unknown layout: a directory that is not a zarr store")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes)")
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:3] == b"CDF":
        check_netcdf3_complete(path)
        return "netcdf"
    if magic.startswith(b"\x89HDF"):
        return "netcdf"
    if magic.startswith(b"GRIB"):
        raise DataError(f"{path}: unknown layout: GRIB is not read here; convert it with cfgrib")
    raise DataError(f"{path}: unknown layout: not netCDF (classic or HDF5) and not a zarr store")


def check_netcdf3_complete(path: Path) -> None:
    """Detect truncated NETCDF3 files, which netCDF-C reads as if the missing bytes were there.

    scipy's reader maps the data and fails when the file is shorter than its header promises;
    with mmap nothing is read, so the check is cheap even for big old-CDS files.

    Args:
        path: A NETCDF3 (classic or 64-bit offset) file.

    Raises:
        DataError: If the file is shorter than its header says.
    """
    from scipy.io import netcdf_file

    with open(path, "rb") as fh:
        if fh.read(4)[3] not in (1, 2):  # CDF-5 is not understood by scipy; nothing to check
            return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = netcdf_file(path, "r", mmap=True)
            f.variables.clear()
            f.close()
    except Exception as e:  # scipy raises ValueError/TypeError/OSError for bad files
        raise DataError(f"{path}: truncated or corrupt NETCDF3 file ({e})") from e


def _open_raw(path: Path) -> xr.Dataset:
    """Open lazily; netCDF4-C reads both classic and HDF5 files and decodes CF packing."""
    kind = _file_kind(path)
    try:
        if kind == "zarr":
            return xr.open_dataset(
                path,
                engine="zarr",
                chunks=None,
                decode_timedelta=True,
                consolidated=_zarr_consolidated(path),
            )
        return xr.open_dataset(path, engine="netcdf4", decode_timedelta=True)
    except DataError:
        raise
    except Exception as e:  # the backends raise many types for damaged files
        why = f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot open ({why}); truncated or corrupt?") from e


def _zarr_consolidated(path: Path) -> bool:
    """Whether the store has consolidated metadata; asking wrongly costs a warning or an error."""
    if (path / ".zmetadata").exists():
        return True
    meta = path / "zarr.json"
    if meta.exists():
        try:
            return json.loads(meta.read_text()).get("consolidated_metadata") is not None
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable zarr.json ({e})") from e
    return False


def _rename_alias(ds: xr.Dataset, aliases: Sequence[str], canonical: str) -> xr.Dataset:
    """Rename the first present alias (dimension or coordinate) to the canonical name."""
    for name in aliases:
        if name in ds.dims or name in ds.coords:
            return ds if name == canonical else ds.rename({name: canonical})
    return ds


def _normalise_dims(ds: xr.Dataset, path: Path, member: int, init_time: Any) -> xr.Dataset:
    """Bring dimension names and meanings to (time, level, latitude, longitude)."""
    ds = _rename_alias(ds, _LAT, "latitude")
    ds = _rename_alias(ds, _LON, "longitude")
    for axis in ("latitude", "longitude"):
        if axis not in ds.dims or ds[axis].ndim != 1:
            raise DataError(
                f"{path}: unknown layout: no 1-D {axis} dimension (dims {dict(ds.sizes)}); "
                "only regular latitude/longitude grids are supported"
            )
    ds = _select_member(ds, path, member)
    ds = _normalise_time(ds, path, init_time)
    ds = _normalise_level(ds, path)
    ds = _squeeze_extra(ds, path)
    keep = set(ds.dims) | {a for a in _AUX if a in ds.coords and ds[a].dims == ("time",)}
    return ds.drop_vars([c for c in ds.coords if c not in keep])


def _select_member(ds: xr.Dataset, path: Path, member: int) -> xr.Dataset:
    """Pick one ensemble member by its label; a scalar member label must match too."""
    for name in _MEMBER:
        if name in ds.dims:
            labels = ds[name].values if name in ds.coords else np.arange(ds.sizes[name])
            if member not in labels:
                raise DataError(f"{path}: member {member} not in {name} {list(labels)}")
            return ds.isel({name: int(np.flatnonzero(labels == member)[0])}, drop=True)
        if name in ds.coords and ds[name].ndim == 0:
            if int(ds[name].values) != member:
                raise DataError(
                    f"{path}: holds only member {int(ds[name].values)} ({name}), not {member}"
                )
            return ds.drop_vars(name)
    return ds


def _normalise_time(ds: xr.Dataset, path: Path, init_time: Any) -> xr.Dataset:
    """Make `time` the valid-time dimension: new-CDS `valid_time`, forecasts, scalar times."""
    lead = next((d for d in _LEAD if d in ds.dims), None)
    if lead is not None:
        return _flatten_forecast(ds, path, lead, init_time)
    if init_time is not None:
        raise DataError(f"{path}: init_time given but the file is not a forecast store")
    if "valid_time" in ds.dims or ("valid_time" in ds.coords and "time" not in ds.dims):
        if "time" in ds.coords:
            ds = ds.rename({"time": "forecast_reference_time"})
        ds = ds.rename({"valid_time": "time"})
    if "time" in ds.coords and "time" not in ds.dims:
        ds = ds.expand_dims("time")
    if "time" not in ds.dims:
        return ds
    return _check_times(ds, path)


def _check_times(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """datetime64[ns], sorted, unique: later steps and the pipeline index by timestamp."""
    values = ds["time"].values
    if not np.issubdtype(values.dtype, np.datetime64):
        raise DataError(f"{path}: time could not be decoded as dates (dtype {values.dtype})")
    values = values.astype("datetime64[ns]")
    uniq, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise DataError(f"{path}: duplicate times {[str(t) for t in uniq[counts > 1][:5]]}")
    ds = ds.assign_coords(time=("time", values, ds["time"].attrs))
    return ds if np.all(np.diff(values) > np.timedelta64(0)) else ds.sortby("time")


def forecast_lead_dim(ds: xr.Dataset) -> str | None:
    """The lead-time dimension of a forecast store (``prediction_timedelta``, ``step``,
    ``lead_time``), or None for analyses.

    Public so that a streaming source can refuse, before reading anything, a forecast store it
    could only flatten by loading it (several inits and no ``init_time``).
    """
    return next((d for d in _LEAD if d in ds.dims), None)


def _flatten_forecast(ds: xr.Dataset, path: Path, lead: str, init_time: Any) -> xr.Dataset:
    """(init time, lead) -> valid time, keeping init and lead as coordinates along time."""
    if "time" in ds.coords and "time" not in ds.dims:
        ds = ds.expand_dims("time")
    if "time" not in ds.dims:
        raise DataError(f"{path}: unknown layout: forecast dimension {lead!r} without init time")
    if init_time is not None:
        t0 = np.datetime64(init_time, "ns")
        inits = ds["time"].values.astype("datetime64[ns]")
        if t0 not in inits:
            raise DataError(f"{path}: init_time {t0} not in {[str(t) for t in inits]}")
        ds = ds.isel(time=[int(np.flatnonzero(inits == t0)[0])])
    ds = ds.drop_vars([c for c in ("valid_time",) if c in ds.coords])
    timed = [v for v in ds.data_vars.values() if "time" in v.dims]
    one_init = ds.sizes["time"] == 1 and all(lead in v.dims for v in timed)
    if one_init and np.unique(ds[lead].values).size == ds.sizes[lead]:
        return _one_forecast(ds, lead)
    st = ds.stack(_fc=("time", lead)).reset_index("_fc")
    init = st["time"].values.astype("datetime64[ns]")
    step = st[lead].values.astype("timedelta64[ns]")
    st = st.drop_vars(["time", lead]).rename({"_fc": "time"})
    st = st.assign_coords(
        time=("time", init + step), forecast_reference_time=("time", init), lead_time=("time", step)
    )
    values = st["time"].values
    uniq, counts = np.unique(values, return_counts=True)
    if np.any(counts > 1):
        raise DataError(
            f"{path}: duplicate valid times {[str(t) for t in uniq[counts > 1][:5]]} from "
            "overlapping forecasts; pass init_time= to read one forecast"
        )
    return st.sortby("time")


def _one_forecast(ds: xr.Dataset, lead: str) -> xr.Dataset:
    """One init: its lead axis becomes the valid-time axis, by renaming, so nothing is read
    (`stack` would load the data, which a streaming source must not)."""
    init = ds["time"].values.astype("datetime64[ns]")[0]
    step = ds[lead].values.astype("timedelta64[ns]")
    one = ds.isel(time=0, drop=True).rename({lead: "time"})
    one = one.assign_coords(
        time=("time", init + step),
        forecast_reference_time=("time", np.full(step.shape, init)),
        lead_time=("time", step),
    )
    return one if np.all(np.diff(step) > np.timedelta64(0)) else one.sortby("time")


def _normalise_level(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Rename the pressure axis to `level` and express it in hPa as float64."""
    ds = _rename_alias(ds, _LEVEL, "level")
    if "level" not in ds.coords and "level" not in ds.dims:
        return ds
    if "level" not in ds.dims:  # one level stored as a scalar: keep it a dimension
        ds = ds.expand_dims("level")
    if "level" not in ds.coords:
        raise DataError(f"{path}: level dimension without level values")
    values = ds["level"].values.astype(np.float64)
    units = str(ds["level"].attrs.get("units", "")).strip().lower()
    if units in ("pa", "pascal", "pascals"):
        values = values / 100.0
    elif units in ("hpa", "mbar", "millibars", "millibar", "mb", "hectopascal", "hectopascals") or (
        units == "" and values.max() <= 1100
    ):
        pass
    else:
        raise DataError(
            f"{path}: level units {units or '(none)'!r} with values "
            f"{values.min():g}..{values.max():g}; expected hPa, or Pa stated in the units attribute"
        )
    attrs = {"units": "hPa", "long_name": "pressure level"}
    return ds.assign_coords(level=("level", values, attrs))


def _squeeze_extra(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Drop length-1 dimensions we do not know; longer ones mean a layout we cannot read."""
    for dim in [d for d in ds.dims if d not in _CANON_DIMS]:
        if ds.sizes[dim] != 1:
            var = next((str(v) for v in ds.data_vars if dim in ds[v].dims), "?")
            raise DataError(
                f"{path}: unknown layout: variable {var} has dimension {dim!r} "
                f"(size {ds.sizes[dim]}) besides time/level/latitude/longitude"
            )
        ds = ds.isel({dim: 0}, drop=True)
    return ds


def _rename_variables(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Aurora names; static surface geopotential becomes `z_sfc`; grid-less variables go."""
    out: dict[str, xr.DataArray] = {}
    for name, da in ds.data_vars.items():
        name = str(name)
        if not {"latitude", "longitude"} <= set(da.dims):
            log.debug("%s: skipping %s (no latitude/longitude)", path, name)
            continue
        key, da = _canonical_variable(name, da, path)
        if key in out:
            src = out[key].attrs["source_name"]
            raise DataError(f"{path}: variables {src} and {name} both map to {key}")
        out[key] = da.assign_attrs(source_name=name, source_file=str(path))
    if not out:
        raise DataError(f"{path}: unknown layout: no variable on a latitude/longitude grid")
    return xr.Dataset(out, attrs=dict(ds.attrs))


def _canonical_variable(name: str, da: xr.DataArray, path: Path) -> tuple[str, xr.DataArray]:
    """Name (and, for WeatherBench1 orography, value) of one variable in canonical form."""
    if name == "orography":
        units = str(da.attrs.get("units", "m")).strip()
        if units not in ("m", "metres", "meters"):
            raise DataError(f"{path}: variable orography has units {units!r}; expected m")
        attrs = {**da.attrs, "units": "m**2 s**-2", "long_name": "surface geopotential"}
        attrs["comment"] = "z_sfc = 9.80665 * orography (WeatherBench orography = z / g)"
        return "z_sfc", (da * G).assign_attrs(attrs)
    key = _NAMES.get(name, _NAMES.get(name.lower(), name))
    if key == "z" and "level" not in da.dims:
        key = "z_sfc"
    return key, da


def _fix_grid(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Latitude strictly decreasing, longitude ascending in [0, 360); refuse the unfixable."""
    lat = ds["latitude"].values.astype(np.float64)
    if np.any(np.abs(lat) > 90 + 1e-6):
        raise DataError(f"{path}: latitude outside [-90, 90] ({lat.min():g}..{lat.max():g})")
    d = np.diff(lat)
    if lat.size > 1 and not (np.all(d < 0) or np.all(d > 0)):
        raise DataError(f"{path}: latitude is not strictly monotonic (repeated or out of order)")
    if lat.size > 1 and d[0] > 0:
        ds = ds.isel(latitude=slice(None, None, -1))
    lon = ds["longitude"].values.astype(np.float64)
    d = np.diff(lon)
    if lon.size > 1 and not (np.all(d < 0) or np.all(d > 0)):
        raise DataError(f"{path}: longitude is not strictly monotonic (repeated or out of order)")
    wrapped = np.mod(lon, 360.0)
    order = np.argsort(wrapped, kind="stable")
    if np.any(np.diff(wrapped[order]) < 1e-9):
        ds, order = _drop_duplicate_meridian(ds, path, wrapped, order)
    ds = ds.isel(longitude=order)
    lat_attrs = {"units": "degrees_north", "standard_name": "latitude"}
    lon_attrs = {"units": "degrees_east", "standard_name": "longitude"}
    lat = ds["latitude"].values.astype(np.float64)
    lon = np.mod(ds["longitude"].values.astype(np.float64), 360.0)
    return ds.assign_coords(
        latitude=("latitude", lat, lat_attrs), longitude=("longitude", lon, lon_attrs)
    )


def _drop_duplicate_meridian(
    ds: xr.Dataset, path: Path, wrapped: np.ndarray, order: np.ndarray
) -> tuple[xr.Dataset, np.ndarray]:
    """A grid holding both 0 and 360 (or -180 and 180) repeats one meridian: keep it once."""
    s = wrapped[order]
    dup = np.flatnonzero(np.diff(s) < 1e-9)
    for i in dup:
        a = ds.isel(longitude=int(order[i])).load()
        b = ds.isel(longitude=int(order[i + 1])).load()
        if not all(np.array_equal(a[v].values, b[v].values, equal_nan=True) for v in ds.data_vars):
            raise DataError(f"{path}: longitude {s[i]:g} appears twice with different values")
    return ds, np.delete(order, dup + 1)


def _make_static(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Drop the time dimension of static fields; every other variable must have one."""
    out = {}
    for key, da in ds.data_vars.items():
        if key in _STATIC:
            da = _static_field(str(key), da, path)
        elif "time" not in da.dims:
            raise DataError(
                f"{path}: variable {key} has no time; only lsm, slt and z without a level "
                "dimension are static"
            )
        out[key] = da
    return xr.Dataset(out, attrs=ds.attrs)


def _static_field(key: str, da: xr.DataArray, path: Path) -> xr.DataArray:
    """One time slice of a static field; several times are accepted only if identical."""
    aurora = {v: k for k, v in STATIC_KEYS.items()}[key]
    da = da.assign_attrs(aurora_name=aurora)
    if "level" in da.dims:
        raise DataError(f"{path}: static variable {key} has a level dimension")
    if "time" not in da.dims:
        return da
    first = da.isel(time=0, drop=True)
    if da.sizes["time"] > 1:
        values = da.values
        if not all(np.array_equal(values[0], v, equal_nan=True) for v in values[1:]):
            hint = " (a single-level z should keep its level dimension)" if key == "z_sfc" else ""
            raise DataError(f"{path}: static variable {key} changes with time{hint}")
    return first.drop_vars([c for c in first.coords if c not in first.dims])


def select_lazy(
    ds: xr.Dataset,
    path: Path,
    wanted: list[str] | None,
    levels: Sequence[float] | None,
    time: slice | Sequence[Any] | None,
) -> xr.Dataset:
    """Subset variables, levels (ascending) and times before any data are read.

    Public for streaming sources (see `canonical_lazy`).
    """
    if wanted is not None:
        ds = ds[[v for v in ds.data_vars if v in wanted]]
    if levels is not None and "level" in ds.dims:
        have = ds["level"].values
        idx = []
        for lev in levels:
            hit = np.flatnonzero(np.isclose(have, float(lev)))
            if hit.size == 0:
                var = next(str(v) for v in ds.data_vars if "level" in ds[v].dims)
                raise DataError(
                    f"{path}: variable {var} has no level {lev:g} hPa (has {_floats(have)})"
                )
            idx.append(int(hit[0]))
        ds = ds.isel(level=sorted(idx, key=lambda i: have[i]))
    if time is not None and "time" in ds.dims:
        ds = ds.sel(time=time)
        timed = [v for v in ds.data_vars if "time" in ds[v].dims]
        if ds.sizes["time"] == 0:
            log.info("%s: no times selected; dropping %s", path, timed)
            ds = ds.drop_vars(timed).drop_dims("time")
    if "level" in ds.dims:
        ds = ds.sortby("level")
    return ds


def _load(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """Read the selected data; backends fail in many ways on damaged files."""
    try:
        return ds.load()
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        raise DataError(f"{path}: cannot read data ({why}); truncated or corrupt?") from e


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------

_UNITS = {  # key -> (accepted normalised units, how they are written)
    "2t": ({"k", "kelvin"}, "K"),
    "t": ({"k", "kelvin"}, "K"),
    "10u": ({"ms-1"}, "m s**-1"),
    "10v": ({"ms-1"}, "m s**-1"),
    "u": ({"ms-1"}, "m s**-1"),
    "v": ({"ms-1"}, "m s**-1"),
    "msl": ({"pa", "pascal", "pascals"}, "Pa"),
    "z": ({"m2s-2"}, "m**2 s**-2"),
    "z_sfc": ({"m2s-2"}, "m**2 s**-2"),
    "q": ({"kgkg-1", "1", "dimensionless"}, "kg kg**-1"),
    "lsm": ({"(0-1)", "0-1", "1", "", "~", "dimensionless", "fraction"}, "(0 - 1)"),
}
_HINTS = {
    "z": ({"m", "gpm", "m2"}, "geopotential height, not geopotential: multiply by 9.80665"),
    "z_sfc": ({"m", "gpm"}, "geopotential height, not geopotential: multiply by 9.80665"),
    "msl": ({"hpa", "mbar", "mb", "millibars"}, "hPa, not Pa: multiply by 100"),
    "2t": ({"degc", "c", "celsius", "°c", "degreesc"}, "degrees Celsius, not K: add 273.15"),
    "t": ({"degc", "c", "celsius", "°c", "degreesc"}, "degrees Celsius, not K: add 273.15"),
    "q": ({"gkg-1"}, "g/kg, not kg/kg: divide by 1000"),
}


def _normalise_units(units: str) -> str:
    """'m**2 s**-2', 'm^2 s^-2', 'm2/s2' -> 'm2s-2' so spellings compare equal."""
    u = units.strip().lower().replace("**", "").replace("^", "").replace(" ", "")
    return re.sub(r"/([a-z]+)(\d*)", lambda m: f"{m.group(1)}-{m.group(2) or 1}", u)


def check_units(ds: xr.Dataset, path: Path) -> None:
    """Refuse wrong units, by the units attribute and by magnitude (the attribute can lie).

    Public for streaming sources (see `canonical_lazy`); the magnitude check reads the first
    time of each variable.
    """
    for key, da in ds.data_vars.items():
        key = str(key)
        if key in _UNITS and str(da.attrs.get("units", "")).strip():  # blank = unknown
            _check_units_attr(key, str(da.attrs["units"]), path, da.attrs.get("source_name", key))
        _check_magnitude(key, da, path)


def _check_units_attr(key: str, units: str, path: Path, source: str) -> None:
    accepted, expected = _UNITS[key]
    norm = _normalise_units(units)
    if norm in accepted:
        return
    bad, hint = _HINTS.get(key, (set(), ""))
    why = f" ({hint})" if norm in bad else ""
    raise DataError(
        f"{path}: variable {source} ({key}) has units {units!r}; expected {expected}{why}"
    )


def _field(da: xr.DataArray) -> np.ndarray:
    """The first time step: enough for a magnitude check, cheap on long files."""
    return da.isel(time=0).values if "time" in da.dims else da.values


def _std_geopotential(p_hpa: float) -> float:
    """Geopotential of a pressure level in the ICAO standard atmosphere (m**2 s**-2)."""
    if p_hpa >= 226.32:
        h = 44330.8 * (1 - (p_hpa / 1013.25) ** 0.190263)
    else:
        h = 11000.0 + 6341.6 * np.log(226.32 / p_hpa)
    return G * h


def _check_magnitude(key: str, da: xr.DataArray, path: Path) -> None:
    """Typical values per variable; catches units that are missing or mislabelled."""
    src = da.attrs.get("source_name", key)
    x = _field(da)
    if np.all(np.isnan(x)):
        return
    med, lo, hi = float(np.nanmedian(x)), float(np.nanmin(x)), float(np.nanmax(x))
    problem = None
    if key in ("2t", "t") and not 150 <= med <= 350:
        problem = f"median {med:g} is not a temperature in K"
    elif key == "msl" and not 80000 <= med <= 110000:
        hpa = " (hPa?)" if 800 <= med <= 1100 else ""
        problem = f"median {med:g} is not a pressure in Pa{hpa}"
    elif key == "q" and hi > 0.1:
        problem = f"maximum {hi:g} is not a specific humidity in kg kg**-1 (g/kg?)"
    elif key == "lsm" and (lo < -1e-3 or hi > 1 + 1e-3):
        problem = f"range {lo:g}..{hi:g} is not a 0-1 fraction"
    elif key == "z":
        problem = _z_levels_problem(da)
    elif key == "z_sfc" and _is_global(da) and hi < 20000:
        problem = f"maximum {hi:g} is too small for surface geopotential (height in m?)"
    if problem:
        raise DataError(f"{path}: variable {src} ({key}): {problem}")


def _z_levels_problem(da: xr.DataArray) -> str | None:
    """Compare z with the standard atmosphere on levels <= 925 hPa (1000 hPa is too noisy)."""
    x = _field(da)
    for i, p in enumerate(da["level"].values):
        if p > 925 or np.all(np.isnan(x[i])):
            continue
        ratio = float(np.nanmedian(x[i])) / _std_geopotential(float(p))
        if not 0.5 <= ratio <= 2.0:
            what = " (geopotential height in m? multiply by 9.80665)" if 0.05 < ratio < 0.2 else ""
            return f"at {p:g} hPa the median is {ratio:.3g} x the standard geopotential{what}"
    return None


def _is_global(da: xr.DataArray) -> bool:
    lat, lon = da["latitude"].values, da["longitude"].values
    return bool(np.ptp(lat) >= 120 and np.ptp(lon) >= 300)


# --------------------------------------------------------------------------------------------
# NaNs
# --------------------------------------------------------------------------------------------


def handle_nans(
    ds: xr.Dataset, path: Path, fill_nan: Fill | Mapping[str, Fill] | None
) -> xr.Dataset:
    """Count NaNs per variable; refuse them unless `fill_nan` says how to fill (or the variable
    is one of `MASKED_VARS`, whose NaNs are kept).

    Public for streaming sources (see `canonical_lazy`); `ds` must be loaded.
    """
    out = {}
    for key, da in ds.data_vars.items():
        key = str(key)
        values = da.values
        n = int(np.isnan(values).sum())
        how = fill_nan.get(key) if isinstance(fill_nan, Mapping) else fill_nan
        attrs = {**da.attrs, "nan_count": n}
        if n and not (how is None and key in MASKED_VARS):
            if how is None:
                raise DataError(
                    f"{path}: variable {da.attrs.get('source_name', key)} ({key}) "
                    f"has {n} NaN values{_nan_where(da)}; pass fill_nan= to fill them"
                )
            values = fill_nans(values, how, path, key)
            attrs["nan_fill"] = str(how)
            log.warning("%s: %s: filled %d NaNs with %s", path, key, n, how)
        out[key] = da.copy(data=values).assign_attrs(attrs)
    return xr.Dataset(out, attrs=ds.attrs)


def _nan_where(da: xr.DataArray) -> str:
    """Times holding NaNs, for the error message."""
    if "time" not in da.dims:
        return " (static field)"
    isnan = np.isnan(da.transpose("time", ...).values)
    bad = isnan.reshape(isnan.shape[0], -1).any(axis=1)
    times = [str(t)[:19] for t in da["time"].values[bad]]
    more = f" and {len(times) - 5} more" if len(times) > 5 else ""
    return f" at time(s) {', '.join(times[:5])}{more}"


def fill_nans(values: np.ndarray, how: Fill, path: Path, key: str) -> np.ndarray:
    """Fill NaNs: 'zero', 'mean' (of each 2-D latitude/longitude field) or a number.

    Public so that a source filling one time at a time (`data_builders.zarr_source`) fills
    exactly as `open_dataset(fill_nan=...)` does.

    Args:
        values: The data, latitude and longitude last.
        how: ``"zero"``, ``"mean"`` or a number.
        path: The file or URL, for error messages.
        key: The variable, for error messages.

    Returns:
        A filled copy of `values`.
    """
    values = values.copy()
    mask = np.isnan(values)
    if how == "zero":
        values[mask] = 0.0
    elif how == "mean":
        fields = values.reshape(-1, *values.shape[-2:])
        for f in fields:
            if np.all(np.isnan(f)):
                raise DataError(f"{path}: variable {key}: a field is all NaN; no mean to fill")
            f[np.isnan(f)] = np.nanmean(f)
        values = fields.reshape(values.shape)
    elif isinstance(how, (int, float)) and not isinstance(how, bool):
        values[mask] = float(how)
    else:
        raise DataError(f"{path}: variable {key}: fill_nan={how!r}; use 'zero', 'mean' or a number")
    return values


def _finish(ds: xr.Dataset, path: Path) -> xr.Dataset:
    """float32, canonical dimension order."""
    out = {}
    for key, da in ds.data_vars.items():
        dims = [d for d in _CANON_DIMS if d in da.dims]
        out[key] = da.transpose(*dims).astype(np.float32)
    res = xr.Dataset(out, attrs=ds.attrs)
    res.attrs["source_file"] = str(path)
    return res


# --------------------------------------------------------------------------------------------
# Combining files
# --------------------------------------------------------------------------------------------


def _combine(parts: list[tuple[Path, xr.Dataset]], paths: list[Path]) -> xr.Dataset:
    """Merge per-file datasets: same grid, no duplicate (variable, time), same levels."""
    if not parts:
        names = ", ".join(str(p) for p in paths)
        raise DataError(f"{names}: no data left after selecting variables and times")
    first_path, first = parts[0]
    parts = [(p, _same_grid(first_path, first, p, d)) for p, d in parts]
    by_var: dict[str, list[tuple[Path, xr.DataArray]]] = {}
    for path, ds in parts:
        for key, da in ds.data_vars.items():
            by_var.setdefault(str(key), []).append((path, da))
    arrays = {key: _concat_var(key, items) for key, items in by_var.items()}
    _check_common(arrays, by_var)
    ds = _merge(arrays)
    ds.attrs = _common_attrs([d.attrs for _, d in parts])
    ds.attrs.pop("source_file", None)
    ds.attrs["source_files"] = "; ".join(str(p) for p, _ in parts)
    ds.attrs["nan_counts"] = ", ".join(f"{k}={v}" for k, v in nan_counts(ds).items())
    return ds


def _same_grid(p0: Path, d0: xr.Dataset, p: Path, d: xr.Dataset) -> xr.Dataset:
    """Files must share the grid exactly (to 1e-6 degrees); then they share coordinate values."""
    for axis in ("latitude", "longitude"):
        a, b = d0[axis].values, d[axis].values
        if a.shape != b.shape or not np.allclose(a, b, rtol=0, atol=1e-6):
            raise DataError(
                f"grids differ between {p0} and {p}: {axis} {_describe(a)} vs {_describe(b)}; "
                "regrid one of them first (data_builders.readers.regrid)"
            )
    return d.assign_coords(latitude=d0["latitude"], longitude=d0["longitude"])


def _describe(x: np.ndarray) -> str:
    return f"{x.size} points {x[0]:g}..{x[-1]:g}" if x.size else "empty"


def _concat_var(key: str, items: list[tuple[Path, xr.DataArray]]) -> xr.DataArray:
    """One variable from several files: concatenated along time, overlaps refused."""
    if len(items) == 1:
        return items[0][1]
    if "time" not in items[0][1].dims:
        files = " and ".join(str(p) for p, _ in items)
        raise DataError(f"static variable {key} is in both {files}")
    seen: dict[np.datetime64, Path] = {}
    for path, da in items:
        for t in da["time"].values:
            if t in seen:
                raise DataError(
                    f"duplicate time {str(t)[:19]} for variable {key} in {seen[t]} and {path}"
                )
            seen[t] = path
    arrays = _drop_uneven_aux([da for _, da in items])
    out = xr.concat(arrays, dim="time", combine_attrs="override").sortby("time")
    out.attrs["source_file"] = "; ".join(str(p) for p, _ in items)
    out.attrs["nan_count"] = sum(int(da.attrs.get("nan_count", 0)) for _, da in items)
    return out


def _drop_uneven_aux(arrays: list[xr.DataArray]) -> list[xr.DataArray]:
    """Keep forecast_reference_time / lead_time only where every piece has them."""
    drop = [a for a in _AUX if not all(a in x.coords for x in arrays)]
    return [x.drop_vars([a for a in drop if a in x.coords]) for x in arrays]


def _check_common(
    arrays: dict[str, xr.DataArray], by_var: dict[str, list[tuple[Path, Any]]]
) -> None:
    """All time-dependent variables share the times, all atmospheric ones the levels.

    Merging unequal axes would pad with NaN, which the model would then read as data.
    """

    def files(k: str) -> str:
        return ", ".join(str(p) for p, _ in by_var[k])

    timed = [k for k, a in arrays.items() if "time" in a.dims]
    for k in timed[1:]:
        a, b = arrays[timed[0]]["time"].values, arrays[k]["time"].values
        if not np.array_equal(a, b):
            only = np.setxor1d(a, b)
            raise DataError(
                f"variables {timed[0]} ({files(timed[0])}) and {k} ({files(k)}) cover different "
                f"times (e.g. {str(only[0])[:19]}); select common times with time="
            )
    levelled = [k for k, a in arrays.items() if "level" in a.dims]
    for k in levelled[1:]:
        a, b = arrays[levelled[0]]["level"].values, arrays[k]["level"].values
        if not np.array_equal(a, b):
            raise DataError(
                f"variable {levelled[0]} ({files(levelled[0])}) has levels {_floats(a)} but {k} "
                f"({files(k)}) has {_floats(b)}; select common levels with levels="
            )


def _merge(arrays: dict[str, xr.DataArray]) -> xr.Dataset:
    """Merge variables; aux forecast coordinates that disagree between files are dropped."""
    try:
        return xr.merge([a.to_dataset(name=k) for k, a in arrays.items()], combine_attrs="override")
    except xr.MergeError:
        log.warning("forecast_reference_time/lead_time differ between files; dropping them")
        clean = {k: a.drop_vars([c for c in _AUX if c in a.coords]) for k, a in arrays.items()}
        return xr.merge([a.to_dataset(name=k) for k, a in clean.items()], combine_attrs="override")


def _common_attrs(attrs: list[dict[str, Any]]) -> dict[str, Any]:
    """Global attributes every file agrees on (provenance of a single file is kept whole)."""
    out = dict(attrs[0])
    for a in attrs[1:]:
        out = {k: v for k, v in out.items() if k in a and np.array_equal(a[k], v)}
    return out


def _floats(x: np.ndarray) -> list[float]:
    """Plain floats, so messages read [500.0, 850.0] rather than numpy reprs."""
    return [float(v) for v in x]
