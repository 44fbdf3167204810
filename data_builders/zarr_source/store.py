"""Open a zarr store (local path, ``file://``, ``https://``, ``gs://``) for streaming reads.

Every key goes through `CheckedStore`, a thin wrapper around zarr's own store that

* retries transient failures (HTTP 5xx / 408 / 429, connection resets, timeouts, truncated
  transfers) with exponential backoff, because a cloud bucket read for weeks of training will
  see them, and one must not end a run;
* refuses a missing chunk: zarr silently returns the array's fill value for a chunk that does
  not exist (an HTTP 404 looks the same), which for a variable whose fill value is not NaN
  would reach the model as data.

Nothing but metadata is read when a store is opened.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xarray as xr
from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from data_builders.errors import DataError

__all__ = ["CheckedStore", "MissingChunkError", "is_transient", "open_store"]

log = logging.getLogger(__name__)

_METADATA = frozenset({".zarray", ".zattrs", ".zgroup", ".zmetadata", "zarr.json"})
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class MissingChunkError(KeyError):
    """A chunk key the store does not hold (a deleted file, an HTTP 404)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def is_transient(error: BaseException) -> bool:
    """Whether a failed read is worth retrying: server errors, resets, timeouts, cut transfers.

    Args:
        error: The exception a store raised.

    Returns:
        True for errors that a later attempt may not see.
    """
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, ConnectionError)):
        return True
    try:
        import aiohttp
    except ImportError:  # pragma: no cover - aiohttp is a dependency
        aiohttp = None
    if aiohttp is not None:
        if isinstance(error, aiohttp.ClientResponseError):
            return error.status in _RETRY_STATUS
        if isinstance(error, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
            return True
    status = getattr(error, "status", None) or getattr(error, "code", None)  # gcsfs HttpError
    return isinstance(status, int) and status in _RETRY_STATUS


class CheckedStore(WrapperStore[Store]):
    """A read-only zarr store that retries transient errors and refuses missing chunks.

    Args:
        store: The zarr store to wrap.
        retries: Extra attempts after a transient failure.
        retry_wait: Seconds before the first retry; doubled before each further one.
        allow_missing_chunks: Let a missing chunk read as the fill value (zarr's default).
    """

    def __init__(
        self,
        store: Store,
        *,
        retries: int = 3,
        retry_wait: float = 0.5,
        allow_missing_chunks: bool = False,
    ) -> None:
        super().__init__(store)
        self.retries, self.retry_wait = int(retries), float(retry_wait)
        self.allow_missing_chunks = bool(allow_missing_chunks)

    def _with_store(self, store: Store) -> CheckedStore:
        return type(self)(
            store,
            retries=self.retries,
            retry_wait=self.retry_wait,
            allow_missing_chunks=self.allow_missing_chunks,
        )

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        """The value of `key`, retried on transient errors; a missing chunk raises."""
        for attempt in range(self.retries + 1):
            try:
                value = await self._store.get(key, prototype, byte_range)
                break
            except Exception as e:
                if attempt == self.retries or not is_transient(e):
                    raise
                wait = self.retry_wait * 2**attempt
                log.warning("%s: %s (%s); retrying in %.2g s", key, type(e).__name__, e, wait)
                await asyncio.sleep(wait)
        if value is None and not self.allow_missing_chunks and _is_chunk(key):
            raise MissingChunkError(f"chunk {key!r} is missing from the store")
        return value


def _is_chunk(key: str) -> bool:
    return key.rsplit("/", 1)[-1] not in _METADATA


def _local_path(url: str) -> Path | None:
    """The local path of a plain path or a ``file://`` URL; None for remote URLs."""
    if url.startswith("file://"):
        return Path(url[len("file://") :])
    return None if "://" in url else Path(url)


def open_store(
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
    retries: int = 3,
    retry_wait: float = 0.5,
    allow_missing_chunks: bool = False,
) -> tuple[xr.Dataset, CheckedStore]:
    """Open a zarr store lazily through a `CheckedStore`.

    Args:
        url: A local path, ``file://``, ``http(s)://`` or ``gs://`` URL (any fsspec protocol).
        storage_options: fsspec options for remote URLs; ``gs://`` defaults to anonymous access
            (``token="anon"``), which the public WeatherBench2 and ARCO-ERA5 buckets allow.
        retries: Extra attempts after a transient failure.
        retry_wait: Seconds before the first retry; doubled before each further one.
        allow_missing_chunks: Let missing chunks read as the fill value.

    Returns:
        The raw (not yet canonical) dataset, and the store it reads through.

    Raises:
        DataError: If the store is missing or unreadable, or needs a package that is missing.
    """
    local = _local_path(url)
    try:
        if local is not None:
            if not local.exists():
                raise DataError(f"{url}: no such zarr store")
            inner: Store = LocalStore(local, read_only=True)
        else:
            opts = dict(storage_options or {})
            if url.startswith(("gs://", "gcs://")):
                opts.setdefault("token", "anon")
            inner = FsspecStore.from_url(url, storage_options=opts, read_only=True)
    except ImportError as e:
        need = "aurora-jax[gcs]" if url.startswith(("gs://", "gcs://")) else "aiohttp"
        raise DataError(f"{url}: cannot open zarr store: {e} (pip install {need})") from e
    # Opening reads the coordinates, whose chunks zarr-python 3 leaves unwritten when they
    # equal the fill value (a time 0 days after the units' epoch): only data chunks must exist.
    store = CheckedStore(inner, retries=retries, retry_wait=retry_wait, allow_missing_chunks=True)
    try:
        ds = xr.open_zarr(store, chunks=None, consolidated=None, decode_timedelta=True)
    except DataError:
        raise
    except Exception as e:  # zarr / fsspec raise many types for missing or damaged stores
        raise DataError(f"{url}: cannot open zarr store ({type(e).__name__}: {e})") from e
    if not ds.data_vars:
        raise DataError(
            f"{url}: the store shows no variables; without consolidated metadata a store is only "
            "readable where its folders can be listed (a local path, gs://), not over https:// "
            "(consolidate it: zarr.consolidate_metadata)"
        )
    store.allow_missing_chunks = bool(allow_missing_chunks)
    return ds, store
