"""Records of a lazily opened zarr store, read one valid time at a time.

`Reader` reads every variable of one time concurrently (one thread per variable; zarr fetches
the chunks of each variable concurrently too), checks for NaNs (or fills them as configured) and
regrids on the fly. `Records` is the random-access sequence a `WeatherSource` holds: reading
index i also starts reading the next few indices in the background, since the pipeline reads
windows of consecutive times. Both pickle without their threads and store, for Grain's worker
processes, which reopen the store on their first read.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr

from data_builders.errors import DataError
from data_builders.readers import MASKED_VARS, Fill, fill_nans
from data_builders.regrid import Regridder
from data_builders.zarr_source.store import MissingChunkError

__all__ = ["Reader", "Records"]


class Reader:
    """Reads the state at one position of a canonical, lazily opened dataset.

    A reader pickles without its store, threads and lazy arrays (Grain's worker processes get
    a copy of the pipeline's source): it keeps only `opener`, which the copy calls on its first
    read to open the store itself. `close` returns a reader to that state, so it can be closed
    at the end of an iterator and still read again later.

    Args:
        opener: Opens the store: returns the canonical lazy dataset (`readers` form) holding the
            variables to read in canonical dimension order, levels already selected, and the
            store it reads through (closed by `close`). Must pickle to use worker processes.
        surf, atmos: The dataset keys of the surface and atmospheric variables.
        name: The store, for error messages.
        regridder: Applied to every field, or None to keep the store's grid.
        max_workers: Variables read at once.
        fill_nan: How to fill each variable's NaNs (``"zero"``, ``"mean"``, a number), by
            dataset key; a variable not in it must hold no NaN (see `readers.open_dataset`).
        opened: The result of `opener()` when the caller has it already.
    """

    def __init__(
        self,
        opener: Callable[[], tuple[xr.Dataset, Any]],
        surf: Sequence[str],
        atmos: Sequence[str],
        name: str,
        regridder: Regridder | None = None,
        max_workers: int = 8,
        fill_nan: Mapping[str, Fill] | None = None,
        opened: tuple[xr.Dataset, Any] | None = None,
    ) -> None:
        self.opener = opener
        self.groups = {**dict.fromkeys(surf, "surf"), **dict.fromkeys(atmos, "atmos")}
        self.name, self.regridder = name, regridder
        self.max_workers = max(1, int(max_workers))
        self.fill_nan = dict(fill_nan or {})
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        ds, store = opened if opened is not None else opener()
        self._owns_store = opened is None  # a store handed in is its owner's to close
        self.times = ds["time"].values.astype("datetime64[ns]")
        self.seconds = self.times.astype("datetime64[s]").astype(np.int64)
        self._arrays: dict[str, xr.DataArray] | None = self._take(ds)
        self._store: Any = store

    def read(self, t: int) -> dict[str, Any]:
        """The record at time position `t` of the dataset.

        Args:
            t: Index along the dataset's time axis.

        Returns:
            ``{"time": int64 seconds, "surf": {key: (h, w)}, "atmos": {key: (levels, h, w)}}``,
            float32 on the output grid.

        Raises:
            DataError: Naming the store, variable and time, for unreadable chunks (missing,
                truncated, HTTP errors after the retries) and for NaNs `fill_nan` does not fill.
        """
        with self._lock:  # submitted under the lock, so `close` waits for these reads
            arrays, pool = self._ready()
            futures = {k: pool.submit(self._read_variable, arrays[k], k, t) for k in self.groups}
        out: dict[str, Any] = {"time": np.int64(self.seconds[t]), "surf": {}, "atmos": {}}
        for key, future in futures.items():
            out[self.groups[key]][key] = future.result()
        return out

    def _ready(self) -> tuple[dict[str, xr.DataArray], ThreadPoolExecutor]:
        """The lazy arrays and the thread pool, (re)opening the store after pickling or close
        (lock held)."""
        if self._arrays is None:
            ds, self._store = self.opener()
            self._arrays, self._owns_store = self._take(ds), True
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="zarr-var")
        return self._arrays, self._pool

    def _take(self, ds: xr.Dataset) -> dict[str, xr.DataArray]:
        """The arrays to read; the times must be those the records were indexed by."""
        times = ds["time"].values.astype("datetime64[ns]")
        if not np.array_equal(times, self.times):
            raise DataError(
                f"{self.name}: the store's times changed since it was first opened "
                f"({len(self.times)} -> {len(times)} times); rebuild the data source"
            )
        return {k: ds[k] for k in self.groups}

    def _read_variable(self, da: xr.DataArray, key: str, t: int) -> np.ndarray:
        source = da.attrs.get("source_name", key)
        when = str(self.times[t])[:19]
        try:
            x = np.asarray(da.isel(time=t).values, dtype=np.float32)
        except Exception as e:  # zarr, codecs and fsspec raise many types
            why = "truncated or missing chunk, or the server failed"
            if isinstance(e, MissingChunkError):
                why = (
                    "zarr-python 3 leaves out chunks that hold only the fill value (all NaN): "
                    "allow_missing_chunks=True reads them so"
                )
            raise DataError(
                f"{self.name}: cannot read variable {source} ({key}) at time {when} "
                f"({type(e).__name__}: {e}); {why}"
            ) from e
        n = int(np.isnan(x).sum())
        how = self.fill_nan.get(key)
        if n and not (how is None and key in MASKED_VARS):  # wave fields' NaNs are data
            if how is None:
                raise DataError(
                    f"{self.name}: variable {source} ({key}) has {n} NaN values at time {when} "
                    "(a missing chunk reads as NaN); pass fill_nan= to fill them"
                )
            try:
                x = fill_nans(x, how, self.name, key)  # type: ignore[arg-type]
            except DataError as e:
                raise DataError(f"{e} (time {when})") from e
        if self.regridder is not None:
            x = self.regridder(x)
        return np.ascontiguousarray(x, dtype=np.float32)

    def close(self) -> None:
        """Stop the worker threads and close the store if this reader opened it.

        Reads already under way finish (before the store closes); a later `read` starts the
        threads again and reopens the store. A store handed in as `opened` stays open: it is
        shared with its owner.
        """
        with self._lock:
            pool, self._pool = self._pool, None
            store = self._store if self._owns_store else None
            if store is not None:
                self._store, self._arrays = None, None
        if pool is not None:
            pool.shutdown(wait=store is not None)
        if store is not None:
            store.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_lock=None, _arrays=None, _store=None, _pool=None, _owns_store=True)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Records:
    """The records of one split: ``len``, and ``[i]`` reads lazily with read-ahead.

    Reading record i also schedules records i+1 .. i+`read_ahead` in the background; a record
    read ahead is handed out once and then forgotten, so memory stays at a few records. Safe to
    use from several threads (the pipeline's prefetch threads). Pickles without its threads
    (see `Reader`), for Grain's worker processes; `close` stops them until the next read.

    Args:
        reader: Reads one time position.
        positions: The split's positions along the store's time axis, in record order.
        read_ahead: Records read ahead of the last one asked for; 0 disables it.
    """

    def __init__(self, reader: Reader, positions: Sequence[int], read_ahead: int = 2) -> None:
        self.reader = reader
        self.positions = np.asarray(positions, np.int64)
        self.read_ahead = max(0, int(read_ahead))
        self._lock = threading.Lock()
        self._ahead: OrderedDict[int, Future] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def times(self) -> np.ndarray:
        """int64 seconds since 1970 of the records, shape `(len(self),)`."""
        return self.reader.seconds[self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range ({len(self)} records)")
        with self._lock:
            future = self._ahead.pop(i, None)
            self._schedule(i)
        if future is not None:
            try:
                return future.result()
            except CancelledError:  # `close` ran meanwhile: read it here
                pass
        return self.reader.read(int(self.positions[i]))

    def _schedule(self, i: int) -> None:
        """Start reading the records after `i` that are not already under way (lock held)."""
        if not self.read_ahead:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.read_ahead, thread_name_prefix="zarr-ahead")
        for j in range(i + 1, min(i + 1 + self.read_ahead, len(self))):
            if j not in self._ahead:
                self._ahead[j] = self._pool.submit(self.reader.read, int(self.positions[j]))
        while len(self._ahead) > 2 * self.read_ahead:  # jumped elsewhere: drop the oldest
            self._ahead.popitem(last=False)[1].cancel()

    def close(self) -> None:
        """Stop the read-ahead and the reader's threads and close the store.

        Records read ahead are dropped; a later ``[i]`` starts everything again.
        """
        with self._lock:
            pool, self._pool = self._pool, None
            ahead, self._ahead = self._ahead, OrderedDict()
        for future in ahead.values():
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        self.reader.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_lock=None, _ahead=None, _pool=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._ahead = OrderedDict()
