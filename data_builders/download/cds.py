"""ERA5 from the Copernicus Climate Data Store (CDS), one checked netCDF file per request.

A date range is planned as one request per month and variable group (``surface`` from
reanalysis-era5-single-levels, ``pressure`` from reanalysis-era5-pressure-levels), plus one
``static`` request, written to ``OUT/era5_{group}_{YYYY-MM}.nc`` and ``OUT/era5_static.nc``.
A file counts as complete when xarray opens it and it holds every requested variable, level and
time; complete files are skipped and anything else is fetched again. Downloads go to
``<target>.part`` and are renamed into place only after passing the same check, so an interrupted
run never leaves a final file that looks complete. The `cdsapi` client can be injected (tests).
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
import os
import time
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xarray as xr

from aurora.variables import ATMOS_VARS, AURORA_LEVELS, STATIC_VARS, SURF_VARS
from data_builders.download.catalog import (
    ATMOS_VARIABLES,
    DEFAULT_HOURS,
    ERA5_LEVELS,
    ERA5_PRESSURE,
    ERA5_SINGLE,
    STATIC_VARIABLES,
    SURFACE_VARIABLES,
    SourceNames,
    parse_hours,
)
from data_builders.download.files import part_path, remove
from data_builders.errors import DataError
from data_builders.readers import check_netcdf3_complete

__all__ = [
    "CdsClient",
    "CdsRequest",
    "cds_file_problem",
    "download_era5",
    "month_spans",
    "plan_era5",
    "plan_era5_static",
    "request_status",
    "retrieve",
    "run_cds_requests",
]

log = logging.getLogger(__name__)

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

    Args:
        start: First date, ``YYYY-MM-DD`` or a date.
        end: Last date (inclusive).

    Returns:
        ``[(year, month, [day, ...]), ...]`` in calendar order.

    Raises:
        DataError: For a bad date or `end` before `start`.
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


def _lookup(group: str, names: Sequence[str]) -> list[tuple[str, SourceNames]]:
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
    variables: Sequence[str] = SURF_VARS + ATMOS_VARS,
    levels: Sequence[int | float] = AURORA_LEVELS,
    hours: Sequence[int | str] = DEFAULT_HOURS,
    static_variables: Sequence[str] = STATIC_VARS,
    grid: Sequence[float] | None = None,
    area: Sequence[float] | None = None,
    product: str = "reanalysis",
) -> list[CdsRequest]:
    """Every CDS request for a date range: one per month and group, plus one static request.

    Validating names and levels here means a typo fails in a second, not after hours in the
    CDS queue.

    Args:
        out: Output directory.
        start: First date (``YYYY-MM-DD``).
        end: Last date (inclusive).
        variables: Surface and atmospheric variables, Aurora names or CDS long names.
        levels: Pressure levels in hPa (ERA5's levels only).
        hours: Hours of day (UTC).
        static_variables: Static fields for ``OUT/era5_static.nc``; empty: no static request.
        grid: Output grid in degrees (one number or lat/lon); None: the CDS's native grid.
        area: Sub-area ``[N, W, S, E]``; None: global.
        product: CDS ``product_type``.

    Returns:
        The requests, static first, then by month (surface before pressure).

    Raises:
        DataError: For unknown variables, levels that ERA5 does not have, bad dates or hours.
    """
    out = Path(out)
    surface, atmos = _split_variables(variables)
    hrs = parse_hours(hours)
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
    variables: Sequence[str] = STATIC_VARS,
    date: str | dt.date = "2018-01-01",
    grid: Sequence[float] | None = None,
    area: Sequence[float] | None = None,
    product: str = "reanalysis",
) -> CdsRequest:
    """The static request (lsm / surface z / slt at one time) to ``OUT/era5_static.nc``.

    ERA5's invariant fields are the same at every time, so one 00 UTC field is enough, and an
    existing static file taken at another date counts as complete.

    Args:
        out: Output directory.
        variables: Static fields (``lsm``, ``z``, ``slt``) or their CDS long names.
        date: The day whose 00 UTC field is taken.
        grid: Output grid in degrees; None: native.
        area: Sub-area ``[N, W, S, E]``; None: global.
        product: CDS ``product_type``.

    Returns:
        The request.
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

    Args:
        path: The file to check.
        req: The request it should answer.

    Returns:
        A short reason (``"missing"``, ``"empty file"``, ``"3 of 124 times missing ..."``) or None.
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


def _unzip_single(path: Path, label: str) -> None:
    """The CDS zips its output when one request yields several files; merge them into one."""
    if not zipfile.is_zipfile(path):
        return
    tmpdir = path.with_name(path.name + ".unzip")
    remove(tmpdir)
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
        remove(tmpdir)


def retrieve(
    client: CdsClient, req: CdsRequest, *, retries: int = 2, retry_wait_s: float = 30.0
) -> Path:
    """Fetch one request into ``<target>.part``, check it, then rename it into place.

    The rename is the commit: a final file exists only if it passed `cds_file_problem`, so an
    interrupted or failed download never leaves a file that a rerun would skip. Failures
    (network, CDS errors, bad files) are retried with exponential backoff.

    Args:
        client: A `cdsapi.Client` or a stand-in with its `retrieve` method.
        req: The request.
        retries: Attempts after the first.
        retry_wait_s: Seconds before the first retry; doubled for each further one.

    Returns:
        The target file.

    Raises:
        DataError: After the last failed attempt, naming the request and the last error.
    """
    part = part_path(req.target)
    req.target.parent.mkdir(parents=True, exist_ok=True)
    last: BaseException | None = None
    for attempt in range(retries + 1):
        remove(part)
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
            remove(part)
            if attempt < retries:
                time.sleep(retry_wait_s * 2**attempt)
        except BaseException:  # KeyboardInterrupt, SystemExit: leave nothing behind
            remove(part)
            raise
    raise DataError(
        f"{req.label}: failed after {retries + 1} attempt(s) (variables {list(req.variables)}, "
        f"levels {list(req.levels)}): {last}"
    ) from last


def request_status(req: CdsRequest) -> str:
    """What a run would do with this request.

    Args:
        req: A planned request.

    Returns:
        ``"done"``, ``"todo"`` (no file yet) or ``"redo (<why>)"``.
    """
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

    The client is created only when something must be downloaded, so dry runs and finished
    plans need no CDS account.

    Args:
        plan: Requests from `plan_era5` / `plan_era5_static`.
        client: The CDS client; None: a `cdsapi.Client()` made when first needed.
        dry_run: Print each request and its status instead of downloading.
        retries: Retries per request (see `retrieve`).
        retry_wait_s: Seconds before the first retry.
        echo: Where dry-run lines go.

    Returns:
        The target files, all of them (skipped ones included).
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
    """`plan_era5` then `run_cds_requests`: the whole ``era5`` command as a function.

    Args:
        out: Output directory.
        start: First date.
        end: Last date (inclusive).
        client: The CDS client; None: `cdsapi.Client()` when needed.
        dry_run: Print the plan instead of downloading.
        retries: Retries per request.
        retry_wait_s: Seconds before the first retry.
        echo: Where dry-run lines go.
        **plan_kwargs: Further arguments of `plan_era5`.

    Returns:
        The target files.
    """
    plan = plan_era5(out, start=start, end=end, **plan_kwargs)
    return run_cds_requests(
        plan, client, dry_run=dry_run, retries=retries, retry_wait_s=retry_wait_s, echo=echo
    )
