"""Where a built dataset's fields live: raw blob files, one per time chunk, shared across builds.

A record at 0.25 degrees is ~290 MB. Stored inside array_record, reading one costs a copy and a
checksum pass through riegeli (~0.25 GB/s per core); stored as plain bytes in a file it is one
``preadv`` into a numpy buffer (page-cache speed, several GB/s). So the TFDS dataset holds only
small references (time, chunk file, offset, size), and the fields live here.

The store is keyed by what the fields *are* (`identity`: variables, levels, grid, regridding,
codec, chunking), not by the time range or the splits. A chunk covers the aligned time bin
``[k * chunk_hours, (k + 1) * chunk_hours)`` since 1970, whatever the splits, so extending the
time range, or moving a split boundary, rebuilds only the index and the chunks not built yet.
Chunks are written by whoever builds them (the builder, or its worker processes), each in its own
files, so building is parallel over chunks without coordination:

* ``<start>.bin``: the chunk's blobs, back to back, in time order (each encoded with the codec);
* ``<start>.npz``: its index: ``times`` (int64 seconds), ``offsets``, ``nbytes``, per-time
  statistics (count, mean, M2 per stats key, float64), the grid, levels, units and the source
  files it was read from (path, size, mtime), so a chunk whose files changed is rebuilt.

The index is renamed into place last: a chunk without one is incomplete and is rebuilt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_builders.errors import DataError

__all__ = [
    "BlobFiles",
    "BlobStore",
    "ChunkIndex",
    "bin_start",
    "identity",
    "source_stamps",
]

STORE_VERSION = 1


def identity(fields: Mapping[str, Any]) -> str:
    """A short stable hash of what the stored fields are (JSON-able `fields`)."""
    digest = json.dumps({"store_version": STORE_VERSION, **fields}, sort_keys=True).encode()
    return "b" + hashlib.sha1(digest).hexdigest()[:12]


def bin_start(seconds: np.ndarray, chunk_hours: int) -> np.ndarray:
    """The start (seconds since 1970) of the aligned chunk each time falls in."""
    width = int(chunk_hours) * 3600
    return (np.asarray(seconds, np.int64) // width) * width


@dataclasses.dataclass
class ChunkIndex:
    """What one chunk file holds (see the module docstring)."""

    times: np.ndarray  # int64 seconds, increasing
    offsets: np.ndarray  # int64 byte offsets into <start>.bin
    nbytes: np.ndarray  # int64 stored sizes
    stat_keys: list[str]
    stats: np.ndarray  # float64 (times, keys, 3): count, mean, M2
    lat: np.ndarray
    lon: np.ndarray
    levels: list[float]
    units: dict[str, str]
    sources: list[list[Any]]  # [path, size, mtime_ns]


def source_stamps(paths: Iterable[str]) -> list[list[Any]]:
    """[path, size, mtime_ns] of each local source (a store's folder counts by its own stat)."""
    out = []
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
        except OSError:
            continue  # not a local file (a URL, a synthetic source): nothing to compare later
        out.append([p, int(st.st_size), int(st.st_mtime_ns)])
    return out


class BlobStore:
    """The chunk files of one identity under `root` (a folder; created on first write)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, start: int) -> tuple[Path, Path]:
        stem = str(np.datetime64(int(start), "s")).replace(":", "")
        return self.root / f"{stem}.bin", self.root / f"{stem}.npz"

    def file_name(self, start: int) -> str:
        """The blob file of the chunk starting at `start`, relative to the store."""
        return self._paths(start)[0].name

    def load(self, start: int) -> ChunkIndex | None:
        """The index of a complete, current chunk; None when it must be (re)built."""
        blob_path, index_path = self._paths(start)
        if not index_path.exists() or not blob_path.exists():
            return None
        with np.load(index_path) as z:
            meta = json.loads(str(z["meta"]))
            index = ChunkIndex(
                times=z["times"],
                offsets=z["offsets"],
                nbytes=z["nbytes"],
                stat_keys=meta["stat_keys"],
                stats=z["stats"],
                lat=z["lat"],
                lon=z["lon"],
                levels=meta["levels"],
                units=meta["units"],
                sources=meta["sources"],
            )
        stored = int(index.offsets[-1] + index.nbytes[-1]) if len(index.times) else 0
        if blob_path.stat().st_size != stored:
            return None  # cut short (a crash between the two renames cannot do this; a copy can)
        if source_stamps(s[0] for s in index.sources) != index.sources:
            return None  # its source files changed or went away
        return index

    def write(
        self,
        start: int,
        records: Iterable[tuple[int, bytes | memoryview, np.ndarray]],
        *,
        stat_keys: list[str],
        lat: np.ndarray,
        lon: np.ndarray,
        levels: Sequence[float],
        units: Mapping[str, str],
        sources: list[list[Any]],
    ) -> ChunkIndex:
        """Write one chunk: `records` yields (time, stored bytes, stats row) in time order.

        Args:
            start: The chunk's aligned start (seconds).
            records: (time, encoded blob, `stats.field_stats` row over `stat_keys`) triples.
            stat_keys: The statistics keys, in row order.
            lat, lon, levels, units: The grid and units of the fields.
            sources: `source_stamps` of the files read.

        Returns:
            The chunk's index, once both files are in place.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        blob_path, index_path = self._paths(start)
        tmp_blob = blob_path.with_suffix(f".bin.tmp{os.getpid()}")
        tmp_index = index_path.with_suffix(f".tmp{os.getpid()}.npz")
        times, offsets, sizes, rows = [], [], [], []
        offset = 0
        with open(tmp_blob, "wb") as f:
            for t, data, row in records:
                n = f.write(data)
                times.append(int(t))
                offsets.append(offset)
                sizes.append(n)
                rows.append(row)
                offset += n
            f.flush()
            os.fsync(f.fileno())
        index = ChunkIndex(
            times=np.asarray(times, np.int64),
            offsets=np.asarray(offsets, np.int64),
            nbytes=np.asarray(sizes, np.int64),
            stat_keys=list(stat_keys),
            stats=np.asarray(rows, np.float64).reshape(len(times), len(stat_keys), 3),
            lat=np.asarray(lat, np.float64),
            lon=np.asarray(lon, np.float64),
            levels=[float(x) for x in levels],
            units=dict(units),
            sources=sources,
        )
        text = json.dumps(
            {
                "stat_keys": index.stat_keys,
                "levels": list(index.levels),
                "units": index.units,
                "sources": index.sources,
            }
        )
        np.savez(
            tmp_index,
            times=index.times,
            offsets=index.offsets,
            nbytes=index.nbytes,
            stats=index.stats,
            lat=index.lat,
            lon=index.lon,
            meta=np.array(text),
        )
        os.replace(tmp_blob, blob_path)
        os.replace(tmp_index, index_path)
        return index


class BlobFiles:
    """Reads stored blobs by (file, offset, size): one ``preadv`` each, into a fresh buffer.

    Open files are cached per process and dropped when pickled, so Grain worker processes
    reopen their own.
    """

    def __init__(self, root: str | Path, name: str) -> None:
        self.root, self.name = Path(root), name
        self._fds: dict[str, int] = {}

    def read(self, file: str, offset: int, nbytes: int, what: str) -> np.ndarray:
        """The stored bytes (uint8, read-only); a clear error when the file is short or gone."""
        fd = self._fds.get(file)
        if fd is None:
            path = self.root / file
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{self.name}: {what}: cannot open {path} ({e})") from e
            self._fds[file] = fd
        buf = np.empty(nbytes, np.uint8)
        got = os.preadv(fd, [buf], offset)
        if got != nbytes:
            raise DataError(
                f"{self.name}: {what}: {self.root / file} holds {got} of {nbytes} bytes at "
                f"offset {offset}; the dataset is damaged, rebuild it"
            )
        buf.flags.writeable = False
        return buf

    def close(self) -> None:
        """Close the cached files (they reopen on the next read)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown os may be gone
            self.close()
