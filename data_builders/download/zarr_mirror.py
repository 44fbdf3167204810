"""Mirror a subset of a zarr store (WeatherBench2 ERA5, IFS HRES T0, any URL or path) locally.

The store is opened lazily with xarray + fsspec (``https://`` needs `aiohttp`, ``gs://`` needs
`gcsfs`); variables, levels, a time range, hours and a stride are selected, and the subset is
written to a local zarr (v2, consolidated, one time per chunk) in blocks of ``chunk_times``. The
first block goes to ``<out>.part`` and is renamed; before each later append a journal
``<out>.journal.json`` records how many times are committed, so an append cut short is truncated
back on the next run, and times already in the output are never fetched again. Variables keep the
store's names (WeatherBench2 long names, which `readers.open_dataset` maps to Aurora's).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from aurora.variables import ATMOS_VARS, AURORA_LEVELS, SURF_VARS
from data_builders.download.catalog import (
    ATMOS_VARIABLES,
    STATIC_VARIABLES,
    SURFACE_VARIABLES,
    WB2_STORES,
    parse_hours,
)
from data_builders.download.files import part_path, remove
from data_builders.errors import DataError

__all__ = [
    "ZarrPlan",
    "download_zarr",
    "open_store",
    "plan_zarr",
    "resolve_source",
    "run_zarr_plan",
    "select_static_time",
    "source_names",
]

log = logging.getLogger(__name__)

_LEVEL_DIMS = ("level", "pressure_level", "isobaricInhPa", "plev")


def resolve_source(source: str) -> str:
    """A preset name (``era5``, ``hres_t0``) becomes its URL; anything else is used as given.

    Args:
        source: A preset name, URL or path.

    Returns:
        The URL or path to open.
    """
    return WB2_STORES.get(source, source)


def _is_url(source: str) -> bool:
    return "://" in source


def open_store(source: str, storage_options: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a zarr store lazily (nothing but metadata is read) from a URL or a local path.

    Lazy matters: WeatherBench2 stores are tens of terabytes, and only the selected chunks may
    ever be fetched.

    Args:
        source: A preset name (see `resolve_source`), URL or local path.
        storage_options: fsspec options for URLs (``gs://`` defaults to anonymous access).

    Returns:
        The lazily opened dataset.

    Raises:
        DataError: If the store is missing, unreadable, or needs a package that is not installed.
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


def source_names(ds: xr.Dataset, names: Sequence[str], url: str, *, static: bool) -> dict[str, str]:
    """Requested name -> the store's variable: Aurora names map to WeatherBench2 long names;
    a name the store holds as is (e.g. ``total_precipitation_6hr``) is taken directly.

    Public because the streaming source (`data_builders.zarr_source`) must find variables in a
    store by exactly the rules the mirror uses, so a config works with either.
    """
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


def select_static_time(ds: xr.Dataset, date: str | None) -> xr.Dataset:
    """Static fields stored with a time axis: take one time (nearest `date`, else the first).

    Public for the streaming source (`data_builders.zarr_source`), which takes ARCO-ERA5's
    hourly static fields the same way as the mirror.
    """
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
    variables: Sequence[str] = SURF_VARS + ATMOS_VARS,
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

    Args:
        source: A preset name, URL or local path of a zarr store.
        out: The local zarr store to write.
        variables: Aurora names or the store's own variable names.
        levels: Pressure levels in hPa; None: all.
        start: First time (a date or datetime); None: the store's first.
        end: Last time, inclusive (a date means the whole day); None: the store's last.
        hours: Hours of day to keep; None: all.
        stride: Keep every n-th selected time.
        chunk_times: Times fetched and written per block.
        static: Names are static fields (``z`` is ``geopotential_at_surface``), and one time is
            taken if the store has a time axis.
        date: With `static`, the time to take (nearest); None: the first.
        storage_options: fsspec options for URLs.

    Returns:
        The plan: what is selected, what is still missing from `out`, and its size.

    Raises:
        DataError: For unknown variables, missing levels or times, or an `out` holding other
            variables or levels.
    """
    if chunk_times < 1:
        raise DataError(f"chunk_times must be >= 1, got {chunk_times}")
    url = resolve_source(source)
    ds = open_store(url, storage_options)
    names = source_names(ds, variables, url, static=static)
    sub = ds[list(names.values())]
    if levels is not None:
        sub = _select_levels(sub, levels, url)
    if static:
        sub = select_static_time(sub, date)
    elif "time" in sub.dims:
        sub = _select_times(sub, url, start, end, parse_hours(hours) if hours else None, stride)
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
    remove(part_path(out))
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
    part = part_path(out)
    remove(part)
    block = block.drop_encoding()
    try:
        block.to_zarr(part, mode="w-", zarr_format=2, consolidated=True, encoding=_encoding(block))
        os.replace(part, out)
    except BaseException:
        remove(part)
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
    """Fetch the plan's missing times block by block (or print the plan with `dry_run`).

    Args:
        plan: From `plan_zarr`.
        dry_run: Print the plan instead of downloading.
        echo: Where dry-run lines go.

    Returns:
        The output store's path.
    """
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
    """`plan_zarr` then `run_zarr_plan`: the whole ``hres``/``wb2`` command as a function.

    Args:
        source: A preset name, URL or local path of a zarr store.
        out: The local zarr store to write.
        dry_run: Print the plan instead of downloading.
        echo: Where dry-run lines go.
        **plan_kwargs: Further arguments of `plan_zarr`.

    Returns:
        The output store's path.
    """
    if not dry_run:
        _recover(Path(out))  # so the plan sees the committed times only
    return run_zarr_plan(plan_zarr(source, out, **plan_kwargs), dry_run=dry_run, echo=echo)
