"""The replay strategy's buffer: entries that share their states, stored compactly, optionally
spilled to local disk, and checkpointed incrementally by each process on its own.

At 0.25° one state of AuroraPretrained is 4 surface + 5 x 13 atmospheric = 69 fields of
720 x 1440 values, 286 MB in float32, and an entry is an input history of two states. The layout
keeps the paper's 200 entries per device affordable (`benchmarks/replay_memory.py` computes the
bytes):

* **Shared states.** A prediction's entry is `(its parent's newer state, the prediction)`, so
  consecutive entries of one chain share a state. States are stored once, counted by reference,
  and dropped with the last entry that uses them: a chain of entries costs one state each, a
  fresh dataset entry two.
* **Compact states** (`dtype`, see :data:`BUFFER_DTYPES`). The default `"uint16"` maps each
  field's values linearly onto 0..65534 (offset and scale per field, NaN as 65535): half of
  float32's bytes with an error of at most half a step, `(max - min) / 131068` of that field in that
  state. bfloat16 costs the same bytes but its error scales with the values' magnitude rather than
  their spread: up to 2^-8 of the value, 128 m²/s² on a 500 hPa geopotential near 55,000 m²/s²
  and 0.5 K on a 250 K temperature, more than a 6-hour forecast's error; uint16's is about
  0.1 m²/s² and under 1 mK there. `"float32"` keeps the values exactly.
* **Spill** (`spill_dir`, `ram_bytes`). Beyond `ram_bytes` of states in memory, the oldest go to
  one `.npz` file each under a directory of their own in `spill_dir` (local disk), read back
  exactly when sampled, deleted with their last entry and when the buffer is garbage collected.
* **Incremental checkpoints** (:meth:`ReplayBuffer.save`). A store directory holds one file per
  state and one JSON index per checkpoint step; a checkpoint writes the states the store lacks
  (those added since the last checkpoint) and its index, and :meth:`ReplayBuffer.prune` removes
  the indices of checkpoints that no longer exist and the states no index names. State names
  carry a per-buffer random token, so a run resumed from an older checkpoint never overwrites a
  state that a newer index still names.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np

__all__ = ["BUFFER_DTYPES", "Entry", "Layout", "ReplayBuffer", "decode", "encode"]

BUFFER_DTYPES = ("uint16", "bfloat16", "float32")
"""How states are stored: per-field linear uint16 codes (default), bfloat16, or exact float32."""

_NAN_CODE = 65535
_STEPS = 65534.0  # codes 0..65534 hold values; 65535 is NaN


@dataclasses.dataclass(frozen=True)
class Entry:
    """One buffer entry: an input history, as the names of its two states (older, newer), and the
    time its prediction is scored at. Times are minutes since 1970 (as `Metadata.time`)."""

    states: tuple[str, str]
    time: int
    rollout_step: int
    target_time: int

    @property
    def lead_steps(self) -> int:
        """Model steps from the dataset state to this entry's prediction."""
        return self.rollout_step + 1


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one state's fields pack into one `(channels, h, w)` array: each surface variable one
    channel, each atmospheric variable one channel per level, in this order."""

    surf: tuple[str, ...]
    atmos: tuple[tuple[str, int], ...]  # (name, levels)

    @classmethod
    def of(cls, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray]) -> Layout:
        """The layout of one state's fields: `surf[v]` `(h, w)`, `atmos[v]` `(levels, h, w)`."""
        return cls(tuple(surf), tuple((v, int(np.shape(x)[0])) for v, x in atmos.items()))

    @property
    def channels(self) -> int:
        return len(self.surf) + sum(n for _, n in self.atmos)

    def pack(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray]) -> np.ndarray:
        """One state's fields as one float32 `(channels, h, w)` array."""
        parts = [np.asarray(surf[v], np.float32)[None] for v in self.surf]
        parts += [np.asarray(atmos[v], np.float32) for v, _ in self.atmos]
        return np.concatenate(parts)

    def unpack(self, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """`pack`'s inverse for `x` `(..., channels, h, w)`: `surf[v]` `(..., h, w)`, `atmos[v]`
        `(..., levels, h, w)` (views of `x`)."""
        surf = {v: x[..., i, :, :] for i, v in enumerate(self.surf)}
        atmos, i = {}, len(self.surf)
        for v, n in self.atmos:
            atmos[v], i = x[..., i : i + n, :, :], i + n
        return surf, atmos


def encode(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """A float32 state `(channels, h, w)` stored as `dtype` (one of :data:`BUFFER_DTYPES`).

    Returns:
        `{"data": ...}`, plus per-channel `offset` and `scale` (float64) for `"uint16"`, whose
        values decode as `offset + code * scale`.
    """
    x = np.asarray(x, np.float32)
    if dtype == "float32":
        return {"data": x.copy()}
    if dtype == "bfloat16":
        return {"data": x.astype(ml_dtypes.bfloat16).view(np.uint16)}
    if dtype != "uint16":
        raise ValueError(f"buffer_dtype must be one of {BUFFER_DTYPES}, not {dtype!r}.")
    flat = x.reshape(len(x), -1).astype(np.float64)
    finite = np.isfinite(flat)
    lo = np.where(finite, flat, np.inf).min(axis=1)
    hi = np.where(finite, flat, -np.inf).max(axis=1)
    lo, hi = np.where(np.isfinite(lo), lo, 0.0), np.where(np.isfinite(hi), hi, 0.0)
    scale = (hi - lo) / _STEPS
    codes = np.rint((flat - lo[:, None]) / np.where(scale > 0, scale, 1.0)[:, None])
    codes = np.where(finite, np.clip(codes, 0, _STEPS), _NAN_CODE).astype(np.uint16)
    return {"data": codes.reshape(x.shape), "offset": lo, "scale": scale}


def decode(arrays: dict[str, np.ndarray], dtype: str) -> np.ndarray:
    """`encode`'s float32 state back from what it stored."""
    data = arrays["data"]
    if dtype == "float32":
        return np.asarray(data, np.float32)
    if dtype == "bfloat16":
        return np.asarray(data).view(ml_dtypes.bfloat16).astype(np.float32)
    shape = (-1,) + (1,) * (data.ndim - 1)
    values = arrays["offset"].reshape(shape) + data * arrays["scale"].reshape(shape)
    return np.where(data == _NAN_CODE, np.nan, values).astype(np.float32)


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write atomically (a reader never sees half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


class ReplayBuffer:
    """A first-in first-out buffer of `Entry`s with uniform sampling with replacement.

    Args:
        capacity: entries kept (the oldest go beyond it).
        dtype: how states are stored (:data:`BUFFER_DTYPES`; see the module docstring).
        spill_dir: a local directory for states beyond `ram_bytes` (None: all in memory).
        ram_bytes: bytes of states kept in memory when spilling (default 0: all on disk).
    """

    def __init__(
        self,
        capacity: int,
        dtype: str = "uint16",
        spill_dir: str | Path | None = None,
        ram_bytes: int | None = None,
    ):
        if capacity < 1:
            raise ValueError(f"The replay buffer needs capacity >= 1, not {capacity}.")
        if dtype not in BUFFER_DTYPES:
            raise ValueError(f"buffer_dtype must be one of {BUFFER_DTYPES}, not {dtype!r}.")
        if ram_bytes is not None and spill_dir is None:
            raise ValueError("A RAM budget for the replay buffer needs a spill_dir.")
        self.capacity = capacity
        self.dtype = dtype
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        self.ram_bytes = ram_bytes or 0
        self.entries: list[Entry] = []
        self.layout: Layout | None = None
        self._states: dict[str, dict[str, np.ndarray] | None] = {}  # None: spilled
        self._refs: dict[str, int] = {}
        self._token = secrets.token_hex(4)
        self._count = 0
        self._spill: Path | None = None  # created on the first spill

    def __len__(self) -> int:
        return len(self.entries)

    def __deepcopy__(self, memo: dict) -> ReplayBuffer:
        """A copy with its own spill directory (spilled files belong to one buffer)."""
        ram = self.ram_bytes if self.spill_dir is not None else None
        new = ReplayBuffer(self.capacity, self.dtype, self.spill_dir, ram)
        new.layout, new.entries, new._count = self.layout, list(self.entries), self._count
        for name in self._states:
            new._insert(name, {k: a.copy() for k, a in self._stored(name).items()})
        new._refs = dict(self._refs)
        return new

    # --- adding and evicting ----------------------------------------------------------------------
    def push_history(
        self,
        surf: dict[str, np.ndarray],
        atmos: dict[str, np.ndarray],
        time: int,
        rollout_step: int,
        target_time: int,
    ) -> Entry:
        """Add an entry of two new states: `surf[v]` `(2, h, w)`, `atmos[v]` `(2, levels, h, w)`
        (e.g. a dataset example's row); evicts the oldest entries beyond `capacity`."""
        older = self._add_state(
            {v: x[0] for v, x in surf.items()}, {v: x[0] for v, x in atmos.items()}
        )
        newer = self._add_state(
            {v: x[1] for v, x in surf.items()}, {v: x[1] for v, x in atmos.items()}
        )
        return self._push(Entry((older, newer), int(time), int(rollout_step), int(target_time)))[0]

    def push_child(
        self,
        parent: Entry,
        surf: dict[str, np.ndarray],
        atmos: dict[str, np.ndarray],
        time: int,
        rollout_step: int,
        target_time: int,
    ) -> Entry:
        """Add the entry `(parent's newer state, the prediction surf[v] (h, w) / atmos[v] (levels,
        h, w))`; evicts the oldest entries beyond `capacity`."""
        return self.push_children([(parent, surf, atmos, time, rollout_step, target_time)])[0]

    def push_children(
        self,
        children: Sequence[
            tuple[Entry, dict[str, np.ndarray], dict[str, np.ndarray], int, int, int]
        ],
    ) -> list[Entry]:
        """`push_child` for each `(parent, surf, atmos, time, rollout_step, target_time)`, all
        added before any is evicted: a parent that an earlier child evicts still lends its state
        to its own child."""
        entries = [
            Entry((parent.states[1], self._add_state(surf, atmos)), int(t), int(step), int(target))
            for parent, surf, atmos, t, step, target in children
        ]
        return self._push(*entries)

    def _push(self, *entries: Entry) -> list[Entry]:
        for entry in entries:
            for name in entry.states:
                self._refs[name] += 1
        self.entries.extend(entries)
        for old in self.entries[: max(0, len(self.entries) - self.capacity)]:
            for name in old.states:
                self._release(name)
        del self.entries[: max(0, len(self.entries) - self.capacity)]
        return list(entries)

    def _add_state(self, surf: dict[str, np.ndarray], atmos: dict[str, np.ndarray]) -> str:
        if self.layout is None:
            self.layout = Layout.of(surf, atmos)
        name = f"{self._token}-{self._count}"
        self._count += 1
        self._insert(name, encode(self.layout.pack(surf, atmos), self.dtype))
        return name

    def _insert(self, name: str, arrays: dict[str, np.ndarray]) -> None:
        self._states[name] = arrays
        self._refs[name] = 0
        self._spill_beyond_budget()

    def _release(self, name: str) -> None:
        self._refs[name] -= 1
        if not self._refs[name]:
            self._drop(name)

    def _drop(self, name: str) -> None:
        if self._states.pop(name) is None:
            self._spill_path(name).unlink()
        del self._refs[name]

    # --- spilling ---------------------------------------------------------------------------------
    def _spill_path(self, name: str) -> Path:
        if self._spill is None:
            assert self.spill_dir is not None
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            prefix = f"replay-process{jax.process_index()}-"
            self._spill = Path(tempfile.mkdtemp(prefix=prefix, dir=self.spill_dir))
            self._remove_spill = weakref.finalize(self, shutil.rmtree, self._spill, True)
        return self._spill / f"{name}.npz"

    def _spill_beyond_budget(self) -> None:
        if self.spill_dir is None:
            return
        in_ram = [n for n, a in self._states.items() if a is not None]  # oldest first
        used = sum(_nbytes(self._states[n]) for n in in_ram)
        for name in in_ram:
            if used <= self.ram_bytes:
                break
            arrays = self._states[name]
            _write_npz(self._spill_path(name), arrays)
            self._states[name] = None
            used -= _nbytes(arrays)

    def _stored(self, name: str) -> dict[str, np.ndarray]:
        arrays = self._states[name]
        return _read_npz(self._spill_path(name)) if arrays is None else arrays

    # --- reading ----------------------------------------------------------------------------------
    def sample(self, rng: np.random.Generator, n: int, max_lead_steps: int) -> list[Entry]:
        """Draw entries uniformly with replacement among those within the lead-time cap.

        Args:
            rng: the sampling RNG (advanced).
            n: entries to draw.
            max_lead_steps: the cap on `Entry.lead_steps`.

        Returns:
            `n` entries.
        """
        eligible = [e for e in self.entries if e.lead_steps <= max_lead_steps]
        if not eligible:
            raise RuntimeError(
                f"No replay entry within the lead-time cap of {max_lead_steps} steps."
            )
        return [eligible[i] for i in rng.integers(0, len(eligible), size=n)]

    def state(self, name: str) -> np.ndarray:
        """One stored state decoded: float32 `(channels, h, w)` in `layout`'s order."""
        return decode(self._stored(name), self.dtype)

    def history(self, entry: Entry) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """An entry's input history, float32: `surf[v]` `(2, h, w)`, `atmos[v]` `(2, levels, h,
        w)`."""
        assert self.layout is not None
        return self.layout.unpack(np.stack([self.state(n) for n in entry.states]))

    def nbytes(self) -> dict[str, int]:
        """Bytes of states held: `{"ram": ..., "disk": ...}` (spilled)."""
        ram = sum(_nbytes(a) for a in self._states.values() if a is not None)
        disk = sum(self._spill_path(n).stat().st_size for n, a in self._states.items() if a is None)
        return {"ram": ram, "disk": disk}

    # --- checkpointing ----------------------------------------------------------------------------
    def save(self, store: Path, step: int, extra: dict[str, Any]) -> int:
        """Write checkpoint `step` into `store`: the states it lacks, then the index.

        Args:
            store: this buffer's checkpoint directory (one per process and checkpoint folder).
            step: the checkpoint's step.
            extra: JSON-serialisable host state saved with the index (e.g. the sampling RNG).

        Returns:
            Bytes of state files written (those added since the last checkpoint into `store`).
        """
        (store / "states").mkdir(parents=True, exist_ok=True)
        (store / "index").mkdir(exist_ok=True)
        written = 0
        for name, arrays in self._states.items():
            path = store / "states" / f"{name}.npz"
            if path.exists():
                continue
            if arrays is None:
                shutil.copyfile(self._spill_path(name), path.with_name(path.name + ".tmp"))
                os.replace(path.with_name(path.name + ".tmp"), path)
            else:
                _write_npz(path, arrays)
            written += path.stat().st_size
        index = {
            "dtype": self.dtype,
            "layout": None if self.layout is None else dataclasses.asdict(self.layout),
            "entries": [dataclasses.asdict(e) for e in self.entries],
            **extra,
        }
        tmp = store / "index" / f"{step}.json.tmp"
        tmp.write_text(json.dumps(index))
        os.replace(tmp, store / "index" / f"{step}.json")
        return written

    def restore(self, store: Path, step: int) -> dict[str, Any]:
        """Replace the entries with those of checkpoint `step` in `store` (see `save`).

        Returns:
            The index, with the `extra` host state it was saved with.

        Raises:
            FileNotFoundError: the index or one of its states is missing.
        """
        index = json.loads((store / "index" / f"{step}.json").read_text())
        entries = [
            Entry(tuple(e["states"]), e["time"], e["rollout_step"], e["target_time"])
            for e in index["entries"]
        ]
        names = list(dict.fromkeys(n for e in entries for n in e.states))
        missing = [n for n in names if not (store / "states" / f"{n}.npz").exists()]
        if missing:
            raise FileNotFoundError(
                f"Replay checkpoint {store}/index/{step}.json names {len(missing)} states that "
                f"{store}/states lacks, e.g. {missing[0]}."
            )
        self.clear()
        layout = index["layout"]
        if layout is not None:
            self.layout = Layout(tuple(layout["surf"]), tuple((v, n) for v, n in layout["atmos"]))
        for name in names:
            arrays = _read_npz(store / "states" / f"{name}.npz")
            if index["dtype"] != self.dtype:  # stored otherwise than this run stores them
                arrays = encode(decode(arrays, index["dtype"]), self.dtype)
            self._insert(name, arrays)
        for entry in entries:
            for name in entry.states:
                self._refs[name] += 1
        self.entries = entries
        return index

    def clear(self) -> None:
        """Drop every entry and state."""
        for name in list(self._states):
            self._refs[name] = 1
            self._release(name)
        self.entries = []

    def close(self) -> None:
        """Drop every entry and state and remove the spill directory (as garbage collection
        does)."""
        self.clear()
        if self._spill is not None:
            self._remove_spill()
            self._spill = None

    @staticmethod
    def prune(store: Path, keep: Iterable[int]) -> None:
        """Delete from `store` the indices of steps not in `keep` and the states no kept index
        names."""
        keep = {int(s) for s in keep}
        named: set[str] = set()
        for path in sorted((store / "index").glob("*.json")):
            if int(path.stem) not in keep:
                path.unlink()
                continue
            for e in json.loads(path.read_text())["entries"]:
                named.update(e["states"])
        for path in (store / "states").glob("*.npz"):
            if path.stem not in named:
                path.unlink()

    @staticmethod
    def steps(store: Path) -> Sequence[int]:
        """The checkpoint steps whose index `store` holds."""
        return sorted(int(p.stem) for p in (store / "index").glob("*.json"))


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in arrays.values())
