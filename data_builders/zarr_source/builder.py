"""`ZarrBuilder`: a dataset streamed from a zarr store, with no copy anywhere.

The store is opened lazily through `store.open_store` and put into the canonical form of
`data_builders.readers` by the readers' own functions (names, latitude decreasing, longitude in
[0, 360), levels in hPa, units and magnitude checks), so a record equals what
`readers.open_dataset` returns for the same store and time (with the same `fill_nan` and
`init_time`). Zarr v2 and v3 stores, any chunking. `download_and_prepare` only validates
the store and computes the statistics of variables outside Aurora's table (cached in
`data_dir`); `as_data_source(split)` returns a `WeatherSource` whose records are read per time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from aurora.normalisation import aurora_stats
from aurora.variables import ATMOS_VARS, AURORA_LEVELS, STATIC_VARS, SURF_VARS
from data_builders.builders import check_disjoint, global_grid, normalise_splits
from data_builders.download.catalog import WB2_ERA5_URL
from data_builders.download.zarr_mirror import select_static_time, source_names
from data_builders.errors import DataError
from data_builders.pipeline import WeatherSource
from data_builders.readers import (
    STATIC_KEYS,
    Fill,
    canonical_lazy,
    category_of,
    check_units,
    forecast_lead_dim,
    handle_nans,
    indicator_fields,
    regrid,
    select_lazy,
)
from data_builders.regrid import Regridder
from data_builders.stats import RunningStats, stat_key
from data_builders.zarr_source.records import Reader, Records
from data_builders.zarr_source.store import CheckedStore, open_store

__all__ = ["ARCO_ERA5_URL", "PRESETS", "Preset", "ZarrBuilder"]

log = logging.getLogger(__name__)

ARCO_ERA5_URL = (
    "https://storage.googleapis.com/gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3"
)


@dataclasses.dataclass(frozen=True)
class Preset:
    """A public store's layout: where it is and what it holds.

    Both public ERA5 stores use the CDS long names (``2m_temperature``, ``geopotential``,
    ``geopotential_at_surface``, ``land_sea_mask``), which `readers` maps to Aurora's names;
    they differ in latitude order (WeatherBench2 runs south to north), step (6 h vs 1 h), levels
    (13 vs 37) and static fields (WeatherBench2: no time axis; ARCO-ERA5: one per hour, of
    which the first is taken). The URLs are HTTPS so that only aiohttp is needed; the same
    objects are ``gs://weatherbench2/...`` and ``gs://gcp-public-data-arco-era5/...`` with gcsfs.
    """

    url: str
    levels: tuple[float, ...]  # the default levels: Aurora's 13, which both stores hold


PRESETS = {
    "weatherbench2": Preset(WB2_ERA5_URL, tuple(float(x) for x in AURORA_LEVELS)),
    "arco-era5": Preset(ARCO_ERA5_URL, tuple(float(x) for x in AURORA_LEVELS)),
}

_DEFAULT_SPLITS = {"train": (None, None)}


class ZarrBuilder:
    """A training dataset streamed from a zarr store (WeatherBench2, ARCO-ERA5, any URL).

    Args:
        url: Local path, ``file://``, ``https://`` or ``gs://`` URL of the store; None: the
            preset's.
        preset: ``"weatherbench2"`` or ``"arco-era5"``: the public store's URL.
        surf_vars, atmos_vars: Aurora names (``2t``, ``z``, ``r`` ...) or the store's own names.
        static_vars: Static fields by Aurora name (``lsm``, ``z``, ``slt``).
        variables: Instead of `surf_vars`/`atmos_vars`: all dynamic variables, classified by
            whether the store gives them a level axis.
        levels: Pressure levels (hPa) of the atmospheric variables.
        splits: ``{name: (start, end) | [(start, end), ...]}``, inclusive ISO times, None = open.
        resolution: Regrid on the fly to Aurora's global grid of this spacing (degrees).
        regrid_method: ``"bilinear"`` or ``"conservative"``.
        static_url: Store of the static fields; None: `url`.
        stats: ``{key: (mean, std)}`` for variables outside Aurora's table (``"r_500"``); keys
            not given are computed from `stats_samples` times of `stats_split`.
        stats_split: The split the statistics are computed from.
        stats_samples: Times sampled (evenly over the split) for the statistics.
        data_dir: Where computed statistics are cached; None: computed on every prepare.
        step_hours: Keep only times on this step (``6``: 00, 06, 12, 18 UTC); None: all.
        storage_options: fsspec options (``gs://`` is anonymous unless `token` is given).
        read_ahead: Records read ahead of the last one asked for.
        max_workers: Variables of a record read at once.
        retries: Extra attempts after a transient error (HTTP 5xx, reset, timeout).
        retry_wait: Seconds before the first retry, doubled before each further one.
        allow_missing_chunks: Let missing chunks read as the fill value (NaNs are still refused
            unless `fill_nan` fills them).
        fill_nan: How to fill NaNs, as `readers.open_dataset` does: ``"zero"``, ``"mean"`` (of
            each 2-D field of each time), a number, or a mapping from variable (dataset key such
            as ``"2t"`` or ``"z_sfc"``, or the store's name) to one of those; None: a NaN is a
            `DataError` naming the store, variable and time.
        init_time: The forecast to read from a forecast store (WeatherBench2's layout, with a
            ``prediction_timedelta`` axis): its leads become the valid times. Needed when the
            store holds several inits.
    """

    name = "zarr"

    def __init__(
        self,
        url: str | None = None,
        *,
        preset: str | None = None,
        surf_vars: Sequence[str] = SURF_VARS,
        atmos_vars: Sequence[str] = ATMOS_VARS,
        static_vars: Sequence[str] = STATIC_VARS,
        variables: Sequence[str] | None = None,
        levels: Sequence[float] | None = None,
        splits: Mapping[str, Any] | None = None,
        resolution: float | None = None,
        regrid_method: str = "bilinear",
        static_url: str | None = None,
        stats: Mapping[str, Sequence[float]] | None = None,
        stats_split: str = "train",
        stats_samples: int = 8,
        data_dir: str | Path | None = None,
        step_hours: float | None = None,
        storage_options: Mapping[str, Any] | None = None,
        read_ahead: int = 2,
        max_workers: int = 8,
        retries: int = 3,
        retry_wait: float = 0.5,
        allow_missing_chunks: bool = False,
        fill_nan: Fill | Mapping[str, Fill] | None = None,
        init_time: Any = None,
    ) -> None:
        if preset is not None and preset not in PRESETS:
            raise DataError(f"zarr: unknown preset {preset!r}; known: {sorted(PRESETS)}")
        p = PRESETS.get(preset) if preset else None
        if url is None and p is None:
            raise DataError("zarr: give url= or preset=")
        self.url = str(url if url is not None else p.url)
        self.static_url = str(static_url) if static_url is not None else self.url
        self._variables = None if variables is None else tuple(map(str, variables))
        self._surf, self._atmos = tuple(map(str, surf_vars)), tuple(map(str, atmos_vars))
        self.static_vars = tuple("z" if v == "z_sfc" else str(v) for v in static_vars)
        bad = [v for v in self.static_vars if v not in STATIC_KEYS]
        if bad:
            raise DataError(f"zarr: static_vars {bad} unknown; use {sorted(STATIC_KEYS)}")
        default_levels = p.levels if p else tuple(float(x) for x in AURORA_LEVELS)
        self.levels_wanted = tuple(float(x) for x in (levels or default_levels))
        self._splits = normalise_splits(splits or _DEFAULT_SPLITS)
        names = [n for n, _ in self._splits]
        if not names or len(set(names)) != len(names):
            raise DataError(f"zarr: split names must be unique and non-empty: {names}")
        check_disjoint(self._splits)
        self.resolution = None if resolution is None else float(resolution)
        self.regrid_method = regrid_method
        self._given_stats = {k: (float(m), float(s)) for k, (m, s) in (stats or {}).items()}
        self.stats_split, self.stats_samples = stats_split, int(stats_samples)
        if stats_split not in names:
            raise DataError(f"zarr: stats_split {stats_split!r} is not a split {names}")
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.step_hours = step_hours
        self._store_kw = dict(
            storage_options=storage_options,
            retries=retries,
            retry_wait=retry_wait,
            allow_missing_chunks=allow_missing_chunks,
        )
        self.read_ahead, self.max_workers = int(read_ahead), int(max_workers)
        fills = fill_nan.values() if isinstance(fill_nan, Mapping) else [fill_nan]
        for how in fills:
            if how is not None:
                _check_fill(how, self.url)
        self.fill_nan = dict(fill_nan) if isinstance(fill_nan, Mapping) else fill_nan
        self.init_time = None if init_time is None else str(init_time)
        self._opened: _Opened | None = None
        self._stats: dict[str, tuple[float, float]] | None = None

    # ---- the builder protocol -------------------------------------------------------------

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names, in config order."""
        return tuple(n for n, _ in self._splits)

    def download_and_prepare(self) -> None:
        """Check the store (variables, levels, times, units) and compute missing statistics.

        Reads only metadata, the first time of the first split (units and magnitudes), the
        static fields and, once per `data_dir`, `stats_samples` times of the stats split.

        Raises:
            DataError: Naming the store and the variable, level or time that is missing or bad.
        """
        self._open()
        self.stats()

    def as_data_source(self, split: str) -> WeatherSource:
        """The records of `split`, read lazily from the store.

        Args:
            split: A split name.

        Returns:
            WeatherSource: records ``{"time", "surf": {k: (h, w)}, "atmos": {k: (levels, h, w)}}``
            float32, latitude decreasing, longitude in [0, 360); static fields and statistics.
        """
        o = self._open()
        if split not in o.positions:
            raise DataError(f"{self.url}: no split {split!r}; have {list(self.splits)}")
        records = Records(self._reader(o), o.positions[split], self.read_ahead)
        return WeatherSource(
            records=records,
            lat=o.lat,
            lon=o.lon,
            levels=o.levels,
            times=records.times,
            static=o.static,
            stats=self.stats(),
            name=f"{self.url} [{split}]",
        )

    def stats(self) -> dict[str, tuple[float, float]]:
        """`(mean, std)` per key for the variables outside Aurora's table (config first).

        Returns:
            ``{"r_500": (mean, std), ...}``: the keys given in the config, plus computed ones
            for every other variable (and level) Aurora's table lacks.
        """
        if self._stats is None:
            self._stats = self._compute_stats()
        return dict(self._stats)

    # ---- opening --------------------------------------------------------------------------

    def _open(self) -> _Opened:
        if self._opened is None:
            self._opened = self._open_store()
        return self._opened

    def _open_store(self) -> _Opened:
        raw, store = open_store(self.url, **self._store_kw)
        surf, atmos = self._surf, self._atmos
        if self._variables is not None:
            found = source_names(raw, self._variables, self.url, static=False)
            surf = tuple(v for v in self._variables if not _has_level(raw[found[v]]))
            atmos = tuple(v for v in self._variables if _has_level(raw[found[v]]))
        names = source_names(raw, surf + atmos, self.url, static=False)
        dynamic = _Dynamic(
            url=self.url,
            store_kw=self._store_kw,
            surf=tuple(names[v] for v in surf),
            atmos=tuple(names[v] for v in atmos),
            levels=self.levels_wanted,
            init_time=self.init_time,
        )
        ds = dynamic.canonical(raw)
        key = {str(da.attrs["source_name"]): str(k) for k, da in ds.data_vars.items()}
        surf_keys = tuple(key[n] for n in dynamic.surf)
        atmos_keys = tuple(key[n] for n in dynamic.atmos)
        positions = self._positions(ds)
        first = positions[self.splits[0]][0]
        when = str(ds["time"].values[first])[:19]
        check_units(self._load(ds.isel(time=[first]), f"time {when}"), self.url)  # type: ignore[arg-type]
        lat_s, lon_s = ds["latitude"].values, ds["longitude"].values
        lat, lon, regridder = lat_s, lon_s, None
        if self.resolution is not None:
            lat, lon = global_grid(self.resolution)
            if not _same(lat_s, lat) or not _same(lon_s, lon):
                regridder = Regridder(lat_s, lon_s, lat, lon, self.regrid_method)
        levels = tuple(float(x) for x in ds["level"].values) if atmos_keys else ()
        static, static_names = self._read_static(lat, lon)
        fill, names_read = self._fills(ds), _names(ds) | static_names
        if isinstance(self.fill_nan, Mapping) and set(self.fill_nan) - names_read:
            raise DataError(
                f"{self.url}: fill_nan names {sorted(set(self.fill_nan) - names_read)}, which "
                f"are not read; the variables read are {sorted(names_read)}"
            )
        return _Opened(
            ds=ds,
            store=store,
            dynamic=dynamic,
            surf=surf_keys,
            atmos=atmos_keys,
            fill=fill,
            positions=positions,
            lat=np.asarray(lat, np.float64),
            lon=np.asarray(lon, np.float64),
            levels=levels,
            regridder=regridder,
            static=static,
        )

    def _fills(self, ds: xr.Dataset) -> dict[str, Fill]:
        """`fill_nan` per dataset key; a mapping may name a variable by key or store name."""
        if self.fill_nan is None:
            return {}
        if not isinstance(self.fill_nan, Mapping):
            return dict.fromkeys(map(str, ds.data_vars), self.fill_nan)
        out = {}
        for k, da in ds.data_vars.items():
            for name in (str(k), str(da.attrs.get("source_name", k))):
                if name in self.fill_nan:
                    out[str(k)] = self.fill_nan[name]
        return out

    def _positions(self, ds: xr.Dataset) -> dict[str, np.ndarray]:
        """Each split's positions along the store's time axis (inclusive ranges, on the step)."""
        index = pd.DatetimeIndex(ds["time"].values)
        keep = np.ones(len(index), bool)
        if self.step_hours is not None:
            step = round(float(self.step_hours) * 3600)
            seconds = index.values.astype("datetime64[s]").astype(np.int64)
            keep = seconds % step == 0
        out = {}
        for name, ranges in self._splits:
            mask = np.zeros(len(index), bool)
            for start, end in ranges:
                mask[index.slice_indexer(start, end)] = True
            pos = np.flatnonzero(mask & keep)
            if not pos.size:
                span = f"{index[0]}..{index[-1]}" if len(index) else "no times"
                raise DataError(
                    f"{self.url}: split {name} {list(ranges)} selects no times; "
                    f"the store covers {span}"
                )
            out[name] = pos
        return out

    def _load(self, ds: xr.Dataset, what: str, url: str | None = None) -> xr.Dataset:
        try:
            return ds.load()
        except Exception as e:
            raise DataError(
                f"{url or self.url}: cannot read {what} ({type(e).__name__}: {e})"
            ) from e

    def _read_static(
        self, lat: np.ndarray, lon: np.ndarray
    ) -> tuple[dict[str, np.ndarray], set[str]]:
        """Static fields (Aurora names), checked and filled like `readers` does, on the output
        grid; and the names (keys and store names) they can be given in `fill_nan` by."""
        if not self.static_vars:
            return {}, set()
        url = self.static_url
        raw, _ = open_store(url, **self._store_kw)
        # Indicator fields (`slt_3`) come from their categorical field, before any regrid.
        request = list(dict.fromkeys(category_of(v) or v for v in self.static_vars))
        names = source_names(raw, request, url, static=True)
        sub = select_static_time(raw[list(names.values())], None)
        ds = canonical_lazy(sub, url, 0, None)  # type: ignore[arg-type]
        ds = self._load(ds, "static fields", url)
        check_units(ds, url)  # type: ignore[arg-type]
        ds = handle_nans(ds, url, self._fills(ds))  # type: ignore[arg-type]
        read = _names(ds)
        ds = indicator_fields(ds, [STATIC_KEYS[v] for v in self.static_vars])
        if not (_same(ds["latitude"].values, lat) and _same(ds["longitude"].values, lon)):
            ds = regrid(ds, lat, lon, method=self.regrid_method)  # type: ignore[arg-type]
        fields = {
            str(da.attrs.get("aurora_name", k)): np.ascontiguousarray(da.values, np.float32)
            for k, da in ds.data_vars.items()
        }
        return fields, read | _names(ds)

    def _reader(self, o: _Opened) -> Reader:
        return Reader(
            o.dynamic,
            o.surf,
            o.atmos,
            self.url,
            regridder=o.regridder,
            max_workers=self.max_workers,
            fill_nan=o.fill,
            opened=(o.ds, o.store),
        )

    # ---- statistics -----------------------------------------------------------------------

    def _needed_keys(self, o: _Opened) -> list[str]:
        table = aurora_stats()
        keys = [stat_key(k) for k in o.surf]
        keys += [stat_key(k, lev) for k in o.atmos for lev in o.levels]
        keys += [stat_key(k) for k in o.static]
        return [k for k in keys if k not in table and k not in self._given_stats]

    def _compute_stats(self) -> dict[str, tuple[float, float]]:
        o = self._open()
        missing = self._needed_keys(o)
        out = dict(self._given_stats)
        if not missing:
            return out
        positions = o.positions[self.stats_split]
        n = min(self.stats_samples, len(positions))
        sample = positions[np.unique(np.linspace(0, len(positions) - 1, n).round().astype(int))]
        ident = {
            "url": self.url,
            "static_url": self.static_url,
            "surf": list(o.surf),
            "atmos": list(o.atmos),
            "levels": list(o.levels),
            "grid": [len(o.lat), len(o.lon), float(o.lat[0]), float(o.lon[-1])],
            "regrid_method": self.regrid_method,
            "fill_nan": {k: str(v) for k, v in sorted(o.fill.items())},
            "init_time": self.init_time,
            "times": o.ds["time"].values[sample].astype("datetime64[s]").astype(np.int64).tolist(),
            "keys": missing,
        }
        digest = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        cache = None if self.data_dir is None else self.data_dir / f"zarr_stats_{digest}.json"
        if cache is not None and cache.exists():
            try:
                stored = json.loads(cache.read_text())["stats"]
                return {**{k: (float(m), float(s)) for k, (m, s) in stored.items()}, **out}
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("%s: unreadable statistics cache (%s); recomputing", cache, e)
        acc = RunningStats()
        reader = self._reader(o)
        try:
            for t in sample:
                rec = reader.read(int(t))
                acc.add_example(rec["surf"], rec["atmos"], o.levels)
        finally:
            reader.close()
        for name, field in o.static.items():
            acc.add_field(stat_key(name), field)
        computed = {k: v for k, v in acc.result().items() if k in missing}
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"config": ident, "stats": computed}, indent=1))
            tmp.replace(cache)
        return {**computed, **out}


@dataclasses.dataclass(frozen=True)
class _Dynamic:
    """How to open a store's dynamic variables in canonical form: the `Reader`'s opener.

    Only a URL and names, no open store, so that it pickles: Grain's worker processes get a
    copy and open the store themselves.
    """

    url: str
    store_kw: Mapping[str, Any]
    surf: tuple[str, ...]  # the store's names of the surface and atmospheric variables
    atmos: tuple[str, ...]
    levels: tuple[float, ...]
    init_time: Any

    def __call__(self) -> tuple[xr.Dataset, CheckedStore]:
        """Open the store: the canonical lazy dataset (`canonical`) and the store."""
        raw, store = open_store(self.url, **self.store_kw)
        return self.canonical(raw), store

    def canonical(self, raw: xr.Dataset) -> xr.Dataset:
        """`raw`'s variables in `readers` form, levels selected, dims in canonical order; lazy.

        Raises:
            DataError: A variable with the wrong dimensions, a missing level, a forecast store
                with several inits and no `init_time`.
        """
        sub = raw[list(self.surf + self.atmos)]
        lead = forecast_lead_dim(sub)
        if lead is not None and self.init_time is None and sub.sizes.get("time", 1) > 1:
            inits = sub["time"].values.astype("datetime64[s]")
            raise DataError(
                f"{self.url}: a forecast store ({len(inits)} init times {inits[0]}..{inits[-1]}, "
                f"{sub.sizes[lead]} leads along {lead!r}); pass init_time= (e.g. "
                f"init_time='{inits[0]}') to stream one forecast by valid time"
            )
        ds = canonical_lazy(sub, self.url, 0, self.init_time)  # type: ignore[arg-type]
        ds = select_lazy(ds, self.url, None, self.levels if self.atmos else None, None)  # type: ignore[arg-type]
        for k, da in list(ds.data_vars.items()):
            atmos = da.attrs["source_name"] in self.atmos
            want = ("time", "level", "latitude", "longitude") if atmos else None
            want = want or ("time", "latitude", "longitude")
            if set(da.dims) != set(want):
                group = "an atmospheric" if atmos else "a surface"
                raise DataError(
                    f"{self.url}: variable {da.attrs['source_name']} ({k}) has dims "
                    f"{da.dims}; {group} variable needs {want}"
                )
            ds[k] = da.transpose(*want)
        if "time" not in ds.dims:
            raise DataError(f"{self.url}: no time axis")
        return ds


@dataclasses.dataclass(frozen=True, eq=False)
class _Opened:
    """What opening the store found: the lazy canonical dataset and its output grid."""

    ds: xr.Dataset
    store: CheckedStore
    dynamic: _Dynamic
    surf: tuple[str, ...]
    atmos: tuple[str, ...]
    fill: dict[str, Fill]
    positions: dict[str, np.ndarray]
    lat: np.ndarray
    lon: np.ndarray
    levels: tuple[float, ...]
    regridder: Regridder | None
    static: dict[str, np.ndarray]


def _names(ds: xr.Dataset) -> set[str]:
    """The keys of `ds` and the store's names of its variables."""
    return {str(k) for k in ds.data_vars} | {
        str(da.attrs["source_name"]) for da in ds.data_vars.values() if "source_name" in da.attrs
    }


def _check_fill(how: Any, url: str) -> None:
    if how in ("zero", "mean") or (isinstance(how, (int, float)) and not isinstance(how, bool)):
        return
    raise DataError(f"{url}: fill_nan={how!r}; use 'zero', 'mean' or a number (or a mapping)")


def _has_level(da: xr.DataArray) -> bool:
    return any(d in da.dims for d in ("level", "pressure_level", "isobaricInhPa", "plev"))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.allclose(a, b, atol=1e-6))
