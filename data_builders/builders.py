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
import multiprocessing
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
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
from data_builders.blob_store import (
    BlobFiles,
    BlobStore,
    ChunkIndex,
    bin_start,
    identity,
    source_stamps,
)
from data_builders.readers import (
    ATMOS_VARS,
    STATIC_KEYS,
    STATIC_VARS,
    SURFACE_VARS,
    DataError,
    open_dataset,
    regrid,
    valid_times,
)
from data_builders.stats import RunningStats, field_stats, merge_stats, stat_key

__all__ = [
    "AURORA_LEVELS",
    "Era5",
    "Hres",
    "WeatherBuilder",
    "WeatherConfig",
    "WeatherMetadata",
    "check_disjoint",
    "global_grid",
    "make_config",
    "normalise_splits",
    "patch_code_path",
    "record_order",
]

log = logging.getLogger(__name__)

# Floats, as `make_config` stores levels (the default is hashed into the dataset folder name).
AURORA_LEVELS = tuple(float(p) for p in variables.AURORA_LEVELS)
# 2: one raw little-endian float32 blob per record (`record_layout`); 3: the blobs live in
# shared chunk files (`blob_store`) and records hold references to them.
FORMAT_VERSION = 3
CODECS = ("none", "zstd", "lz4")
_ZSTD_LEVEL = 3
_STATIC_FILE = "static.npz"
_METADATA_FILE = "metadata.json"
_NO_TIME = "no data left"  # readers' message when no file has a time in the selected range
_BLOBS = "_blobs"  # <data_dir>/<builder>/_blobs/<identity>/: the chunk files (`blob_store`)

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
        f["splits"] = normalise_splits(f["splits"])
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


def normalise_splits(splits: Any) -> tuple[tuple[str, tuple[TimeRange, ...]], ...]:
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
    check_disjoint(config.splits)


def _bounds(r: TimeRange) -> tuple[np.datetime64, np.datetime64]:
    lo = np.datetime64("0001-01-01T00:00:00") if r[0] is None else np.datetime64(r[0])
    hi = np.datetime64("9999-12-31T23:59:59") if r[1] is None else np.datetime64(r[1])
    if hi < lo:
        raise DataError(f"builder config: time range {r} ends before it starts")
    return lo, hi


def check_disjoint(splits: tuple[tuple[str, tuple[TimeRange, ...]], ...]) -> None:
    """Train/validation/test overlapping in time would leak: refuse it (`DataError`)."""
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

    On disk (record format 3) each valid time is one blob holding every field as little-endian
    float32, C order, surface variables then atmospheric ones, each group in config order;
    ``record_layout`` in the metadata lists ``[group, name, shape, byte offset]`` per field. The
    blob is compressed with the config's ``codec`` (``"none"``, ``"zstd"`` or ``"lz4"``). Blobs
    live in chunk files shared by every build of the same variables, levels and grid
    (`data_builders.blob_store`: ``<data_dir>/<builder>/_blobs/<identity>/``), one file per
    aligned bin of ``chunk_hours``; the TFDS example of a time is only a reference to its blob
    (``time``, ``file``, ``offset``, ``nbytes``). `WeatherRecords` reads a record with one
    ``preadv`` and hands out read-only `np.frombuffer` views of it.

    Building plans first (`_source_times`: the valid times the sources hold, from metadata
    only), then writes the chunks not stored yet, in ``build_workers`` processes when more than
    one (``spawn``ed; the builder class must be importable). A chunk whose source files changed
    (size or mtime) is rebuilt. Extending the time range or moving a split boundary therefore
    writes only the new chunks; the TFDS folder (named by the whole config) is rebuilt from the
    stored chunks in seconds. Statistics are stored per time with each chunk and pooled for the
    stats split, so they do not depend on how times were chunked.

    Records are shuffled at write time by TFDS's shuffler (sorted by an md5 hash of key and split
    name). The key is the timestamp, so the record order is known when a split is written: it is
    stored in the metadata (``times``) and checked after the build and by the pipeline on every
    record it reads. TFDS spills with ``tf.io.gfile``; without TensorFlow `download_and_prepare`
    lends it plain-file equivalents (`_tf_free_shuffler`). Sources are read one chunk of
    ``chunk_hours`` (default one day) at a time, so a year at 0.25 degrees never sits in memory.

    Subclasses set `name`, `DESCRIPTION`, `LOSS_WEIGHT` and may change config defaults through
    `DEFAULTS`. `_source_times`, `_read_dynamic` and `_read_static` are the reading hooks (the
    benchmark and tests override them to feed synthetic data through the real writing path).
    """

    name = "weather"
    VERSION = tfds.core.Version("3.0.0")
    RELEASE_NOTES = {
        "1.0.0": "One example per valid time; stats and statics in the metadata.",
        "2.0.0": "Record format 2: one raw float32 blob per example, optional codec.",
        "3.0.0": "Record format 3: blobs in shared chunk files, examples reference them.",
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
        build_workers: int = 1,
        **fields: Any,
    ) -> None:
        if config is None:
            config = make_config(**{**self.DEFAULTS, **fields})
        elif fields:
            raise TypeError(f"pass either config= or option keywords, not both: {sorted(fields)}")
        if str(getattr(file_format, "value", file_format)) != "array_record":
            raise DataError(f"{self.name}: file_format must be array_record (no TensorFlow here)")
        if int(build_workers) < 1:
            raise DataError(f"{self.name}: build_workers must be at least 1, got {build_workers}")
        self.build_workers = int(build_workers)
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
            blob_dir=f"{_BLOBS}/{self.blob_identity()}",
        )
        plan = self._plan()
        every = np.unique(np.concatenate(list(plan.values())))
        chunks = self._build_chunks(np.unique(bin_start(every, cfg.chunk_hours)).tolist())
        self._adopt_grid(chunks)
        return {name: self._generate_examples(name, plan[name], chunks) for name, _ in cfg.splits}

    def _plan(self) -> dict[str, np.ndarray]:
        """The valid times (seconds, increasing) of each split, before any data are read."""
        cfg = self.builder_config
        times = _seconds(self._source_times(), self._source())
        plan = {}
        for name, ranges in cfg.splits:
            keep = np.zeros(times.shape, bool)
            for r in ranges:
                lo, hi = (int(b.astype("datetime64[s]").astype(np.int64)) for b in _bounds(r))
                keep |= (times >= lo) & (times <= hi)
            if not keep.any():
                raise DataError(f"{self._source()}: no valid times in split {name} {list(ranges)}")
            plan[name] = times[keep]
        return plan

    def _build_chunks(self, starts: list[int]) -> dict[int, ChunkIndex]:
        """Every chunk the splits need: stored ones are reused, the others written (in parallel)."""
        store = BlobStore(self.blob_root())
        chunks = {s: store.load(s) for s in starts}
        todo = [s for s, index in chunks.items() if index is None]
        log.info(
            "%s: %d of %d time chunks stored in %s; writing %d with %d worker(s)",
            self._source(),
            len(starts) - len(todo),
            len(starts),
            store.root,
            len(todo),
            min(self.build_workers, max(len(todo), 1)),
        )
        if self.build_workers > 1 and len(todo) > 1:
            context = multiprocessing.get_context("spawn")  # JAX's threads make fork unsafe
            workers = min(self.build_workers, len(todo))
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                args = (type(self), self.builder_config, str(self.data_dir_root))
                futures = {s: pool.submit(_write_chunk_in_worker, *args, s) for s in todo}
                for s, future in futures.items():
                    chunks[s] = future.result()
        else:
            for s in todo:
                chunks[s] = self._write_chunk(store, s)
        return {s: index for s, index in chunks.items() if index is not None}

    def _write_chunk(self, store: BlobStore, start: int) -> ChunkIndex:
        """Read, regrid, pack and store the source's times in the bin starting at `start`."""
        cfg = self.builder_config
        width = np.timedelta64(cfg.chunk_hours * 3600, "s")
        t0 = np.datetime64(int(start), "s")
        ns = np.timedelta64(1, "ns")
        ds = self._read_dynamic(slice(t0.astype("datetime64[ns]"), (t0 + width) - ns))
        if ds is None or not ds.sizes.get("time", 0):
            raise DataError(f"{self._source()}: no data read for the chunk starting {t0}")
        ds = self._regridded(ds)
        lat, lon = ds["latitude"].values, ds["longitude"].values
        levels = [float(x) for x in ds["level"].values] if "level" in ds.dims else []
        layout = record_layout(cfg, (len(lat), len(lon)), len(levels))
        keys = _stat_keys(cfg, levels)
        seconds = _seconds(ds["time"].values, self._source())

        def records() -> Iterator[tuple[int, bytes, np.ndarray]]:
            for i, t in enumerate(seconds):
                example = self._example(ds, i, int(t))
                fields = [example["surf"][v] for v in cfg.surf_vars] + [
                    example["atmos"][v][j] for v in cfg.atmos_vars for j in range(len(levels))
                ]
                yield int(t), self._pack(example, layout), field_stats(fields)

        files = [
            f.strip()
            for v in ds.data_vars.values()
            for f in str(v.attrs.get("source_file", "")).split(";")
            if f.strip()
        ]
        return store.write(
            start,
            records(),
            stat_keys=keys,
            lat=lat,
            lon=lon,
            levels=levels,
            units={str(k): str(v.attrs.get("units", "")) for k, v in ds.data_vars.items()},
            sources=source_stamps(files),
        )

    def _adopt_grid(self, chunks: Mapping[int, ChunkIndex]) -> None:
        """Take grid, levels and units from the first chunk; every chunk must agree."""
        for start in sorted(chunks):
            index = chunks[start]
            if self._grid is None:
                self._grid, self._levels = (index.lat, index.lon), tuple(index.levels)
                self._units = dict(index.units)
                self._store_grid_and_static()
            elif (
                index.lat.shape != self._grid[0].shape
                or index.lon.shape != self._grid[1].shape
                or not np.allclose(index.lat, self._grid[0], atol=1e-6)
                or not np.allclose(index.lon, self._grid[1], atol=1e-6)
                or tuple(index.levels) != self._levels
            ):
                raise DataError(
                    f"{self._source()}: grid or levels change between time chunks "
                    f"(at {np.datetime64(int(index.times[0]), 's')}); regrid with resolution="
                )

    def _generate_examples(
        self, split: str, times: np.ndarray, chunks: Mapping[int, ChunkIndex]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """References to the split's records in time order; statistics on the stats split."""
        cfg = self.builder_config
        store = BlobStore(self.blob_root())
        rows, keys = [], None
        for t, start in zip(times.tolist(), bin_start(times, cfg.chunk_hours).tolist()):
            index = chunks[start]
            j = int(np.searchsorted(index.times, t))
            if j >= len(index.times) or int(index.times[j]) != t:
                raise DataError(
                    f"{self._source()}: {np.datetime64(t, 's')} is listed by the source but "
                    "was not read from it; the source changed while building?"
                )
            rows.append(index.stats[j])
            keys = index.stat_keys
            ref = {
                "time": np.int64(t),
                "file": store.file_name(start),
                "offset": np.int64(index.offsets[j]),
                "nbytes": np.int64(index.nbytes[j]),
            }
            yield t, ref
        self.info.metadata["times"][split] = record_order(split, times.tolist())
        if split == cfg.stats_split and keys is not None:
            self._store_stats(keys, np.stack(rows))

    def _features(self) -> dict[str, Any]:
        """Feature spec of record format 3: the time and where its blob lies (`blob_store`)."""
        return {
            "time": tfds.features.Scalar(np.int64),
            "file": tfds.features.Scalar(np.object_),
            "offset": tfds.features.Scalar(np.int64),
            "nbytes": tfds.features.Scalar(np.int64),
        }

    def _pack(self, example: Mapping[str, Any], layout: Mapping[str, Any]) -> bytes:
        """A canonical example -> its blob: fields at their `record_layout` offsets, encoded."""
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

    def blob_identity(self) -> str:
        """What the stored fields are, without the time range or splits (`blob_store.identity`)."""
        cfg = config_dict(self.builder_config)
        keep = (
            "surf_vars",
            "atmos_vars",
            "levels",
            "resolution",
            "regrid_method",
            "chunk_hours",
            "fill_nan",
            "member",
            "init_time",
            "codec",
        )
        return identity(
            {"builder": self.name, "format": FORMAT_VERSION, **{k: cfg[k] for k in keep}}
        )

    def blob_root(self) -> Path:
        """The folder of this config's chunk files."""
        return Path(self.data_dir_root) / self.name / _BLOBS / self.blob_identity()

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
        blobs = Path(self.data_dir_root) / self.name / meta["blob_dir"]
        return WeatherRecords(
            instructions, meta["record_layout"], f"{self._source()}/{split}", blobs
        )

    # ---- reading --------------------------------------------------------------------------

    def _source(self) -> str:
        """How error messages name this dataset: builder, config and files."""
        files = ", ".join(Path(p).name for p in self.builder_config.paths)
        return f"{self.name}/{self.builder_config.name} ({files})"

    def _source_times(self) -> np.ndarray:
        """The valid times (datetime64) the sources hold, from their metadata only."""
        cfg = self.builder_config
        return valid_times(
            list(cfg.paths),
            variables=list(cfg.surf_vars) + list(cfg.atmos_vars),
            member=cfg.member,
            init_time=cfg.init_time,
        )

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

    def _regridded(self, ds: xr.Dataset) -> xr.Dataset:
        """Checked and on the configured grid."""
        cfg = self.builder_config
        self._check_layout(ds)
        if cfg.resolution is not None:
            lat, lon = global_grid(cfg.resolution)
            if not _same_grid(ds, lat, lon):
                ds = regrid(ds, lat, lon, method=cfg.regrid_method)
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

    def _store_stats(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """Pooled statistics of the stats split (`merge_stats`), plus the static fields'."""
        count, mean, std = merge_stats(rows)
        stats = {k: (float(m), float(d)) for k, m, d in zip(keys, mean, std)}
        counts = {k: int(n) for k, n in zip(keys, count)}
        for name, field in (self.info.metadata.get("static") or {}).items():
            s = RunningStats()
            s.add_field(name, field)
            stats[stat_key(name)] = s.result()[name]
        self.info.metadata["stats"] = {k: [float(m), float(s)] for k, (m, s) in stats.items()}
        self.info.metadata["stats_count"] = counts

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

    Reads the split's small array_record references and each record's blob with one
    ``preadv`` from its chunk file (`blob_store.BlobFiles`), then decodes it: the fields are
    read-only `np.frombuffer` views of the blob. Picklable (file instructions, layout and the
    blob folder; files reopen lazily), so Grain worker processes can use it.

    Args:
        instructions: The split's TFDS file instructions (file, skip, take).
        layout: The dataset's ``record_layout`` (metadata).
        name: For error messages.
        blob_root: The folder of the dataset's chunk files.
    """

    def __init__(
        self,
        instructions: Sequence[Any],
        layout: Mapping[str, Any],
        name: str,
        blob_root: str | Path,
    ) -> None:
        self.instructions, self.layout, self.name = list(instructions), dict(layout), name
        self.codec = str(layout.get("codec", "none"))
        _codec_module(self.codec)
        self._fields = [(g, n, tuple(shape), int(off)) for g, n, shape, off in layout["fields"]]
        self._reader: Any = None
        self._blobs = BlobFiles(blob_root, name)

    def _records(self) -> Any:
        if self._reader is None:
            self._reader = array_record_data_source.ArrayRecordDataSource(self.instructions)
        return self._reader

    def __len__(self) -> int:
        return len(self._records())

    def reference(self, i: int) -> dict[str, Any]:
        """Where record `i` lies: ``{"time", "file", "offset", "nbytes"}``."""
        try:
            ref = _parse_example(memoryview(self._records()[i]))
            return {
                "time": int(ref["time"]),
                "file": bytes(ref["file"]).decode(),
                "offset": int(ref["offset"]),
                "nbytes": int(ref["nbytes"]),
            }
        except (ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise DataError(f"{self.name}: record {i} is damaged ({e!r})") from e

    def __getitem__(self, i: int) -> dict[str, Any]:
        ref = self.reference(i)
        what = f"record {i} ({np.datetime64(ref['time'], 's')})"
        stored = self._blobs.read(ref["file"], ref["offset"], ref["nbytes"], what)
        try:
            blob = _decode(memoryview(stored), self.codec)
        except Exception as e:  # the codecs raise their own error types
            raise DataError(f"{self.name}: {what} cannot be decoded ({e})") from e
        if len(blob) != self.layout["nbytes"]:
            raise DataError(
                f"{self.name}: {what} holds {len(blob)} bytes, the layout says "
                f"{self.layout['nbytes']}; the dataset is damaged or of another format"
            )
        out: dict[str, Any] = {"time": np.int64(ref["time"])}
        for group, name, shape, offset in self._fields:
            count = int(np.prod(shape))
            x = np.frombuffer(blob, "<f4", count=count, offset=offset).reshape(shape)
            out.setdefault(group, {})[name] = x
        return out

    def close(self) -> None:
        """Close the open chunk files (reading again reopens them)."""
        self._blobs.close()

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


def _parse_example(buf: memoryview) -> dict[str, Any]:
    """A serialized ``tf.train.Example`` -> ``{key: int | memoryview}``.

    Only single-value features are understood, as TFDS writes `WeatherBuilder._features`:
    an ``Int64List`` gives an int, a ``BytesList`` a view of its bytes.
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
            if 1 in feature:  # BytesList
                found[key] = dict(_fields(feature[1])).get(1, memoryview(b""))
            elif 3 in feature:  # Int64List, packed varints (or one unpacked)
                values = dict(_fields(feature[3])).get(1, 0)
                value = _varint(values, 0)[0] if isinstance(values, memoryview) else values
                found[key] = value - (1 << 64) if value >= 1 << 63 else value
    return found


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


def _seconds(times: np.ndarray, source: str) -> np.ndarray:
    """datetime64 -> int64 seconds since 1970, refusing sub-second times."""
    ns = times.astype("datetime64[ns]")
    s = ns.astype("datetime64[s]")
    if np.any(s.astype("datetime64[ns]") != ns):
        raise DataError(f"{source}: times with fractions of a second")
    return s.astype(np.int64)


def _f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def _stat_keys(config: WeatherConfig, levels: Sequence[float]) -> list[str]:
    """Statistics keys in the order of a chunk's rows: surface variables, then (var, level)."""
    keys = [stat_key(v) for v in config.surf_vars]
    return keys + [stat_key(v, level) for v in config.atmos_vars for level in levels]


def _write_chunk_in_worker(
    cls: type[WeatherBuilder], config: WeatherConfig, data_dir: str, start: int
) -> ChunkIndex:
    """A build worker's job: one chunk, by a builder of the same class and config."""
    tfds.disable_progress_bar()
    builder = cls(config=config, data_dir=data_dir)
    return builder._write_chunk(BlobStore(builder.blob_root()), start)
