"""Climatologies: WeatherBench2's day-of-year × hour-of-day fields, read or computed.

WeatherBench2 scores ACC (and its climatology baseline) against the 1990–2019 ERA5 mean for the
valid time's day of year and hour, smoothed over a 61-day window. `open_climatology` reads a
store in that layout (dimensions ``dayofyear``, ``hour``, ``level``, ``latitude``,
``longitude``; WB2's long variable names, or short ones) from a path or URL; `compute_climatology`
makes one the same way from any `WeatherSource`, and ``python -m trainers.evaluation.climatology
compute`` writes it to a zarr store. The per-grid-point mean of the training split
(`source_mean`) stays as an explicit fallback (``config.eval.climatology = "train-mean"``): a
constant is no WB2 climatology, and ACC against it is not comparable with published numbers.
`climatology_kind` says which one an evaluation used.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from aurora.batch import Batch
from data_builders.pipeline import WeatherSource
from data_builders.regrid import regrid
from trainers.evaluation.wb2 import day_and_hour, from_wb2, to_wb2

__all__ = [
    "TRAIN_MEAN",
    "WB2_CLIMATOLOGY_URL",
    "Climatology",
    "DayOfYearClimatology",
    "Fields",
    "climatology_batch",
    "climatology_kind",
    "compute_climatology",
    "open_climatology",
    "source_mean",
    "window_weights",
]

log = logging.getLogger(__name__)

WB2_CLIMATOLOGY_URL = (
    "https://storage.googleapis.com/weatherbench2/datasets/era5-hourly-climatology/"
    "1990-2019_6h_1440x721.zarr"
)
"""WB2's ERA5 climatology at 0.25°: 1990–2019, hours 0/6/12/18, 61-day window."""

TRAIN_MEAN = "train-mean"
"""`config.eval.climatology` value for the fallback: the training split's per-point mean."""

Fields = Mapping[str, Mapping[str, np.ndarray]]
"""``{"surf": {name: (h, w)}, "atmos": {name: (c, h, w)}}`` on the source's grid."""
Climatology = Fields | Callable[[int], Fields] | None
"""Fields on the source's grid; or a function of the valid time (int seconds since 1970), e.g.
a `DayOfYearClimatology`; None: the source's mean (`source_mean`)."""


# --------------------------------------------------------------------------------------------
# The fallback: a constant mean
# --------------------------------------------------------------------------------------------


def source_mean(source: WeatherSource) -> Fields:
    """Per-grid-point mean over all the source's states (summed in float64).

    Args:
        source: the states.

    Returns:
        float32 `Fields` of every surface and atmospheric variable the records hold.
    """
    sums: dict[str, dict[str, np.ndarray]] = {"surf": {}, "atmos": {}}
    for i in range(len(source.records)):
        record = source.records[i]
        for group in ("surf", "atmos"):
            for name, x in record.get(group, {}).items():
                sums[group][name] = sums[group].get(name, 0.0) + np.asarray(x, np.float64)
    n = len(source.records)
    return {g: {k: (v / n).astype(np.float32) for k, v in d.items()} for g, d in sums.items()}


def climatology_kind(climatology: Climatology, source: WeatherSource) -> str:
    """Human-readable description of the climatology an evaluation uses (for the summary).

    Args:
        climatology: the climatology given to the evaluation.
        source: the evaluated states (their mean is the default).

    Returns:
        One line: a `DayOfYearClimatology`'s description, or starting ``source mean`` or
        ``given``.
    """
    if climatology is None:
        return (
            f"source mean: per-grid-point mean of the {len(source.times)} states of "
            f"{source.name} (in-sample, not a multi-year climatology)"
        )
    if isinstance(climatology, DayOfYearClimatology):
        return climatology.description
    if callable(climatology):
        return "given: a function of valid time"
    return "given: time-independent fields"


def climatology_batch(clim: Climatology, valid: np.ndarray, like: Batch) -> Batch:
    """Climatology fields for each valid time, shaped like `like` and cut to its latitudes.

    Args:
        clim: fields, or a function of the valid time (not None: resolve the default first).
        valid: valid times, int seconds, shape `(b,)`.
        like: a batch of shape `(b, 1, ...)` whose variables, grid and metadata to use.

    Returns:
        float32 fields of shape `(b, 1, h, w)` / `(b, 1, c, h, w)` with `like`'s metadata.
    """
    rows = like.spatial_shape[0]
    per_time = [(clim(int(t)) if callable(clim) else clim) for t in valid]

    def pick(group: str, name: str) -> np.ndarray:
        fields = [f[group][name] for f in per_time]
        return np.stack([np.asarray(f, np.float32)[..., :rows, :] for f in fields])[:, None]

    return Batch(
        surf_vars={k: pick("surf", k) for k in like.surf_vars},
        static_vars={},
        atmos_vars={k: pick("atmos", k) for k in like.atmos_vars},
        metadata=like.metadata,
    )


# --------------------------------------------------------------------------------------------
# WB2's layout: reading
# --------------------------------------------------------------------------------------------


class DayOfYearClimatology:
    """A WB2-layout climatology as a function of valid time, on the evaluated source's grid.

    Looks up the valid time's ``dayofyear`` and ``hour`` exactly, as WB2's ACC does (a store
    without ``hour`` is a daily climatology); a store on another grid is interpolated
    bilinearly onto the source's (`data_builders.regrid`). One lookup reads one
    (day, hour) slice; the last two are kept.

    Args:
        ds: the climatology, dims ``dayofyear``, optional ``hour``, ``level`` (atmospheric
            variables), ``latitude`` and ``longitude``; long or short variable names.
        surf: surface variables to read (short names).
        atmos: atmospheric variables to read (short names).
        levels: the source's pressure levels (hPa).
        lat: the source's latitudes (decreasing).
        lon: the source's longitudes (increasing, [0, 360)).
        description: what the climatology is, for the evaluation summary.

    Raises:
        ValueError: a variable or level the store lacks, or a store without ``dayofyear``.
    """

    def __init__(
        self,
        ds: xr.Dataset,
        *,
        surf: Sequence[str],
        atmos: Sequence[str],
        levels: Sequence[float],
        lat: np.ndarray,
        lon: np.ndarray,
        description: str,
    ) -> None:
        ds = _canonical(ds, description)
        missing = [v for v in (*surf, *atmos) if v not in ds]
        if missing:
            raise ValueError(f"{description}: no variable(s) {missing}; has {sorted(ds.data_vars)}")
        self.description = description
        self.surf, self.atmos = tuple(surf), tuple(atmos)
        self.levels = tuple(float(x) for x in levels)
        self.hours = tuple(int(h) for h in ds["hour"].values) if "hour" in ds.dims else None
        self.lat, self.lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
        if self.atmos:
            have = {float(x) for x in ds["level"].values}
            lacking = [x for x in self.levels if x not in have]
            if lacking:
                raise ValueError(f"{description}: no level(s) {lacking} hPa; has {sorted(have)}")
            ds = ds.sel(level=list(self.levels))
        self.ds = ds[[*self.surf, *self.atmos]]
        self.same_grid = _same(ds["latitude"].values, self.lat) and _same(
            ds["longitude"].values, self.lon
        )

    def __call__(self, seconds: int) -> Fields:
        """The fields at a valid time (int seconds since 1970)."""
        return self._fields(*day_and_hour(seconds))

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one instance per evaluation
    def _fields(self, doy: int, hour: int) -> Fields:
        key: dict[str, int] = {"dayofyear": doy}
        if self.hours is not None:
            if hour not in self.hours:
                raise ValueError(
                    f"{self.description}: no hour {hour} (has {list(self.hours)}); WB2 looks "
                    "the valid time's hour up exactly"
                )
            key["hour"] = hour
        ds = self.ds.sel(key).load()
        if not self.same_grid:
            ds = regrid(ds, self.lat, self.lon, "bilinear")
        out: dict[str, dict[str, np.ndarray]] = {"surf": {}, "atmos": {}}
        for name in self.surf:
            out["surf"][name] = (
                ds[name].transpose("latitude", "longitude").values.astype(np.float32)
            )
        for name in self.atmos:
            da = ds[name].transpose("level", "latitude", "longitude")
            out["atmos"][name] = da.values.astype(np.float32)
        return out


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.allclose(a, b, atol=1e-6)


def _canonical(ds: xr.Dataset, what: str) -> xr.Dataset:
    """Short names, latitude decreasing, longitude increasing in [0, 360), level in hPa."""
    if "dayofyear" not in ds.dims:
        raise ValueError(
            f"{what}: not a WB2 climatology (no 'dayofyear' dimension): {dict(ds.sizes)}"
        )
    ds = ds.rename({k: from_wb2(str(k)) for k in ds.data_vars if from_wb2(str(k)) != k})
    ds = ds.rename(
        {k: v for k, v in {"lat": "latitude", "lon": "longitude"}.items() if k in ds.dims}
    )
    lat = ds["latitude"].values
    if lat.size > 1 and lat[0] < lat[-1]:
        ds = ds.isel(latitude=slice(None, None, -1))
    lon = np.mod(ds["longitude"].values, 360.0)
    if not np.array_equal(lon, ds["longitude"].values) or np.any(np.diff(lon) <= 0):
        ds = ds.assign_coords(longitude=lon).sortby("longitude")
    return ds


def open_climatology(
    path: str,
    *,
    surf: Sequence[str],
    atmos: Sequence[str],
    levels: Sequence[float],
    lat: np.ndarray,
    lon: np.ndarray,
) -> DayOfYearClimatology:
    """Open a WB2-layout climatology (zarr store or netCDF file, local path or URL) lazily.

    Args:
        path: a zarr store (local, ``https://``, ``gs://``: `data_builders.zarr_source`) or a
            ``.nc`` file.
        surf, atmos, levels, lat, lon: what to read and the grid to put it on (see
            `DayOfYearClimatology`).

    Returns:
        The climatology; nothing but metadata is read yet.
    """
    if str(path).endswith((".nc", ".nc4")):
        ds = xr.open_dataset(path)
    else:
        from data_builders.zarr_source.store import open_store

        ds, _ = open_store(str(path))
    return DayOfYearClimatology(
        ds,
        surf=surf,
        atmos=atmos,
        levels=levels,
        lat=lat,
        lon=lon,
        description=f"WB2 day-of-year climatology {path}",
    )


# --------------------------------------------------------------------------------------------
# WB2's layout: computing
# --------------------------------------------------------------------------------------------


def window_weights(window_size: int) -> np.ndarray:
    """WB2's triangular weights over the days of a window (odd size), zero at both ends.

    Args:
        window_size: days in the window, odd.

    Returns:
        float64 weights of shape `(window_size,)`, mean 1.

    Raises:
        ValueError: an even or non-positive size.
    """
    if window_size < 1 or window_size % 2 == 0:
        raise ValueError(f"window_size must be odd and positive, not {window_size}")
    half = window_size // 2
    rise = np.linspace(0.0, 1.0, half + 1)
    w = np.concatenate([rise, rise[::-1][1:]])
    return w / w.mean() if w.sum() else np.ones(1)


def _is_leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


def compute_climatology(
    source: WeatherSource,
    *,
    hour_interval: int = 6,
    window_size: int = 61,
    years: tuple[int, int] | None = None,
) -> xr.Dataset:
    """A climatology by day of year and hour, as WB2's ``compute_climatology`` makes it.

    For each hour ``0, hour_interval, ...`` the states at that hour are stacked by year and day
    of year (day 366 of a year without it takes that year's day 365), and each day's value is
    the mean over years and the ``window_size`` days around it (wrapping round the year) with
    WB2's triangular weights, missing days left out of the mean. For whole years this is WB2's
    ``compute_hourly_stat``; days that no state's window reaches are NaN.

    Every record is read once (twice for a leap year that has day 365 but lacks day 366). The
    sums are held in float64 in memory: 366 × hours × fields × 8 bytes, about 47 GB per
    0.25° field at 4 hours, so compute 0.25° climatologies a variable at a time or use WB2's.

    Args:
        source: the states (any `WeatherSource`).
        hour_interval: hours between the climatology's hours, from 0.
        window_size: days in the smoothing window (odd).
        years: first and last year (inclusive) to use; None: every year of the source.

    Returns:
        float32 dataset with dims ``(dayofyear, hour, [level,] latitude, longitude)``, WB2's
        long variable names, and attributes saying how it was made.
    """
    if hour_interval < 1 or 24 % hour_interval:
        raise ValueError(f"hour_interval must divide 24, not {hour_interval}")
    weights = window_weights(window_size)
    hours = list(range(0, 24, hour_interval))
    sums: dict[tuple[str, str], np.ndarray] = {}
    counts = np.zeros((366, len(hours)), np.float64)
    seen: dict[tuple[int, int], dict[int, int]] = {}  # (year, hour) -> {doy: record index}

    def add(record: Mapping, doy: int, h: int) -> None:
        for group in ("surf", "atmos"):
            for name, x in record.get(group, {}).items():
                x = np.asarray(x, np.float64)
                total = sums.get((group, name))
                if total is None:
                    total = sums[(group, name)] = np.zeros((366, len(hours), *x.shape))
                total[doy - 1, h] += x
        counts[doy - 1, h] += 1

    for i, t in enumerate(source.times):
        doy, hour = day_and_hour(int(t))
        year = int(np.datetime64(int(t), "s").astype("datetime64[Y]").astype(int)) + 1970
        if hour not in hours or (years and not years[0] <= year <= years[1]):
            continue
        h = hours.index(hour)
        record = source.records[i]
        add(record, doy, h)
        seen.setdefault((year, h), {})[doy] = i
        if doy == 365 and not _is_leap(year):
            add(record, 366, h)
    for (year, h), days in seen.items():  # a leap year's missing day 366 takes its day 365
        if _is_leap(year) and 365 in days and 366 not in days:
            add(source.records[days[365]], 366, h)
    if not sums:
        raise ValueError(f"{source.name}: no state at hours {hours} in years {years}")

    half = window_size // 2
    offsets = range(-half, half + 1)
    denominator = sum(w * np.roll(counts, -o, axis=0) for o, w in zip(offsets, weights))
    data = {}
    for (group, name), total in sums.items():
        smoothed = sum(w * np.roll(total, -o, axis=0) for o, w in zip(offsets, weights) if w)
        den = denominator.reshape(denominator.shape + (1,) * (total.ndim - 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(den > 0, smoothed / np.where(den > 0, den, 1), np.nan)
        dims = ("dayofyear", "hour", *(("level",) if group == "atmos" else ()))
        data[to_wb2(name)] = ((*dims, "latitude", "longitude"), mean.astype(np.float32))
    coords = {
        "dayofyear": np.arange(1, 367),
        "hour": np.asarray(hours),
        "latitude": np.asarray(source.lat),
        "longitude": np.asarray(source.lon),
    }
    if any(g == "atmos" for g, _ in sums):
        coords["level"] = np.asarray(source.levels, np.float64)
    used = sorted({y for y, _ in seen})
    attrs = {
        "description": "by day of year and hour, as WeatherBench2's compute_hourly_stat",
        "source": source.name,
        "hour_interval": hour_interval,
        "window_size": window_size,
        "years": f"{used[0]}-{used[-1]}" if used else "",
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def write_climatology(clim: xr.Dataset, path: str | Path) -> Path:
    """Write a climatology as a zarr store (format 2, consolidated, as WB2's stores).

    Args:
        clim: what `compute_climatology` returned.
        path: the store, replaced if it exists.

    Returns:
        `path`.
    """
    chunks = {k: {"chunks": (1, 1, *clim[k].shape[2:])} for k in clim.data_vars}
    clim.to_zarr(str(path), mode="w", zarr_format=2, consolidated=True, encoding=chunks)
    return Path(path)


def _source_from_paths(
    paths: Sequence[str], variables: Iterable[str] | None, levels
) -> WeatherSource:
    """A `WeatherSource` of files read with `data_builders.readers.open_dataset` (in memory)."""
    from data_builders.readers import aurora_groups, open_dataset

    ds = open_dataset(list(paths), variables=list(variables) if variables else None, levels=levels)
    groups = aurora_groups(ds)
    secs = ds.time.values.astype("datetime64[s]").astype(np.int64)
    records = [
        {
            "time": int(t),
            "surf": {k: v.values[i] for k, v in groups["surf"].items()},
            "atmos": {k: v.values[i] for k, v in groups["atmos"].items()},
        }
        for i, t in enumerate(secs)
    ]
    levels_ = tuple(ds.level.values.tolist()) if "level" in ds.coords else ()
    return WeatherSource(
        records=records,
        lat=ds.latitude.values,
        lon=ds.longitude.values,
        levels=levels_,
        times=secs,
        name=",".join(str(p) for p in paths),
    )


def _source_from_config(config_path: str, split: str, workdir: str) -> WeatherSource:
    """The configured dataset's split (any registered builder: TFDS, zarr streaming, ...)."""
    import importlib.util

    from data_builders.pipeline import open_source
    from trainers.run import _plain, _prepared_builder, import_modules

    spec = importlib.util.spec_from_file_location("_climatology_config", config_path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    config = module.get_config()
    import_modules(config.get("imports", ()))
    builder_config = _plain(config.data.builder_config)
    builder_config["data_dir"] = builder_config.get("data_dir") or str(Path(workdir) / "datasets")
    return open_source(_prepared_builder(config.data.builder, builder_config), split)


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m trainers.evaluation.climatology compute --out clim.zarr (--paths ... |
    --config configs/x.py --split train) [--hour-interval 6] [--window-size 61]``."""
    parser = argparse.ArgumentParser(prog="python -m trainers.evaluation.climatology")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compute", help="compute a WB2-layout climatology and write it as zarr")
    p.add_argument("--out", required=True, help="zarr store to write")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--paths", nargs="+", help="files or stores data_builders.readers reads")
    src.add_argument("--config", help="a job config: its data builder's --split is read")
    p.add_argument("--split", default="train")
    p.add_argument("--workdir", default=".", help="the job's workdir (datasets/ for builders)")
    p.add_argument("--variables", nargs="*", help="variables to keep (--paths only)")
    p.add_argument("--levels", nargs="*", type=float, help="levels to keep (--paths only)")
    p.add_argument("--hour-interval", type=int, default=6)
    p.add_argument("--window-size", type=int, default=61)
    p.add_argument("--years", nargs=2, type=int, metavar=("FIRST", "LAST"))
    args = parser.parse_args(argv)
    if args.paths:
        source = _source_from_paths(args.paths, args.variables, args.levels)
    else:
        source = _source_from_config(args.config, args.split, args.workdir)
    clim = compute_climatology(
        source,
        hour_interval=args.hour_interval,
        window_size=args.window_size,
        years=tuple(args.years) if args.years else None,
    )
    path = write_climatology(clim, args.out)
    print(f"{path}: {dict(clim.sizes)} {sorted(clim.data_vars)}")
    return path


if __name__ == "__main__":
    main()
