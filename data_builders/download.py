"""Download ERA5 from the Copernicus CDS and WeatherBench2 / IFS HRES zarr stores, resumably.

Training data is big (a month of 0.25 deg ERA5 on 13 levels is ~30 GB) and comes from services
that time out, queue for hours or drop connections. So every download here is planned first
(``--dry-run`` prints the plan and touches nothing), split into pieces that can fail alone, and
resumable: rerunning the same command skips what is already complete and redoes what is not.
The files written are exactly what `data_builders.readers.open_dataset` reads.

Commands (``python -m data_builders.download COMMAND --help`` for every option)::

    # ERA5 from the CDS (needs ~/.cdsapirc): one netCDF per month and variable group
    python -m data_builders.download era5 --out data/era5 --start 2020-01-01 --end 2020-03-31 \\
        --variables 2t 10u 10v msl z u v t q --levels 50 100 150 200 250 300 400 500 600 700 \\
        850 925 1000 --hours 00 06 12 18 --grid 0.25 [--area 90 0 -90 360] [--dry-run]

    # IFS HRES T0 (or WeatherBench2 ERA5: --source era5, or any zarr URL / path) to a local zarr
    python -m data_builders.download hres --out data/hres.zarr \\
        --start 2020-01-01 --end 2020-01-31 --variables 2t msl z t --levels 500 850 \\
        --stride 2 [--source URL] [--dry-run]

    # static fields (lsm, z, slt) from the CDS or from a WeatherBench2 store
    python -m data_builders.download static --out data/static --grid 0.25    # CDS
    python -m data_builders.download static --out data/static --source era5  # WB2 store's grid

ERA5 (``era5``): requests go through `cdsapi` (the client object can be injected), one per month
and variable group -- ``surface`` (reanalysis-era5-single-levels), ``pressure``
(reanalysis-era5-pressure-levels) -- plus one ``static`` request (single levels, one time) --
written to ``OUT/era5_{group}_{YYYY-MM}.nc`` and ``OUT/era5_static.nc``. A file is complete when
xarray opens it and it holds every requested variable, level and time; complete files are skipped,
anything else (unreadable, truncated, missing times) is downloaded again. Downloads go to
``<target>.part`` and are renamed into place only after they pass the same check, so an
interrupted run never leaves a final file that looks complete.

Zarr stores (``hres``, ``wb2``, ``static --source <store>``): the store is opened lazily with
xarray + fsspec (``https://``/``http://`` need `aiohttp`, ``gs://`` needs `gcsfs`; local paths need
neither); variables, levels, a time range, hours and a stride are selected, and the subset is
written to a local zarr (v2, consolidated, one time per chunk) in blocks of ``--chunk-times``
times. The first block goes to ``<out>.part`` and is renamed; later blocks are appended, and
before each append a small journal ``<out>.journal.json`` records how many times are committed,
so an append cut short is truncated back on the next run. Times already in the output are never
fetched again. Variables keep the source's names (WeatherBench2 long names, which
`readers.open_dataset` maps to Aurora's).

Problems a user can fix (unknown variable, level not in the source, times outside the store,
a file the CDS returned without a requested variable) raise `DataError` naming the request and
the variable.
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xarray as xr

from aurora.variables import ATMOS_VARS as DEFAULT_ATMOS
from aurora.variables import AURORA_LEVELS
from aurora.variables import STATIC_VARS as DEFAULT_STATIC
from aurora.variables import SURF_VARS as DEFAULT_SURFACE
from data_builders.errors import DataError
from data_builders.readers import check_netcdf3_complete

__all__ = [
    "AURORA_LEVELS",
    "ERA5_LEVELS",
    "WB2_STORES",
    "CdsClient",
    "CdsRequest",
    "DataError",
    "ZarrPlan",
    "cds_file_problem",
    "download_era5",
    "download_static",
    "download_zarr",
    "main",
    "month_spans",
    "open_store",
    "plan_era5",
    "plan_era5_static",
    "plan_zarr",
    "request_status",
    "resolve_source",
    "retrieve",
    "run_cds_requests",
    "run_zarr_plan",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------

ERA5_SINGLE = "reanalysis-era5-single-levels"
ERA5_PRESSURE = "reanalysis-era5-pressure-levels"
ERA5_LEVELS = (
    1,
    2,
    3,
    5,
    7,
    10,
    20,
    30,
    50,
    70,
    100,
    125,
    150,
    175,
    200,
    225,
    250,
    300,
    350,
    400,
    450,
    500,
    550,
    600,
    650,
    700,
    750,
    775,
    800,
    825,
    850,
    875,
    900,
    925,
    950,
    975,
    1000,
)
DEFAULT_HOURS = (0, 6, 12, 18)

# Public WeatherBench2 stores (0.25 deg, 13 levels, 6-hourly), over HTTPS so that only aiohttp is
# needed; the same objects are gs://weatherbench2/datasets/... for gcsfs users.
_WB2 = "https://storage.googleapis.com/weatherbench2/datasets"
WB2_ERA5_URL = f"{_WB2}/era5/1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr"
WB2_HRES_T0_URL = f"{_WB2}/hres_t0/2016-2022-6h-1440x721.zarr"
WB2_STORES = {"era5": WB2_ERA5_URL, "hres_t0": WB2_HRES_T0_URL}


@dataclass(frozen=True)
class _Var:
    """One variable as each source names it."""

    cds: str  # CDS API long name
    wb2: str  # WeatherBench2 zarr name
    short: tuple[str, ...]  # names it may carry inside a CDS netCDF file


SURFACE_VARIABLES = {
    "2t": _Var("2m_temperature", "2m_temperature", ("t2m", "2t")),
    "10u": _Var("10m_u_component_of_wind", "10m_u_component_of_wind", ("u10", "10u")),
    "10v": _Var("10m_v_component_of_wind", "10m_v_component_of_wind", ("v10", "10v")),
    "msl": _Var("mean_sea_level_pressure", "mean_sea_level_pressure", ("msl",)),
}
ATMOS_VARIABLES = {
    "z": _Var("geopotential", "geopotential", ("z",)),
    "u": _Var("u_component_of_wind", "u_component_of_wind", ("u",)),
    "v": _Var("v_component_of_wind", "v_component_of_wind", ("v",)),
    "t": _Var("temperature", "temperature", ("t",)),
    "q": _Var("specific_humidity", "specific_humidity", ("q",)),
    "r": _Var("relative_humidity", "relative_humidity", ("r",)),
    "w": _Var("vertical_velocity", "vertical_velocity", ("w",)),
}
STATIC_VARIABLES = {
    "lsm": _Var("land_sea_mask", "land_sea_mask", ("lsm",)),
    "z": _Var("geopotential", "geopotential_at_surface", ("z",)),
    "slt": _Var("soil_type", "soil_type", ("slt",)),
}
_GROUPS = {
    "surface": (ERA5_SINGLE, SURFACE_VARIABLES),
    "pressure": (ERA5_PRESSURE, ATMOS_VARIABLES),
    "static": (ERA5_SINGLE, STATIC_VARIABLES),
}


# --------------------------------------------------------------------------------------------
# ERA5 through the CDS: planning
# --------------------------------------------------------------------------------------------


class CdsClient(Protocol):
    """What we use of `cdsapi.Client`; tests inject a fake with the same method."""

    def retrieve(self, name: str, request: dict[str, Any], target: str | None = None) -> Any: ...


@dataclass(frozen=True)
class CdsRequest:
    """One CDS request and the file it fills; `times`/`levels` are what the file must hold."""

    dataset: str
    group: str
    target: Path
    variables: tuple[str, ...]  # Aurora names
    times: tuple[np.datetime64, ...]
    levels: tuple[int, ...]
    request: Mapping[str, Any] = field(compare=False)

    @property
    def label(self) -> str:
        """How errors and logs name this request."""
        return f"{self.dataset} -> {self.target.name}"

    def describe(self) -> str:
        """One line of the dry-run plan: dataset, target, variables, dates, hours, levels."""
        days = sorted({str(t)[:10] for t in self.times})
        hours = sorted({str(t)[11:13] for t in self.times})
        span = days[0] if len(days) == 1 else f"{days[0]}..{days[-1]}"
        levels = ",".join(str(x) for x in self.levels) or "-"
        ndays = f"{len(days)} day" + ("s" if len(days) != 1 else "")
        return (
            f"{self.dataset}  {self.target}  variables={','.join(self.request['variable'])}  "
            f"dates={span} ({ndays})  hours={','.join(hours)}  levels={levels}"
        )


def _parse_date(value: str | dt.date) -> dt.date:
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value)[:10])
    except ValueError as e:
        raise DataError(f"bad date {value!r}; use YYYY-MM-DD") from e


def month_spans(start: str | dt.date, end: str | dt.date) -> list[tuple[int, int, list[int]]]:
    """(year, month, days) for each calendar month touched by [start, end], both inclusive.

    One request per month keeps each CDS job under the service's size limit and makes a failure
    cost one month, not the whole range.
    """
    first, last = _parse_date(start), _parse_date(end)
    if last < first:
        raise DataError(f"end date {last} is before start date {first}")
    spans = []
    year, month = first.year, first.month
    while (year, month) <= (last.year, last.month):
        ndays = calendar.monthrange(year, month)[1]
        lo = first.day if (year, month) == (first.year, first.month) else 1
        hi = last.day if (year, month) == (last.year, last.month) else ndays
        spans.append((year, month, list(range(lo, hi + 1))))
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return spans


def _parse_hours(hours: Sequence[int | str]) -> tuple[int, ...]:
    out = []
    for h in hours:
        try:
            value = int(str(h).split(":")[0])
        except ValueError as e:
            raise DataError(f"bad hour {h!r}; use 0..23 (e.g. 00 06 12 18)") from e
        if not 0 <= value <= 23:
            raise DataError(f"bad hour {h!r}; use 0..23")
        out.append(value)
    return tuple(sorted(set(out)))


def _lookup(group: str, names: Sequence[str]) -> list[tuple[str, _Var]]:
    """Resolve Aurora names (or CDS long names) within one group; unknown names are errors."""
    dataset, table = _GROUPS[group]
    by_cds = {v.cds: k for k, v in table.items()}
    out = []
    for name in names:
        key = name if name in table else by_cds.get(name)
        if key is None:
            raise DataError(
                f"unknown {group} variable {name!r} for {dataset}; known: {sorted(table)} "
                f"(or their CDS names {sorted(by_cds)})"
            )
        out.append((key, table[key]))
    return out


def _split_variables(variables: Sequence[str]) -> tuple[list[str], list[str]]:
    """Surface vs pressure-level names; `z` in `variables` is the atmospheric one."""
    surface, atmos, unknown = [], [], []
    by_cds_sfc = {v.cds for v in SURFACE_VARIABLES.values()}
    by_cds_atm = {v.cds for v in ATMOS_VARIABLES.values()}
    for name in variables:
        if name in ATMOS_VARIABLES or name in by_cds_atm:
            atmos.append(name)
        elif name in SURFACE_VARIABLES or name in by_cds_sfc:
            surface.append(name)
        else:
            unknown.append(name)
    if unknown:
        known = sorted(SURFACE_VARIABLES) + sorted(ATMOS_VARIABLES)
        hint = " (static fields go in --static-variables)" if set(unknown) & {"lsm", "slt"} else ""
        raise DataError(f"unknown ERA5 variable(s) {unknown}; known: {known}{hint}")
    return surface, atmos


def _check_levels(levels: Sequence[int | float]) -> tuple[int, ...]:
    bad = [lev for lev in levels if float(lev) not in ERA5_LEVELS]
    if bad:
        raise DataError(
            f"{ERA5_PRESSURE}: level(s) {bad} hPa are not ERA5 pressure levels; "
            f"available: {list(ERA5_LEVELS)}"
        )
    return tuple(sorted({int(lev) for lev in levels}))


def _base_request(product: str, grid: Sequence[float] | None, area: Sequence[float] | None) -> dict:
    """Fields common to every request; netCDF, unarchived, so one request gives one file."""
    req: dict[str, Any] = {
        "product_type": [product],
        "data_format": "netcdf",
        "download_format": "unarchived",
    }
    if grid is not None:
        g = [float(x) for x in grid]
        req["grid"] = g * 2 if len(g) == 1 else g
    if area is not None:
        if len(area) != 4:
            raise DataError(f"area must be 4 numbers N W S E, got {list(area)}")
        req["area"] = [float(x) for x in area]
    return req


def _times(
    year: int, month: int, days: Sequence[int], hours: Sequence[int]
) -> tuple[np.datetime64, ...]:
    return tuple(np.datetime64(dt.datetime(year, month, d, h), "ns") for d in days for h in hours)


def plan_era5(
    out: str | Path,
    *,
    start: str | dt.date,
    end: str | dt.date,
    variables: Sequence[str] = DEFAULT_SURFACE + DEFAULT_ATMOS,
    levels: Sequence[int | float] = AURORA_LEVELS,
    hours: Sequence[int | str] = DEFAULT_HOURS,
    static_variables: Sequence[str] = DEFAULT_STATIC,
    grid: Sequence[float] | None = None,
    area: Sequence[float] | None = None,
    product: str = "reanalysis",
) -> list[CdsRequest]:
    """Every CDS request for a date range: one per month and group, plus one static request.

    Validating names and levels here means a typo fails in a second, not after hours in the
    CDS queue.
    """
    out = Path(out)
    surface, atmos = _split_variables(variables)
    hrs = _parse_hours(hours)
    if not hrs:
        raise DataError("no hours given")
    lvls = _check_levels(levels) if atmos else ()
    if atmos and not lvls:
        raise DataError(f"{ERA5_PRESSURE}: atmospheric variables {atmos} but no levels")
    base = _base_request(product, grid, area)
    plan: list[CdsRequest] = []
    if static_variables:
        plan.append(
            plan_era5_static(
                out, variables=static_variables, date=start, grid=grid, area=area, product=product
            )
        )
    for year, month, days in month_spans(start, end):
        for group, names in (("surface", surface), ("pressure", atmos)):
            if names:
                plan.append(_month_request(out, group, names, year, month, days, hrs, lvls, base))
    return plan


def _month_request(
    out: Path,
    group: str,
    names: Sequence[str],
    year: int,
    month: int,
    days: Sequence[int],
    hours: Sequence[int],
    levels: tuple[int, ...],
    base: Mapping[str, Any],
) -> CdsRequest:
    dataset, _ = _GROUPS[group]
    resolved = _lookup(group, names)
    req = {
        **base,
        "variable": [v.cds for _, v in resolved],
        "year": [f"{year:04d}"],
        "month": [f"{month:02d}"],
        "day": [f"{d:02d}" for d in days],
        "time": [f"{h:02d}:00" for h in hours],
    }
    if group == "pressure":
        req["pressure_level"] = [str(lev) for lev in levels]
    return CdsRequest(
        dataset=dataset,
        group=group,
        target=out / f"era5_{group}_{year:04d}-{month:02d}.nc",
        variables=tuple(k for k, _ in resolved),
        times=_times(year, month, days, hours),
        levels=levels if group == "pressure" else (),
        request=req,
    )


def plan_era5_static(
    out: str | Path,
    *,
    variables: Sequence[str] = DEFAULT_STATIC,
    date: str | dt.date = "2018-01-01",
    grid: Sequence[float] | None = None,
    area: Sequence[float] | None = None,
    product: str = "reanalysis",
) -> CdsRequest:
    """The static request (lsm / surface z / slt at one time) to ``OUT/era5_static.nc``.

    ERA5's invariant fields are the same at every time, so one 00 UTC field is enough, and an
    existing static file taken at another date counts as complete.
    """
    day = _parse_date(date)
    resolved = _lookup("static", variables)
    req = {
        **_base_request(product, grid, area),
        "variable": [v.cds for _, v in resolved],
        "year": [f"{day.year:04d}"],
        "month": [f"{day.month:02d}"],
        "day": [f"{day.day:02d}"],
        "time": ["00:00"],
    }
    return CdsRequest(
        dataset=ERA5_SINGLE,
        group="static",
        target=Path(out) / "era5_static.nc",
        variables=tuple(k for k, _ in resolved),
        times=_times(day.year, day.month, [day.day], [0]),
        levels=(),
        request=req,
    )


# --------------------------------------------------------------------------------------------
# ERA5 through the CDS: checking and fetching files
# --------------------------------------------------------------------------------------------


def _netcdf_magic_problem(path: Path) -> str | None:
    """Cheap checks before opening: empty, not netCDF, or a NETCDF3 file cut short.

    netCDF-C reads a truncated classic file as if the missing bytes were there, so classic
    files are checked with scipy, which refuses them.
    """
    size = path.stat().st_size
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        magic = f.read(8)
    if magic[:3] == b"CDF":
        try:
            check_netcdf3_complete(path)
        except DataError as e:
            return str(e).removeprefix(f"{path}: ")
        return None
    if magic.startswith(b"\x89HDF"):
        return None
    if magic.startswith(b"PK"):
        return "a zip archive, not netCDF"
    if magic.startswith(b"GRIB"):
        return "GRIB, not netCDF"
    return "not a netCDF file"


def cds_file_problem(path: str | Path, req: CdsRequest) -> str | None:
    """Why `path` does not hold what `req` asked for, or None when it is complete.

    Opens the file with xarray, checks every requested variable, level and valid time, and reads
    one value per variable at the last time (which fails on HDF5 files cut short).
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    problem = _netcdf_magic_problem(path)
    if problem:
        return problem
    try:
        with xr.open_dataset(path, engine="netcdf4", decode_timedelta=False) as ds:
            return _dataset_problem(ds, req)
    except Exception as e:  # any backend failure means the file cannot be used
        return f"unreadable ({type(e).__name__}: {e})"


def _dataset_problem(ds: xr.Dataset, req: CdsRequest) -> str | None:
    _, table = _GROUPS[req.group]
    tname = next((n for n in ("valid_time", "time") if n in ds.coords), None)
    if tname is None:
        return "no time coordinate"
    have = set(np.asarray(ds[tname].values).ravel().astype("datetime64[ns]"))
    wanted = () if req.group == "static" else req.times  # invariant: any one time will do
    missing_t = [t for t in wanted if t not in have]
    if missing_t:
        first = str(missing_t[0])[:16]
        return f"{len(missing_t)} of {len(req.times)} times missing (first {first})"
    for key in req.variables:
        names = [n for n in table[key].short if n in ds.data_vars]
        if not names:
            has = sorted(map(str, ds.data_vars))
            return f"variable {key} ({table[key].cds}) missing; has {has}"
        da = ds[names[0]]
        if da.size == 0:
            return f"variable {key} is empty"
        _ = da.isel(dict.fromkeys(da.dims, -1)).values  # read one value: catches data cut short
    if req.levels:
        lname = next(
            (n for n in ("pressure_level", "level", "isobaricInhPa") if n in ds.coords), None
        )
        if lname is None:
            return "no pressure-level coordinate"
        have_l = {float(x) for x in np.atleast_1d(ds[lname].values)}
        missing_l = [lev for lev in req.levels if float(lev) not in have_l]
        if missing_l:
            return f"levels {missing_l} hPa missing"
    return None


def _part_path(target: Path) -> Path:
    return target.with_name(target.name + ".part")


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _unzip_single(path: Path, label: str) -> None:
    """The CDS zips its output when one request yields several files; merge them into one."""
    if not zipfile.is_zipfile(path):
        return
    tmpdir = path.with_name(path.name + ".unzip")
    _remove(tmpdir)
    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.namelist() if m.endswith(".nc")]
            if not members:
                raise DataError(f"{label}: the CDS returned a zip without netCDF files")
            z.extractall(tmpdir, members)
        files = [tmpdir / m for m in members]
        if len(files) == 1:
            os.replace(files[0], path)
        else:
            parts = [xr.open_dataset(f, engine="netcdf4").load() for f in files]
            xr.merge(parts, compat="override", combine_attrs="override").to_netcdf(path)
    finally:
        _remove(tmpdir)


def retrieve(
    client: CdsClient, req: CdsRequest, *, retries: int = 2, retry_wait_s: float = 30.0
) -> Path:
    """Fetch one request into ``<target>.part``, check it, then rename it into place.

    The rename is the commit: a final file exists only if it passed `cds_file_problem`, so an
    interrupted or failed download never leaves a file that a rerun would skip. Failures
    (network, CDS errors, bad files) are retried with exponential backoff; the last one is
    raised as `DataError` naming the request.
    """
    part = _part_path(req.target)
    req.target.parent.mkdir(parents=True, exist_ok=True)
    last: BaseException | None = None
    for attempt in range(retries + 1):
        _remove(part)
        try:
            client.retrieve(req.dataset, dict(req.request), str(part))
            if not part.exists():
                raise DataError("the client wrote no file")
            _unzip_single(part, req.label)
            problem = cds_file_problem(part, req)
            if problem:
                raise DataError(f"downloaded file is incomplete: {problem}")
            os.replace(part, req.target)
            return req.target
        except Exception as e:  # network errors, CDS refusals, bad files: all retried
            last = e
            log.warning("%s: attempt %d/%d failed: %s", req.label, attempt + 1, retries + 1, e)
            _remove(part)
            if attempt < retries:
                time.sleep(retry_wait_s * 2**attempt)
        except BaseException:  # KeyboardInterrupt, SystemExit: leave nothing behind
            _remove(part)
            raise
    raise DataError(
        f"{req.label}: failed after {retries + 1} attempt(s) (variables {list(req.variables)}, "
        f"levels {list(req.levels)}): {last}"
    ) from last


def request_status(req: CdsRequest) -> str:
    """'done', 'todo' or 'redo (<why>)': what a run would do with this request."""
    if not req.target.exists():
        return "todo"
    problem = cds_file_problem(req.target, req)
    return "done" if problem is None else f"redo ({problem})"


def run_cds_requests(
    plan: Sequence[CdsRequest],
    client: CdsClient | None = None,
    *,
    dry_run: bool = False,
    retries: int = 2,
    retry_wait_s: float = 30.0,
    echo: Callable[[str], None] = print,
) -> list[Path]:
    """Run (or, with `dry_run`, print) a plan; complete files are skipped, others fetched.

    Returns the target files (all of them, skipped ones included). The client is created only
    when something must be downloaded, so dry runs and finished plans need no CDS account.
    """
    if dry_run:
        for req in plan:
            echo(f"{req.describe()}  [{request_status(req)}]")
        echo(f"{len(plan)} request(s); dry run: nothing downloaded")
        return [req.target for req in plan]
    for req in plan:
        status = request_status(req)
        if status == "done":
            log.info("%s: complete, skipping", req.label)
            continue
        if status != "todo":
            log.warning("%s: %s; downloading again", req.label, status)
        if client is None:
            client = _default_client()
        log.info("%s: requesting", req.label)
        retrieve(client, req, retries=retries, retry_wait_s=retry_wait_s)
    return [req.target for req in plan]


def _default_client() -> CdsClient:
    import cdsapi

    return cdsapi.Client()


def download_era5(
    out: str | Path,
    *,
    start: str | dt.date,
    end: str | dt.date,
    client: CdsClient | None = None,
    dry_run: bool = False,
    retries: int = 2,
    retry_wait_s: float = 30.0,
    echo: Callable[[str], None] = print,
    **plan_kwargs: Any,
) -> list[Path]:
    """`plan_era5` then `run_cds_requests`: the whole ``era5`` command as a function."""
    plan = plan_era5(out, start=start, end=end, **plan_kwargs)
    return run_cds_requests(
        plan, client, dry_run=dry_run, retries=retries, retry_wait_s=retry_wait_s, echo=echo
    )


# --------------------------------------------------------------------------------------------
# WeatherBench2 / HRES zarr stores
# --------------------------------------------------------------------------------------------

_LEVEL_DIMS = ("level", "pressure_level", "isobaricInhPa", "plev")


def resolve_source(source: str) -> str:
    """A preset name (``era5``, ``hres_t0``) becomes its URL; anything else is used as given."""
    return WB2_STORES.get(source, source)


def _is_url(source: str) -> bool:
    return "://" in source


def open_store(source: str, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a zarr store lazily (nothing but metadata is read) from a URL or a local path.

    Lazy matters: WeatherBench2 stores are tens of terabytes, and only the selected chunks may
    ever be fetched.
    """
    url = resolve_source(source)
    kwargs: dict[str, Any] = {"chunks": None, "decode_timedelta": True}
    if _is_url(url):
        opts = dict(storage_options or {})
        if url.startswith(("gs://", "gcs://")):
            opts.setdefault("token", "anon")  # the WeatherBench2 bucket is public
        kwargs["storage_options"] = opts
        kwargs["consolidated"] = None
    else:
        path = Path(url)
        if not path.exists():
            raise DataError(f"{url}: no such zarr store")
        kwargs["consolidated"] = (path / ".zmetadata").exists() or None
    try:
        return xr.open_zarr(url, **kwargs)
    except ImportError as e:
        need = "gcsfs" if url.startswith(("gs://", "gcs://")) else "aiohttp"
        raise DataError(f"{url}: cannot open zarr store: {e} (install {need})") from e
    except Exception as e:  # fsspec / zarr raise many types for missing or bad stores
        raise DataError(f"{url}: cannot open zarr store ({type(e).__name__}: {e})") from e


def _source_names(
    ds: xr.Dataset, names: Sequence[str], url: str, *, static: bool
) -> dict[str, str]:
    """Requested name -> the store's variable: Aurora names map to WeatherBench2 long names;
    a name the store holds as is (e.g. ``total_precipitation_6hr``) is taken directly."""
    table = STATIC_VARIABLES if static else {**SURFACE_VARIABLES, **ATMOS_VARIABLES}
    out: dict[str, str] = {}
    for name in names:
        candidates = ([table[name].wb2] if name in table else []) + [name]
        found = next((c for c in candidates if c in ds.data_vars), None)
        if found is None:
            raise DataError(
                f"{url}: variable {name!r} (looked for {candidates}) is not in the store; "
                f"it has {sorted(map(str, ds.data_vars))}"
            )
        out[name] = found
    if len(set(out.values())) != len(out):
        raise DataError(f"{url}: requested names {list(names)} map to the same store variable")
    return out


def _level_dim(ds: xr.Dataset) -> str | None:
    return next((d for d in _LEVEL_DIMS if d in ds.dims), None)


def _select_levels(ds: xr.Dataset, levels: Sequence[float], url: str) -> xr.Dataset:
    dim = _level_dim(ds)
    if dim is None:
        log.info("%s: no level dimension among %s; --levels ignored", url, list(ds.data_vars))
        return ds
    have = np.asarray(ds[dim].values, dtype=np.float64)
    idx = []
    for lev in levels:
        hit = np.flatnonzero(np.isclose(have, float(lev)))
        if hit.size == 0:
            var = next(str(v) for v in ds.data_vars if dim in ds[v].dims)
            raise DataError(
                f"{url}: variable {var} has no level {float(lev):g} hPa; "
                f"store levels: {[float(x) for x in have]}"
            )
        idx.append(int(hit[0]))
    return ds.isel({dim: sorted(set(idx), key=lambda i: have[i])})  # ascending, as readers do


def _select_times(
    ds: xr.Dataset,
    url: str,
    start: str | None,
    end: str | None,
    hours: Sequence[int] | None,
    stride: int,
) -> xr.Dataset:
    """Range (inclusive; '2020-01-31' means the whole day), then hours, then every `stride`-th."""
    if stride < 1:
        raise DataError(f"stride must be >= 1, got {stride}")
    index = ds.get_index("time")
    if start is not None or end is not None:
        try:
            ds = ds.isel(time=index.slice_indexer(start, end))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{url}: cannot select times {start}..{end} ({e})") from e
    if hours:
        ds = ds.isel(time=np.flatnonzero(np.isin(ds["time"].dt.hour.values, list(hours))))
    ds = ds.isel(time=slice(None, None, stride))
    if ds.sizes["time"] == 0:
        values = index.values
        span = f"{str(values[0])[:16]}..{str(values[-1])[:16]}" if len(values) else "no times"
        hrs = f" at hours {list(hours)}" if hours else ""
        raise DataError(
            f"{url}: no times from {start or 'the first'} to {end or 'the last'}"
            f"{hrs}; the store covers {span}"
        )
    return ds


def _select_static_time(ds: xr.Dataset, date: str | None) -> xr.Dataset:
    """Static fields stored with a time axis: take one time (nearest `date`, else the first)."""
    if "time" not in ds.dims:
        return ds
    if date is None:
        return ds.isel(time=0, drop=True)
    return ds.sel(time=np.datetime64(date, "ns"), method="nearest").drop_vars("time")


def _nbytes(ds: xr.Dataset, *, timed: bool) -> int:
    """Bytes of the variables with (per time step) or without a time axis."""
    total = 0
    for da in ds.data_vars.values():
        if ("time" in da.dims) != timed:
            continue
        n = int(np.prod([s for d, s in da.sizes.items() if d != "time"], dtype=np.int64))
        total += n * da.dtype.itemsize
    return total


def _journal_path(out: Path) -> Path:
    return out.with_name(out.name + ".journal.json")


def _read_journal(out: Path) -> int | None:
    """Committed time count written before an append; present only while one is running."""
    path = _journal_path(out)
    if not path.exists():
        return None
    try:
        return int(json.loads(path.read_text())["committed"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable append journal ({e}); remove {out} and rerun") from e


def _write_journal(out: Path, committed: int) -> None:
    """Atomic (write then rename), so the journal itself is never half-written."""
    path = _journal_path(out)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"committed": committed}))
    os.replace(tmp, path)


def _existing_output(out: Path) -> xr.Dataset | None:
    """The output store as written so far, or None when there is none.

    Normally the arrays themselves are read (consolidated metadata may lag behind them). While
    a journal says an append was cut short, the arrays may disagree in length; then the
    consolidated metadata, written by the last append that finished, describes the committed
    store (this only happens in a dry run: real runs truncate first, see `_recover`).
    """
    if not out.exists():
        return None
    consolidated = _journal_path(out).exists()
    try:
        return xr.open_zarr(out, chunks=None, consolidated=consolidated, decode_timedelta=True)
    except Exception as e:
        raise DataError(f"{out}: exists but is not a readable zarr store ({e}); remove it") from e


def _committed_times(existing: xr.Dataset, out: Path) -> np.ndarray:
    """Times fully written: the first `committed` of the journal, or all when there is none."""
    if "time" not in existing.dims:
        return np.array([], dtype="datetime64[ns]")
    n = _read_journal(out)
    n = existing.sizes["time"] if n is None else min(n, existing.sizes["time"])
    return existing["time"].isel(time=slice(0, n)).values.astype("datetime64[ns]")


def _check_compatible(existing: xr.Dataset, subset: xr.Dataset, out: Path) -> None:
    """Appending other variables or levels to an existing output would corrupt it: refuse."""
    have, want = sorted(map(str, existing.data_vars)), sorted(map(str, subset.data_vars))
    if have != want:
        raise DataError(
            f"{out}: holds variables {have} but this request writes {want}; use another --out"
        )
    dim = _level_dim(subset)
    if dim is not None:
        a = np.asarray(existing[dim].values, np.float64) if dim in existing.dims else None
        b = np.asarray(subset[dim].values, np.float64)
        if a is None or a.shape != b.shape or not np.allclose(a, b):
            got = None if a is None else [float(x) for x in a]
            raise DataError(
                f"{out}: holds levels {got} but this request writes "
                f"{[float(x) for x in b]}; use another --out"
            )


@dataclass(frozen=True)
class ZarrPlan:
    """What a zarr download will read and write; `lines()` is the dry-run report."""

    source: str
    out: Path
    names: Mapping[str, str]  # requested name -> store variable
    levels: tuple[float, ...] | None  # None: the store has no level dimension
    times: np.ndarray = field(compare=False)  # every selected time (empty for static stores)
    todo: np.ndarray = field(compare=False)  # selected times not yet in the output
    bytes_per_time: int
    static_bytes: int
    write_static: bool  # only the first write carries variables without a time axis
    chunk_times: int
    stride: int
    subset: xr.Dataset = field(compare=False, repr=False)

    @property
    def estimated_bytes(self) -> int:
        """Uncompressed bytes still to fetch (what memory and disk must hold, roughly)."""
        static = self.static_bytes if self.write_static else 0
        return len(self.todo) * self.bytes_per_time + static

    def lines(self) -> list[str]:
        names = ", ".join(f"{k}={v}" if k != v else k for k, v in self.names.items())
        levels = "-" if self.levels is None else ", ".join(f"{x:g}" for x in self.levels)
        lines = [
            f"source: {self.source}",
            f"output: {self.out}",
            f"variables: {names}",
            f"levels: {levels}",
        ]
        if "time" in self.subset.dims:
            t = self.times
            lines.append(
                f"times: {len(t)} selected ({str(t[0])[:16]}..{str(t[-1])[:16]}, stride "
                f"{self.stride}); {len(t) - len(self.todo)} already present; {len(self.todo)} "
                f"to fetch in blocks of {self.chunk_times}"
            )
        else:
            lines.append(
                "times: none (static store)" + ("" if self.write_static else "; output complete")
            )
        lines.append(
            f"estimated bytes: {self.estimated_bytes} ({_human(self.estimated_bytes)}, "
            "uncompressed)"
        )
        return lines


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def plan_zarr(
    source: str,
    out: str | Path,
    *,
    variables: Sequence[str] = DEFAULT_SURFACE + DEFAULT_ATMOS,
    levels: Sequence[float] | None = AURORA_LEVELS,
    start: str | None = None,
    end: str | None = None,
    hours: Sequence[int | str] | None = None,
    stride: int = 1,
    chunk_times: int = 4,
    static: bool = False,
    date: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> ZarrPlan:
    """Select from a store (lazily) and compare with what the output already holds.

    `levels` in hPa (None: all); `start`/`end` inclusive (dates or datetimes); `hours` keeps those
    hours of day; `stride` keeps every n-th selected time. With `static`, names are static fields
    (``z`` is ``geopotential_at_surface``) and one time is taken if the store has a time axis.
    """
    if chunk_times < 1:
        raise DataError(f"chunk_times must be >= 1, got {chunk_times}")
    url = resolve_source(source)
    ds = open_store(url, storage_options)
    names = _source_names(ds, variables, url, static=static)
    sub = ds[list(names.values())]
    if levels is not None:
        sub = _select_levels(sub, levels, url)
    if static:
        sub = _select_static_time(sub, date)
    elif "time" in sub.dims:
        sub = _select_times(sub, url, start, end, _parse_hours(hours) if hours else None, stride)
    out = Path(out)
    times = (
        sub["time"].values.astype("datetime64[ns]")
        if "time" in sub.dims
        else np.array([], dtype="datetime64[ns]")
    )
    existing = _existing_output(out)
    if existing is not None:
        _check_compatible(existing, sub, out)
        present = _committed_times(existing, out)
        existing.close()
    else:
        present = np.array([], dtype="datetime64[ns]")
    dim = _level_dim(sub)
    return ZarrPlan(
        source=url,
        out=out,
        names=names,
        levels=None if dim is None else tuple(float(x) for x in sub[dim].values),
        times=times,
        todo=times[~np.isin(times, present)],
        bytes_per_time=_nbytes(sub, timed=True),
        static_bytes=_nbytes(sub, timed=False),
        write_static=existing is None,
        chunk_times=chunk_times,
        stride=stride,
        subset=sub,
    )


def _array_dims(arr: Any) -> list[str]:
    """Dimension names of a zarr array, v2 (xarray's attribute) or v3 (metadata)."""
    names = arr.attrs.get("_ARRAY_DIMENSIONS")
    if names is None:
        names = getattr(arr.metadata, "dimension_names", None) or []
    return [str(n) for n in names]


def _truncate_time(out: Path, n: int) -> None:
    """Cut every time-dependent array back to `n` times: undoes an append that was cut short."""
    import zarr

    group = zarr.open_group(str(out), mode="r+", use_consolidated=False)  # metadata may lag
    for _, arr in group.arrays():
        dims = _array_dims(arr)
        if "time" in dims:
            axis = dims.index("time")
            if arr.shape[axis] > n:
                shape = list(arr.shape)
                shape[axis] = n
                arr.resize(tuple(shape))
    zarr.consolidate_metadata(str(out))


def _recover(out: Path) -> None:
    """Finish what an interrupted run left: a journal means the last append may be partial."""
    _remove(out.with_name(out.name + ".part"))
    n = _read_journal(out)
    if n is None:
        return
    if out.exists():
        log.warning("%s: an append was interrupted; truncating to %d committed times", out, n)
        _truncate_time(out, n)
    _journal_path(out).unlink()


def _encoding(ds: xr.Dataset) -> dict[str, dict[str, Any]]:
    """One time per chunk (how builders read), whole fields otherwise; integer seconds for time
    so that appended blocks encode exactly like the first."""
    enc: dict[str, dict[str, Any]] = {
        str(k): {"chunks": tuple(1 if d == "time" else ds.sizes[d] for d in v.dims)}
        for k, v in ds.data_vars.items()
    }
    if "time" in ds.coords:
        enc["time"] = {"units": "seconds since 1970-01-01", "dtype": "int64"}
    return enc


def _write_first(block: xr.Dataset, out: Path) -> None:
    """Write the first block to ``<out>.part`` and rename: a store exists only once it is valid."""
    part = out.with_name(out.name + ".part")
    _remove(part)
    block = block.drop_encoding()
    try:
        block.to_zarr(part, mode="w-", zarr_format=2, consolidated=True, encoding=_encoding(block))
        os.replace(part, out)
    except BaseException:
        _remove(part)
        raise


def _append(block: xr.Dataset, out: Path, committed: int) -> None:
    """Append a loaded block; the journal brackets the write so a crash inside is undone."""
    block = block[[v for v in block.data_vars if "time" in block[v].dims]].drop_encoding()
    _write_journal(out, committed)
    try:
        block.to_zarr(out, append_dim="time", zarr_format=2, consolidated=True)
    except Exception:
        _truncate_time(out, committed)
        _journal_path(out).unlink()
        raise
    _journal_path(out).unlink()


def _load(block: xr.Dataset, url: str) -> xr.Dataset:
    try:
        return block.load()
    except Exception as e:
        raise DataError(f"{url}: cannot read data ({type(e).__name__}: {e})") from e


def run_zarr_plan(
    plan: ZarrPlan, *, dry_run: bool = False, echo: Callable[[str], None] = print
) -> Path:
    """Fetch the plan's missing times block by block (or print the plan with `dry_run`)."""
    if dry_run:
        for line in plan.lines():
            echo(line)
        echo("dry run: nothing downloaded")
        return plan.out
    out, sub = plan.out, plan.subset
    _recover(out)
    if "time" not in sub.dims:
        if plan.write_static:
            _write_first(_load(sub, plan.source), out)
        else:
            log.info("%s: complete, skipping", out)
        return out
    todo = list(plan.todo)
    if not todo:
        log.info("%s: all %d times present, nothing to fetch", out, len(plan.times))
        return out
    if not out.exists():
        first, todo = todo[: plan.chunk_times], todo[plan.chunk_times :]
        _write_first(_load(sub.sel(time=first), plan.source), out)
        log.info("%s: wrote %d times", out, len(first))
    for i in range(0, len(todo), plan.chunk_times):
        times = todo[i : i + plan.chunk_times]
        block = _load(sub.sel(time=times), plan.source)
        with xr.open_zarr(out, chunks=None, consolidated=False) as current:
            committed = current.sizes["time"]
        _append(block, out, committed)
        log.info("%s: appended %d times (%d/%d)", out, len(times), i + len(times), len(todo))
    return out


def download_zarr(
    source: str,
    out: str | Path,
    *,
    dry_run: bool = False,
    echo: Callable[[str], None] = print,
    **plan_kwargs: Any,
) -> Path:
    """`plan_zarr` then `run_zarr_plan`: the whole ``hres``/``wb2`` command as a function."""
    if not dry_run:
        _recover(Path(out))  # so the plan sees the committed times only
    return run_zarr_plan(plan_zarr(source, out, **plan_kwargs), dry_run=dry_run, echo=echo)


# --------------------------------------------------------------------------------------------
# Static fields
# --------------------------------------------------------------------------------------------


def download_static(
    out: str | Path,
    *,
    source: str = "cds",
    variables: Sequence[str] = DEFAULT_STATIC,
    grid: Sequence[float] | None = None,
    area: Sequence[float] | None = None,
    date: str | None = None,
    product: str = "reanalysis",
    client: CdsClient | None = None,
    dry_run: bool = False,
    retries: int = 2,
    retry_wait_s: float = 30.0,
    storage_options: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """lsm / z / slt into directory `out`: ``era5_static.nc`` from the CDS (``source="cds"``,
    on `grid`/`area`) or ``static.zarr`` from a zarr store (a preset name, URL or path; the
    store's own grid)."""
    out = Path(out)
    if source == "cds":
        req = plan_era5_static(
            out,
            variables=variables,
            date=date or "2018-01-01",
            grid=grid,
            area=area,
            product=product,
        )
        run_cds_requests(
            [req], client, dry_run=dry_run, retries=retries, retry_wait_s=retry_wait_s, echo=echo
        )
        return req.target
    if grid is not None or area is not None:
        raise DataError(
            f"{resolve_source(source)}: --grid/--area apply to the CDS only; a zarr store has its "
            "own grid (pick a store of the resolution you want, or regrid after reading)"
        )
    return download_zarr(
        source,
        out / "static.zarr",
        variables=variables,
        levels=None,
        static=True,
        date=date,
        dry_run=dry_run,
        echo=echo,
        storage_options=storage_options,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_builders.download",
        description="Download ERA5 (CDS), IFS HRES / WeatherBench2 (zarr) and static fields. "
        "Rerunning a command resumes it.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    era5 = sub.add_parser("era5", help="ERA5 from the Copernicus CDS via cdsapi")
    era5.add_argument("--out", required=True, help="output directory")
    era5.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    era5.add_argument("--end", required=True, help="last date (inclusive), YYYY-MM-DD")
    era5.add_argument(
        "--variables",
        nargs="+",
        default=list(DEFAULT_SURFACE + DEFAULT_ATMOS),
        help="Aurora names (2t 10u 10v msl z u v t q r w) or CDS long names",
    )
    era5.add_argument("--levels", nargs="+", type=int, default=list(AURORA_LEVELS), help="hPa")
    era5.add_argument("--hours", nargs="+", default=["00", "06", "12", "18"])
    era5.add_argument(
        "--static-variables",
        nargs="*",
        default=list(DEFAULT_STATIC),
        help="static fields for OUT/era5_static.nc (lsm z slt); none to skip",
    )
    _cds_args(era5)

    for name, default, what in (
        ("hres", "hres_t0", "IFS HRES T0"),
        ("wb2", "era5", "WeatherBench2 ERA5"),
    ):
        z = sub.add_parser(name, help=f"{what} (or any zarr store) to a local zarr")
        z.add_argument("--out", required=True, help="output zarr store path")
        z.add_argument(
            "--source",
            default=default,
            help=f"preset ({', '.join(WB2_STORES)}), zarr URL or local path (default {default})",
        )
        z.add_argument("--start", help="first time, e.g. 2020-01-01 or 2020-01-01T06")
        z.add_argument("--end", help="last time, inclusive (a date means the whole day)")
        z.add_argument(
            "--variables",
            nargs="+",
            default=list(DEFAULT_SURFACE + DEFAULT_ATMOS),
            help="Aurora names or the store's own variable names",
        )
        z.add_argument("--levels", nargs="+", type=float, default=list(AURORA_LEVELS))
        z.add_argument("--all-levels", action="store_true", help="keep every level of the store")
        z.add_argument("--hours", nargs="+", help="keep only these hours of day")
        z.add_argument("--stride", type=int, default=1, help="keep every n-th selected time")
        z.add_argument(
            "--chunk-times",
            type=int,
            default=4,
            help="times fetched and written per block (memory ~ block size)",
        )
        z.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")

    st = sub.add_parser("static", help="static fields lsm / z / slt")
    st.add_argument("--out", required=True, help="output directory")
    st.add_argument(
        "--source",
        default="cds",
        help=f"'cds', or a zarr preset ({', '.join(WB2_STORES)}), URL or path",
    )
    st.add_argument("--variables", nargs="+", default=list(DEFAULT_STATIC))
    st.add_argument("--date", help="time to take the fields at (default 2018-01-01)")
    _cds_args(st)
    return p


def _cds_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        nargs="+",
        type=float,
        help="CDS output grid in degrees, e.g. 0.25 or 1.0 1.0 (default: native)",
    )
    p.add_argument(
        "--area",
        nargs=4,
        type=float,
        metavar=("N", "W", "S", "E"),
        help="CDS sub-area (default: global)",
    )
    p.add_argument("--product", default="reanalysis", help="CDS product_type")
    p.add_argument("--retries", type=int, default=2, help="retries per request")
    p.add_argument(
        "--retry-wait",
        type=float,
        default=30.0,
        help="seconds before the first retry (doubles each time)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")


def main(argv: Sequence[str] | None = None, *, client: CdsClient | None = None) -> int:
    """Entry point of ``python -m data_builders.download``; `client` replaces cdsapi in tests.

    Returns 0 on success and 2 on a `DataError`, printed as one line that names the problem.
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "era5":
            download_era5(
                args.out,
                start=args.start,
                end=args.end,
                client=client,
                dry_run=args.dry_run,
                retries=args.retries,
                retry_wait_s=args.retry_wait,
                variables=args.variables,
                levels=args.levels,
                hours=args.hours,
                static_variables=args.static_variables,
                grid=args.grid,
                area=args.area,
                product=args.product,
            )
        elif args.command in ("hres", "wb2"):
            download_zarr(
                args.source,
                args.out,
                dry_run=args.dry_run,
                variables=args.variables,
                levels=None if args.all_levels else args.levels,
                start=args.start,
                end=args.end,
                hours=args.hours,
                stride=args.stride,
                chunk_times=args.chunk_times,
            )
        else:
            download_static(
                args.out,
                source=args.source,
                variables=args.variables,
                grid=args.grid,
                area=args.area,
                date=args.date,
                product=args.product,
                client=client,
                dry_run=args.dry_run,
                retries=args.retries,
                retry_wait_s=args.retry_wait,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
