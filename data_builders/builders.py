"""TFDS builders `era5` and `hres`: canonical files -> array_record datasets, one example per time.

Weather files are big and slow to decode; the training pipeline wants random access to one valid
time at a time. The builders read sources through `readers.open_dataset` in time chunks, regrid
them, and write one example per valid time to ``array_record`` files, with normalisation
statistics, the time index and the static fields alongside (`WeatherMetadata`). They work without
TensorFlow: build with ``download_and_prepare()``, read with ``as_data_source(split)``; never call
``as_dataset()`` or ``tfds.list_builders()``, which import it. The builders stay out of TFDS's
global registry; configs name them through `data_builders.registry`. See `WeatherBuilder` for an
example, the example schema and how records are ordered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
import xarray as xr
from array_record.python import array_record_data_source, array_record_module
from etils import epath
from tensorflow_datasets.core import hashing as tfds_hashing
from tensorflow_datasets.core import shuffle as tfds_shuffle

from aurora import variables
from aurora.jsonable import jsonable
from data_builders.readers import (
    ATMOS_VARS,
    STATIC_KEYS,
    STATIC_VARS,
    SURFACE_VARS,
    DataError,
    open_dataset,
    regrid,
)
from data_builders.stats import RunningStats, stat_key

__all__ = [
    "AURORA_LEVELS",
    "Era5",
    "Hres",
    "WeatherBuilder",
    "WeatherConfig",
    "WeatherMetadata",
    "global_grid",
    "make_config",
    "patch_code_path",
    "record_order",
]

log = logging.getLogger(__name__)

# Floats, as `make_config` stores levels (the default is hashed into the dataset folder name).
AURORA_LEVELS = tuple(float(p) for p in variables.AURORA_LEVELS)
FORMAT_VERSION = 2  # 2: one raw little-endian float32 blob per record (`record_layout`)
CODECS = ("none", "zstd", "lz4")
_ZSTD_LEVEL = 3
_STATIC_FILE = "static.npz"
_METADATA_FILE = "metadata.json"
_NO_TIME = "no data left"  # readers' message when no file has a time in the selected range

TimeRange = tuple[str | None, str | None]


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class WeatherConfig(tfds.core.BuilderConfig):
    """What to build: sources, variables, levels, grid, splits. Use `make_config` to create one.

    Tuples only (the config is hashed to name the dataset folder and stored in its metadata).
    `splits` is ``((split, ((start, end), ...)), ...)``: ISO times, inclusive, None = open end.
    """

    paths: tuple[str, ...] = ()
    static_paths: tuple[str, ...] = ()
    surf_vars: tuple[str, ...] = SURFACE_VARS
    atmos_vars: tuple[str, ...] = ATMOS_VARS
    static_vars: tuple[str, ...] = STATIC_VARS
    levels: tuple[float, ...] | None = AURORA_LEVELS
    resolution: float | None = None
    regrid_method: str = "bilinear"
    splits: tuple[tuple[str, tuple[TimeRange, ...]], ...] = (("train", ((None, None),)),)
    stats_split: str = "train"
    chunk_hours: int = 24
    fill_nan: Any = None
    member: int = 0
    init_time: str | None = None
    codec: str = "none"


_BASE_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}


def config_dict(config: WeatherConfig) -> dict[str, Any]:
    """The content fields of a config as JSON-able data (what the folder hash and check use).

    Args:
        config: A builder config.

    Returns:
        Field name -> value, with tuples turned into lists as in ``metadata.json``.
    """
    out = {}
    for f in dataclasses.fields(config):
        if f.name not in _BASE_FIELDS:
            out[f.name] = getattr(config, f.name)
    return json.loads(json.dumps(out))  # tuples -> lists, exactly as stored in metadata.json


def make_config(name: str | None = None, **fields: Any) -> WeatherConfig:
    """Normalise user input (lists, paths, dict splits, numbers) into a hashable `WeatherConfig`.

    Args:
        name: The config (and dataset folder) name; None names it by a hash of its content.
        **fields: `WeatherConfig` fields; lists, paths, ``{split: (start, end)}`` mappings and
            numbers are accepted and normalised (absolute paths, ISO times, float levels).

    Returns:
        The validated config.

    Raises:
        TypeError: For an unknown field.
        DataError: For a config that cannot be built (e.g. overlapping splits, a bad time).
    """
    unknown = set(fields) - {f.name for f in dataclasses.fields(WeatherConfig)} - _BASE_FIELDS
    if unknown:
        known = sorted({f.name for f in dataclasses.fields(WeatherConfig)} - _BASE_FIELDS)
        raise TypeError(f"unknown builder option(s) {sorted(unknown)}; known: {known}")
    f = dict(fields)
    for key in ("paths", "static_paths"):
        if key in f:
            f[key] = _abs_paths(f[key])
    for key in ("surf_vars", "atmos_vars", "static_vars"):
        if key in f:
            f[key] = tuple(str(v) for v in f[key])
    if "static_vars" in f:
        f["static_vars"] = tuple("z" if v == "z_sfc" else v for v in f["static_vars"])
    if f.get("levels") is not None:
        f["levels"] = tuple(float(x) for x in f["levels"])
    if f.get("resolution") is not None:
        f["resolution"] = float(f["resolution"])
    if "splits" in f:
        f["splits"] = _normalise_splits(f["splits"])
    if isinstance(f.get("fill_nan"), Mapping):
        f["fill_nan"] = tuple(sorted((str(k), v) for k, v in f["fill_nan"].items()))
    if f.get("init_time") is not None:
        f["init_time"] = _iso(f["init_time"])
    config = WeatherConfig(name="pending", **f)
    _validate(config)
    if name is None:
        digest = json.dumps(config_dict(config), sort_keys=True).encode()
        name = "c" + hashlib.sha1(digest).hexdigest()[:12]
    return dataclasses.replace(config, name=name)


def _abs_paths(paths: Any) -> tuple[str, ...]:
    """Absolute path strings: the stored config (and the folder hash) must not depend on cwd."""
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    return tuple(str(Path(p).expanduser().resolve()) for p in items)


def _iso(t: Any) -> str:
    """Any time label -> ISO string at second precision (for hashing and storing)."""
    try:
        return str(np.datetime64(t, "s"))
    except (ValueError, TypeError) as e:
        raise DataError(f"builder config: cannot read {t!r} as a time ({e})") from e


def _normalise_splits(splits: Any) -> tuple[tuple[str, tuple[TimeRange, ...]], ...]:
    """{"train": (start, end) | [(start, end), ...]} -> tuples of ISO strings, in given order."""
    items = splits.items() if isinstance(splits, Mapping) else splits
    out = []
    for name, ranges in items:
        if len(ranges) == 2 and not isinstance(ranges[0], (tuple, list)):
            ranges = [ranges]
        norm = tuple(
            (None if a is None else _iso(a), None if b is None else _iso(b)) for a, b in ranges
        )
        out.append((str(name), norm))
    return tuple(out)


def _validate(config: WeatherConfig) -> None:
    """Refuse configs that cannot build a sound dataset, before reading any file."""
    if not config.paths:
        raise DataError("builder config: no source paths given (paths=...)")
    if not config.surf_vars and not config.atmos_vars:
        raise DataError("builder config: no surface or atmospheric variables")
    bad = [v for v in config.static_vars if v not in STATIC_KEYS]
    if bad:
        raise DataError(f"builder config: static_vars {bad} unknown; use {sorted(STATIC_KEYS)}")
    if config.regrid_method not in ("bilinear", "conservative"):
        raise DataError(f"builder config: regrid_method {config.regrid_method!r} unknown")
    if config.chunk_hours <= 0:
        raise DataError("builder config: chunk_hours must be positive")
    if config.codec not in CODECS:
        raise DataError(f"builder config: codec {config.codec!r} unknown; use one of {CODECS}")
    _codec_module(config.codec)  # refuse a missing compression package before building
    names = [n for n, _ in config.splits]
    if not names or len(set(names)) != len(names):
        raise DataError(f"builder config: split names must be unique and non-empty: {names}")
    if config.stats_split not in names:
        raise DataError(
            f"builder config: stats_split {config.stats_split!r} is not a split {names}"
        )
    _check_disjoint(config.splits)


def _bounds(r: TimeRange) -> tuple[np.datetime64, np.datetime64]:
    lo = np.datetime64("0001-01-01T00:00:00") if r[0] is None else np.datetime64(r[0])
    hi = np.datetime64("9999-12-31T23:59:59") if r[1] is None else np.datetime64(r[1])
    if hi < lo:
        raise DataError(f"builder config: time range {r} ends before it starts")
    return lo, hi


def _check_disjoint(splits: tuple[tuple[str, tuple[TimeRange, ...]], ...]) -> None:
    """Train/validation/test overlapping in time would leak: refuse it."""
    flat = [(name, r, *_bounds(r)) for name, ranges in splits for r in ranges]
    for i, (n1, r1, lo1, hi1) in enumerate(flat):
        for n2, r2, lo2, hi2 in flat[i + 1 :]:
            if lo1 <= hi2 and lo2 <= hi1:
                raise DataError(f"builder config: split {n1} {r1} overlaps split {n2} {r2}")


# --------------------------------------------------------------------------------------------
# Metadata: metadata.json + static.npz
# --------------------------------------------------------------------------------------------


class WeatherMetadata(tfds.core.Metadata):
    """`builder.info.metadata`: JSON items in ``metadata.json``, static fields in ``static.npz``.

    Both live in ``<data_dir>/<builder>/<config>/<version>/``:

    * ``metadata.json``: ``stats`` (``{"2t": [mean, std], "z_500": [...], "lsm": [...]}`` over
      the ``stats_split`` with `data_builders.stats.RunningStats`: float64, population std,
      unweighted), ``times`` (``{split: [seconds, ...]}`` in record order), the grid (``lat``,
      ``lon``), ``levels``, the variable lists, ``units``, ``loss_weight`` (Aurora's dataset
      weight gamma: ERA5 2.0, others 1.0) and the ``config`` it was built from.
    * ``static.npz``: ``lsm``, ``z`` (surface geopotential; ``z_sfc`` in readers) and ``slt`` as
      float32 ``(h, w)`` on the dataset's grid, keyed by Aurora name. One small file next to the
      records rather than a second builder, so statics are never paired with another grid.

    `WeatherBuilder.stats`, `static`, `grid` and `times` read them.

    A `tfds.core.MetadataDict` would be replaced by a JSON-only lazy dict when a built dataset is
    reopened, losing the static arrays; a direct `tfds.core.Metadata` subclass is reloaded with
    its own `load_metadata`.
    """

    def save_metadata(self, data_dir: Any) -> None:
        """Write both files into the (incomplete) dataset folder TFDS is finishing."""
        path = epath.Path(data_dir)
        items = {k: v for k, v in self.items() if k != "static"}
        (path / _METADATA_FILE).write_text(json.dumps(items, default=jsonable))
        static = self.get("static") or {}
        if static:
            buf = io.BytesIO()
            np.savez(buf, **{k: np.asarray(v, np.float32) for k, v in static.items()})
            (path / _STATIC_FILE).write_bytes(buf.getvalue())

    def load_metadata(self, data_dir: Any) -> None:
        """Read both files back (TFDS calls this when it opens a built dataset)."""
        path = epath.Path(data_dir)
        self.clear()
        self.update(json.loads((path / _METADATA_FILE).read_text()))
        static_path = path / _STATIC_FILE
        if static_path.exists():
            with np.load(io.BytesIO(static_path.read_bytes())) as npz:
                self["static"] = {k: npz[k] for k in npz.files}


# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


class WeatherBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared builder: canonical files -> one array_record example per valid time.

    Configured by a `WeatherConfig` or by its fields as keyword arguments::

        builder = Era5(
            data_dir="~/aurora_data",
            paths=["era5_sfc_2020.nc", "era5_pl_2020.nc"],  # anything readers.open_dataset reads
            static_paths=["era5_static.nc"],  # lsm / z (surface) / slt
            resolution=0.25,  # None keeps the source grid
            splits={"train": ("2020-01-01", "2020-10-31T18"),  # inclusive; a list is a union
                    "validation": ("2020-11-01", "2020-12-31T18")},
        )  # variables and levels default to Aurora's (aurora.variables)
        builder.download_and_prepare()
        records = builder.as_data_source("train")  # len(records), records[i]

    Without a `name`, the config is named by a hash of its content (``c1a2b3c4d5e6``), so two
    different configs never share a folder; a named config whose folder holds a dataset built
    from a different config is refused (`DataError`), never silently reused.

    Record schema, as ``as_data_source(split)[i]`` returns it (one per valid time)::

        {"time": int64 seconds since 1970-01-01T00 UTC,
         "surf":  {"2t": float32 (h, w), ...},         # present when surf_vars is not empty
         "atmos": {"z": float32 (levels, h, w), ...}}  # present when atmos_vars is not empty

    On disk (record format 2) an example is a TFDS example of two features: ``time`` and
    ``data``, one blob holding every field as little-endian float32, C order, surface variables
    then atmospheric ones, each group in config order; ``record_layout`` in the metadata lists
    ``[group, name, shape, byte offset]`` per field. The blob is compressed with the config's
    ``codec`` (``"none"``, ``"zstd"`` or ``"lz4"``; array_record's own compression is off), and
    `WeatherRecords` reads it without TFDS's feature decoding: the fields are `np.frombuffer`
    views of the record's bytes (read-only), so a record costs one read (plus one decompression).

    Records are shuffled at write time by TFDS's shuffler (sorted by an md5 hash of key and split
    name; it spills to buckets on disk, so a build's memory stays bounded). The key is the
    timestamp, so the record order is known when a split is written: it is stored in the
    metadata (``times``) and checked after the build and by the pipeline on every record it reads.
    TFDS spills with ``tf.io.gfile``; without TensorFlow `download_and_prepare` lends it
    plain-file equivalents (`_tf_free_shuffler`). Sources are read in time chunks of
    ``chunk_hours`` (default one day), so a year at 0.25 degrees never sits in memory at once (a
    split range with an open end is read in one go).

    Subclasses set `name`, `DESCRIPTION`, `LOSS_WEIGHT` and may change config defaults through
    `DEFAULTS`. `_read_dynamic` / `_read_static` are the two reading hooks (the benchmark and
    tests override them to feed synthetic data through the real writing path).
    """

    name = "weather"
    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "One example per valid time; stats and statics in the metadata.",
        "2.0.0": "Record format 2: one raw float32 blob per example, optional codec.",
    }
    DESCRIPTION = "Weather states on a regular latitude/longitude grid."
    CITATION = ""
    HOMEPAGE = ""
    LOSS_WEIGHT = 1.0
    DEFAULTS: Mapping[str, Any] = {}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path | None:
        return _code_path(cls)

    def __init_subclass__(cls, skip_registration: bool = True, **kwargs: Any) -> None:
        """Keep subclasses out of TFDS's global name registry unless they pass
        ``skip_registration=False``: `data_builders.registry` names builders, and TFDS's registry
        raises "already registered" when a notebook cell defining a builder is run again."""
        super().__init_subclass__(skip_registration=skip_registration, **kwargs)

    def __init__(
        self,
        *,
        config: WeatherConfig | None = None,
        data_dir: str | Path | None = None,
        file_format: str = "array_record",
        **fields: Any,
    ) -> None:
        if config is None:
            config = make_config(**{**self.DEFAULTS, **fields})
        elif fields:
            raise TypeError(f"pass either config= or option keywords, not both: {sorted(fields)}")
        if str(getattr(file_format, "value", file_format)) != "array_record":
            raise DataError(f"{self.name}: file_format must be array_record (no TensorFlow here)")
        self._grid: tuple[np.ndarray, np.ndarray] | None = None
        self._levels: tuple[float, ...] | None = None
        self._units: dict[str, str] = {}
        data_dir = None if data_dir is None else str(Path(data_dir).expanduser())
        super().__init__(data_dir=data_dir, config=config, file_format="array_record")
        self._check_existing()

    # ---- TFDS interface ---------------------------------------------------------------------

    def download_and_prepare(self, *args: Any, **kwargs: Any) -> None:
        """Build (if not built yet) without TensorFlow, then check the stored time index."""
        fresh = not (Path(self.data_dir) / "dataset_info.json").exists()
        with _tf_free_shuffler(), _uncompressed_array_record():
            super().download_and_prepare(*args, **kwargs)
        if fresh:
            self._check_time_index()

    def _check_time_index(self) -> None:
        """Compare a few records with the predicted order; rescan a split that disagrees."""
        meta = self.info.metadata
        for split, times in meta["times"].items():
            src = self.as_data_source(split)
            probe = sorted({0, len(src) // 2, len(src) - 1})
            if len(src) == len(times) and all(int(src[i]["time"]) == times[i] for i in probe):
                continue
            log.warning(
                "%s: record order of split %s differs from the prediction; scanning",
                self._source(),
                split,
            )
            meta["times"][split] = [int(src[i]["time"]) for i in range(len(src))]
            meta.save_metadata(self.data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(self._features()),
            homepage=self.HOMEPAGE or None,
            citation=self.CITATION or None,
            metadata=WeatherMetadata(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # nothing to download: sources are local files or stores
        cfg = self.builder_config
        meta = self.info.metadata
        meta.clear()
        meta.update(
            format_version=FORMAT_VERSION,
            builder=self.name,
            times={},
            config=config_dict(cfg),
            loss_weight=self.LOSS_WEIGHT,
            surf_vars=list(cfg.surf_vars),
            atmos_vars=list(cfg.atmos_vars),
            static_vars=list(cfg.static_vars),
            stats={},
            stats_split=cfg.stats_split,
        )
        return {name: self._generate_examples(name, ranges) for name, ranges in cfg.splits}

    def _generate_examples(
        self, split: str, ranges: tuple[TimeRange, ...]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Examples of one split in time order; statistics on the stats split; times recorded."""
        cfg = self.builder_config
        acc = RunningStats() if split == cfg.stats_split else None
        times: list[int] = []
        for ds in self._chunks(ranges):
            seconds = _seconds(ds["time"].values, self._source())
            for i, t in enumerate(seconds):
                example = self._example(ds, i, int(t))
                if acc is not None:
                    acc.add_example(example.get("surf", {}), example.get("atmos", {}), self._levels)
                times.append(int(t))
                yield int(t), {"time": np.int64(t), "data": self._pack(example)}
        if not times:
            raise DataError(f"{self._source()}: no valid times in split {split} {list(ranges)}")
        self.info.metadata["times"][split] = record_order(split, times)
        if acc is not None:
            self._store_stats(acc)

    def _features(self) -> dict[str, Any]:
        """Feature spec of record format 2: the time and one bytes blob (`record_layout`)."""
        return {"time": tfds.features.Scalar(np.int64), "data": tfds.features.Scalar(np.object_)}

    def _pack(self, example: Mapping[str, Any]) -> bytes:
        """A canonical example -> its blob: fields at their `record_layout` offsets, encoded."""
        layout = self.info.metadata["record_layout"]
        buf = np.empty(layout["nbytes"] // 4, "<f4")
        for group, name, shape, offset in layout["fields"]:
            x = example[group][name]
            if x.shape != tuple(shape):
                raise DataError(
                    f"{self._source()}: {group} variable {name} has shape {x.shape}, "
                    f"the record layout says {tuple(shape)}"
                )
            buf[offset // 4 : offset // 4 + x.size] = x.ravel()
        return _encode(buf.data, self.builder_config.codec)

    def as_data_source(self, split: str, *args: Any, **kwargs: Any) -> WeatherRecords:  # type: ignore[override]
        """Random access to the records of `split` (`WeatherRecords`; picklable).

        Raises:
            DataError: For a dataset of another record format (rebuild it).
        """
        if args or kwargs:
            raise TypeError(f"{self.name}: as_data_source takes only a split name")
        meta = self._built_metadata()
        fmt = meta.get("format_version", 1)
        if fmt != FORMAT_VERSION or "record_layout" not in meta:
            raise DataError(
                f"{self._source()}: {self.data_dir} holds record format {fmt}, this code reads "
                f"format {FORMAT_VERSION}; delete the folder and rebuild the dataset"
            )
        try:
            instructions = list(self.info.splits[split].file_instructions)
        except (KeyError, ValueError) as e:
            raise DataError(
                f"{self._source()}: no split {split!r}; have {list(self.info.splits)}"
            ) from e
        return WeatherRecords(instructions, meta["record_layout"], f"{self._source()}/{split}")

    # ---- reading --------------------------------------------------------------------------

    def _source(self) -> str:
        """How error messages name this dataset: builder, config and files."""
        files = ", ".join(Path(p).name for p in self.builder_config.paths)
        return f"{self.name}/{self.builder_config.name} ({files})"

    def _read_dynamic(self, time: slice) -> xr.Dataset | None:
        """Canonical surface + atmospheric data for one time range; None if no file has one."""
        cfg = self.builder_config
        fill = dict(cfg.fill_nan) if isinstance(cfg.fill_nan, tuple) else cfg.fill_nan
        try:
            return open_dataset(
                list(cfg.paths),
                variables=list(cfg.surf_vars) + list(cfg.atmos_vars),
                levels=cfg.levels if cfg.atmos_vars else None,
                member=cfg.member,
                fill_nan=fill,
                time=time,
                init_time=cfg.init_time,
            )
        except DataError as e:
            if _NO_TIME in str(e):
                return None
            raise

    def _read_static(self) -> xr.Dataset:
        """Canonical static fields (keys ``lsm``, ``z_sfc``, ``slt``) on their source grid."""
        cfg = self.builder_config
        keys = [STATIC_KEYS[v] for v in cfg.static_vars]
        return open_dataset(list(cfg.static_paths or cfg.paths), variables=keys)

    def _chunks(self, ranges: Sequence[TimeRange]) -> Iterator[xr.Dataset]:
        """The split's data, chunk by chunk, checked and on the target grid."""
        for r in ranges:
            for time in _time_slices(r, self.builder_config.chunk_hours):
                ds = self._read_dynamic(time)
                if ds is not None and ds.sizes.get("time", 0):
                    yield self._on_grid(ds)

    def _on_grid(self, ds: xr.Dataset) -> xr.Dataset:
        """Regrid to the configured grid; every chunk must agree on grid, levels and layout."""
        cfg = self.builder_config
        self._check_layout(ds)
        if cfg.resolution is not None:
            lat, lon = global_grid(cfg.resolution)
            if not _same_grid(ds, lat, lon):
                ds = regrid(ds, lat, lon, method=cfg.regrid_method)
        lat, lon = ds["latitude"].values, ds["longitude"].values
        levels = tuple(float(x) for x in ds["level"].values) if "level" in ds.dims else ()
        if self._grid is None:
            self._grid, self._levels = (lat, lon), levels
            self._units = {str(k): str(v.attrs.get("units", "")) for k, v in ds.data_vars.items()}
            self._store_grid_and_static()
        elif not _same_grid(ds, *self._grid) or levels != self._levels:
            raise DataError(
                f"{self._source()}: grid or levels change between time chunks "
                f"(at {str(ds['time'].values[0])[:19]}); regrid with resolution="
            )
        return ds

    def _check_layout(self, ds: xr.Dataset) -> None:
        """Surface variables must be (time, lat, lon), atmospheric ones have a level axis."""
        cfg = self.builder_config
        for v in cfg.surf_vars:
            if ds[v].dims != ("time", "latitude", "longitude"):
                raise DataError(
                    f"{self._source()}: variable {v} has dims {ds[v].dims}; "
                    "a surface variable needs (time, latitude, longitude)"
                )
        for v in cfg.atmos_vars:
            if ds[v].dims != ("time", "level", "latitude", "longitude"):
                raise DataError(
                    f"{self._source()}: variable {v} has dims {ds[v].dims}; "
                    "an atmospheric variable needs (time, level, latitude, longitude)"
                )

    def _example(self, ds: xr.Dataset, i: int, seconds: int) -> dict[str, Any]:
        """One valid time as float32 arrays, grouped like the feature spec."""
        cfg = self.builder_config
        example: dict[str, Any] = {"time": np.int64(seconds)}
        if cfg.surf_vars:
            example["surf"] = {v: _f32(ds[v].values[i]) for v in cfg.surf_vars}
        if cfg.atmos_vars:
            example["atmos"] = {v: _f32(ds[v].values[i]) for v in cfg.atmos_vars}
        return example

    # ---- metadata -------------------------------------------------------------------------

    def _store_grid_and_static(self) -> None:
        """Grid, levels, units and the static companion, once the grid is known."""
        assert self._grid is not None
        lat, lon = self._grid
        meta = self.info.metadata
        meta.update(
            lat=lat.tolist(),
            lon=lon.tolist(),
            levels=list(self._levels or ()),
            units=dict(self._units),
            record_layout=record_layout(
                self.builder_config, (len(lat), len(lon)), len(self._levels or ())
            ),
        )
        if not self.builder_config.static_vars:
            return
        static = self._read_static()
        if not _same_grid(static, lat, lon):
            static = regrid(static, lat, lon, method=self.builder_config.regrid_method)
        fields = {}
        for name in self.builder_config.static_vars:
            da = static[STATIC_KEYS[name]]
            fields[name] = _f32(da.values)
            meta["units"][f"static/{name}"] = str(da.attrs.get("units", ""))
        meta["static"] = fields

    def _store_stats(self, acc: RunningStats) -> None:
        """Per-variable (per-level) statistics of the stats split, plus the static fields'."""
        stats = acc.result()
        for name, field in (self.info.metadata.get("static") or {}).items():
            s = RunningStats()
            s.add_field(name, field)
            stats[stat_key(name)] = s.result()[name]
        self.info.metadata["stats"] = {k: [float(m), float(s)] for k, (m, s) in stats.items()}
        self.info.metadata["stats_count"] = acc.counts()

    def _check_existing(self) -> None:
        """A named config must not silently reuse a dataset built from another config."""
        folder = Path(self.data_dir)
        if not (folder / _METADATA_FILE).exists():
            return
        stored = json.loads((folder / _METADATA_FILE).read_text()).get("config")
        current = config_dict(self.builder_config)
        if stored is not None and stored != current:
            diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
            raise DataError(
                f"{folder}: holds a dataset built from a different config "
                f"(differs in {diff}); use another name or delete the folder"
            )

    # ---- read helpers ---------------------------------------------------------------------

    def _built_metadata(self) -> Mapping[str, Any]:
        meta = self.info.metadata
        if not meta or "lat" not in meta:
            raise DataError(
                f"{self._source()}: not built yet in {self.data_dir}; call download_and_prepare()"
            )
        return meta

    def stats(self) -> dict[str, tuple[float, float]]:
        """`{"2t": (mean, std), "r_500": (mean, std), ...}` over the stats split."""
        return {k: (float(m), float(s)) for k, (m, s) in self._built_metadata()["stats"].items()}

    def static(self) -> dict[str, np.ndarray]:
        """Static fields keyed by Aurora name (``lsm``, ``z``, ``slt``), float32 ``(h, w)``."""
        return dict(self._built_metadata().get("static") or {})

    def grid(self) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
        """`(lat, lon, levels)` of the stored fields."""
        meta = self._built_metadata()
        lat, lon = np.asarray(meta["lat"], np.float64), np.asarray(meta["lon"], np.float64)
        return lat, lon, tuple(float(x) for x in meta["levels"])

    def times(self, split: str) -> np.ndarray:
        """int64 seconds since 1970 of the records of `split`, in record order."""
        meta = self._built_metadata()
        if split not in meta["times"]:
            raise DataError(f"{self._source()}: no split {split!r}; have {sorted(meta['times'])}")
        return np.asarray(meta["times"][split], np.int64)


class WeatherRecords:
    """The records of one split of a built dataset: ``len``, ``[i]`` -> the canonical dict.

    Reads array_record's raw bytes and takes the example apart itself (`_parse_example`)
    instead of TFDS's feature decoding, which copies and converts every field: the fields are
    read-only `np.frombuffer` views of the record's (decompressed) bytes. Picklable (file
    instructions and layout; readers reopen lazily), so Grain worker processes can use it.

    Args:
        instructions: The split's TFDS file instructions (file, skip, take).
        layout: The dataset's ``record_layout`` (metadata).
        name: For error messages.
    """

    def __init__(self, instructions: Sequence[Any], layout: Mapping[str, Any], name: str) -> None:
        self.instructions, self.layout, self.name = list(instructions), dict(layout), name
        self.codec = str(layout.get("codec", "none"))
        _codec_module(self.codec)
        self._fields = [(g, n, tuple(shape), int(off)) for g, n, shape, off in layout["fields"]]
        self._reader: Any = None

    def _records(self) -> Any:
        if self._reader is None:
            self._reader = array_record_data_source.ArrayRecordDataSource(self.instructions)
        return self._reader

    def __len__(self) -> int:
        return len(self._records())

    def __getitem__(self, i: int) -> dict[str, Any]:
        raw = self._records()[i]
        try:
            seconds, data = _parse_example(memoryview(raw))
            blob = _decode(data, self.codec)
        except (ValueError, IndexError, KeyError) as e:
            raise DataError(f"{self.name}: record {i} is damaged ({e})") from e
        if len(blob) != self.layout["nbytes"]:
            raise DataError(
                f"{self.name}: record {i} holds {len(blob)} bytes, the layout says "
                f"{self.layout['nbytes']}; the dataset is damaged or of another format"
            )
        out: dict[str, Any] = {"time": np.int64(seconds)}
        for group, name, shape, offset in self._fields:
            count = int(np.prod(shape))
            x = np.frombuffer(blob, "<f4", count=count, offset=offset).reshape(shape)
            out.setdefault(group, {})[name] = x
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __repr__(self) -> str:
        return f"WeatherRecords({self.name}, codec={self.codec})"


class Era5(WeatherBuilder, skip_registration=True):
    """ERA5 reanalysis (CDS downloads, WeatherBench2 stores); Aurora's loss weight 2.0."""

    name = "era5"
    DESCRIPTION = "ERA5 reanalysis (Hersbach et al. 2020), one example per valid time."
    CITATION = "Hersbach et al. (2020), The ERA5 global reanalysis, QJRMS 146, 1999-2049."
    HOMEPAGE = "https://cds.climate.copernicus.eu"
    LOSS_WEIGHT = 2.0


class Hres(WeatherBuilder, skip_registration=True):
    """IFS HRES analyses / T0 / forecasts flattened to valid times; loss weight 1.0.

    Forecast stores are read at their valid times; pass ``init_time=`` to take one forecast
    when several overlap.
    """

    name = "hres"
    DESCRIPTION = "ECMWF IFS HRES analyses and forecasts, one example per valid time."
    HOMEPAGE = "https://www.ecmwf.int/en/forecasts/datasets/set-i"
    LOSS_WEIGHT = 1.0


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def record_order(split: str, times: Sequence[int]) -> list[int]:
    """The order in which TFDS writes examples keyed by `times`: by md5(split name, key).

    This is `tfds.core.hashing.Hasher` with the split name as salt, as TFDS's writer uses it
    (TFDS treats a change of it as a major version bump of every dataset).

    Args:
        split: The split name.
        times: The example keys, int seconds since 1970.

    Returns:
        The keys in record order.
    """
    hasher = tfds_hashing.Hasher(split)
    return sorted((int(t) for t in times), key=hasher.hash_key)


class _GFile:
    """The part of ``tf.io.gfile`` / ``tf.errors`` that `tfds.core.shuffle` uses, on plain files."""

    class errors:
        class ResourceExhaustedError(OSError):
            message = ""

    class io:
        class gfile:
            @staticmethod
            def GFile(path: Any, mode: str = "r") -> Any:
                return epath.Path(path).open(mode)

            @staticmethod
            def exists(path: Any) -> bool:
                return epath.Path(path).exists()

            @staticmethod
            def remove(path: Any) -> None:
                epath.Path(path).unlink()


@contextlib.contextmanager
def _tf_free_shuffler() -> Iterator[None]:
    """Let TFDS's shuffler spill to disk without TensorFlow (local files only)."""
    if importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    old = tfds_shuffle.tf
    tfds_shuffle.tf = _GFile
    try:
        yield
    finally:
        tfds_shuffle.tf = old


@contextlib.contextmanager
def _uncompressed_array_record() -> Iterator[None]:
    """Write array_record files uncompressed: the blob carries the config's codec instead.

    TFDS writes with array_record's default compression, whose decoding cost more than the
    rest of reading a record.
    """
    adapter = tfds.core.file_adapters.ArrayRecordFileAdapter
    old = adapter.__dict__["write_examples"]

    def write_examples(cls: Any, path: Any, iterator: Any) -> None:
        writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1,uncompressed")
        for _, serialized in iterator:
            writer.write(serialized)
        writer.close()

    adapter.write_examples = classmethod(write_examples)
    try:
        yield
    finally:
        adapter.write_examples = old


def record_layout(config: WeatherConfig, grid: tuple[int, int], n_levels: int) -> dict[str, Any]:
    """Where each field lies in a record's blob (record format 2).

    Args:
        config: The builder config (variables in order, codec).
        grid: `(h, w)`.
        n_levels: Pressure levels of the atmospheric variables.

    Returns:
        ``{"dtype": "<f4", "codec": ..., "nbytes": blob size decoded, "fields": [[group, name,
        shape, byte offset], ...]}``: surface variables then atmospheric ones, in config order.
    """
    h, w = grid
    fields, offset = [], 0
    for group, names, shape in (
        ("surf", config.surf_vars, [h, w]),
        ("atmos", config.atmos_vars, [n_levels, h, w]),
    ):
        for name in names:
            fields.append([group, name, shape, offset])
            offset += 4 * int(np.prod(shape))
    return {"dtype": "<f4", "codec": config.codec, "nbytes": offset, "fields": fields}


def _codec_module(codec: str) -> Any:
    """The package behind `codec` (None for "none"); a clear error when it is not installed."""
    if codec == "none":
        return None
    package = {"zstd": "zstandard", "lz4": "lz4.frame"}.get(codec)
    if package is None:
        raise DataError(f"codec {codec!r} unknown; use one of {CODECS}")
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise DataError(
            f"codec {codec!r} needs the {package.split('.')[0]} package: "
            f"pip install {package.split('.')[0]}"
        ) from e


def _encode(data: Any, codec: str) -> bytes:
    """A blob (buffer) -> the bytes stored for it."""
    module = _codec_module(codec)
    if codec == "zstd":
        return module.ZstdCompressor(level=_ZSTD_LEVEL, write_content_size=True).compress(data)
    if codec == "lz4":
        return module.compress(data, store_size=True)
    return bytes(data)


def _decode(data: memoryview, codec: str) -> Any:
    """The stored bytes of a blob -> the blob (a buffer; zero-copy for "none")."""
    module = _codec_module(codec)
    if codec == "zstd":
        return module.ZstdDecompressor().decompress(data)
    if codec == "lz4":
        return module.decompress(data)
    return data


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, Any]]:
    """The fields of a protobuf message: (field number, int or memoryview of the payload)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + n], pos + n
        else:
            raise ValueError(f"protobuf wire type {wire} unexpected")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, value


def _parse_example(buf: memoryview) -> tuple[int, memoryview]:
    """A serialized ``tf.train.Example`` of record format 2 -> (time, view of the blob).

    Only what TFDS writes for `WeatherBuilder._features` is understood: ``time`` as an
    ``Int64List`` of one value, ``data`` as a ``BytesList`` of one value.
    """
    found: dict[str, Any] = {}
    for number, features in _fields(buf):
        if number != 1:
            continue
        for number2, entry in _fields(features):
            if number2 != 1:
                continue
            parts = dict(_fields(entry))
            key, feature = bytes(parts[1]).decode(), dict(_fields(parts[2]))
            if key == "data":
                found[key] = dict(_fields(feature[1]))[1]
            elif key == "time":
                values = dict(_fields(feature[3]))[1]  # packed varints
                value = _varint(values, 0)[0] if isinstance(values, memoryview) else values
                found[key] = value - (1 << 64) if value >= 1 << 63 else value
    return int(found["time"]), found["data"]


def _code_path(cls: type) -> epath.Path | None:
    """The file defining `cls`, found without TFDS's `importlib_resources` lookup.

    TFDS 4.9 checks ``isinstance(path, importlib_resources.abc.Traversable)`` for builders in a
    package, and `importlib_resources` (a backport) is not installed on Python >= 3.9, so
    `download_and_prepare` fails before writing anything. `patch_code_path` applies this to any
    builder class (the registry does it for registered TFDS builders).
    """
    try:
        return epath.Path(inspect.getfile(cls))
    except (TypeError, OSError):  # defined interactively
        return None


def patch_code_path(cls: type) -> type:
    """Give a TFDS builder class the `code_path` workaround of `_code_path`.

    Args:
        cls: A `tfds.core.DatasetBuilder` subclass; changed in place.

    Returns:
        `cls`, so that this can be used as a decorator.
    """
    if "code_path" not in cls.__dict__:
        cls.code_path = tfds.core.utils.classproperty(classmethod(_code_path))
    return cls


def global_grid(resolution: float) -> tuple[np.ndarray, np.ndarray]:
    """Aurora's global grid: latitude 90 -> -90 inclusive, longitude 0 -> 360 - res.

    Args:
        resolution: Grid spacing in degrees; must divide 180 and 360.

    Returns:
        `(lat, lon)`: float64 arrays of shapes ``(180 / res + 1,)`` and ``(360 / res,)``.

    Raises:
        DataError: If `resolution` does not divide 180 and 360 degrees.
    """
    n_lat, n_lon = round(180 / resolution) + 1, round(360 / resolution)
    if abs(180 / resolution - (n_lat - 1)) > 1e-6 or abs(360 / resolution - n_lon) > 1e-6:
        raise DataError(f"resolution {resolution:g} does not divide 180 and 360 degrees")
    return np.linspace(90.0, -90.0, n_lat), np.arange(n_lon) * float(resolution)


def _same_grid(ds: xr.Dataset, lat: np.ndarray, lon: np.ndarray) -> bool:
    a, b = ds["latitude"].values, ds["longitude"].values
    return bool(
        a.shape == lat.shape
        and b.shape == lon.shape
        and np.allclose(a, lat, atol=1e-6)
        and np.allclose(b, lon, atol=1e-6)
    )


def _time_slices(r: TimeRange, chunk_hours: int) -> Iterator[slice]:
    """Inclusive label slices covering `r` in chunks; one slice when an end is open."""
    start, end = r
    if start is None or end is None:
        yield slice(start, end)
        return
    t, stop = np.datetime64(start, "ns"), np.datetime64(end, "ns")
    step = np.timedelta64(int(chunk_hours) * 3600, "s").astype("timedelta64[ns]")
    while t <= stop:
        yield slice(t, min(t + step - np.timedelta64(1, "ns"), stop))
        t = t + step


def _seconds(times: np.ndarray, source: str) -> np.ndarray:
    """datetime64 -> int64 seconds since 1970, refusing sub-second times."""
    ns = times.astype("datetime64[ns]")
    s = ns.astype("datetime64[s]")
    if np.any(s.astype("datetime64[ns]") != ns):
        raise DataError(f"{source}: times with fractions of a second")
    return s.astype(np.int64)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)
