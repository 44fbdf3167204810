"""Input pipeline: a built dataset (random access by record, indexed by time) -> `aurora.Batch`.

`open_source(builder, split)` turns a built dataset into a `WeatherSource`: the records, their
times, the grid, the levels, the static fields and the dataset's statistics. `Pipeline` turns a
source's windows of 2 history steps + K targets into shuffled, sharded, batched and prefetched
``(inputs, targets)`` pairs of `aurora.Batch`, with a Grain iterator whose state is checkpointed
so that a resumed run sees the same batches. `Pipeline`'s docstring states the contract.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from aurora.batch import Batch, Metadata
from data_builders.errors import DataError

__all__ = ["Pipeline", "WeatherSource", "find_windows", "open_source"]

Example = Mapping[str, Any]
Window = list[Example]  # the 2 + K records of one window, in time order


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class WeatherSource:
    """A random-access dataset of weather states plus what is needed to make `Batch`es of it.

    Attributes:
        records (Any): Anything with ``len`` and ``[i]`` returning ``{"time": seconds,
            "surf": {name: (h, w)}, "atmos": {name: (levels, h, w)}}``.
        lat (np.ndarray): Latitudes of shape `(h,)`, decreasing.
        lon (np.ndarray): Longitudes of shape `(w,)`, increasing in `[0, 360)`.
        levels (tuple[float, ...]): Pressure levels in hPa.
        times (np.ndarray, optional): int64 seconds since 1970 of shape `(len(records),)`, in
            record order; when None they are read from the records once (one pass; builders
            store them so that pass is not needed).
        static (Mapping[str, np.ndarray]): Static fields, each of shape `(h, w)`.
        stats (Mapping[str, tuple[float, float]]): The dataset's `(mean, std)` per table key
            (``"r_500"``), for variables outside Aurora's normalisation table.
        name (str): For error messages.
    """

    records: Any
    lat: np.ndarray
    lon: np.ndarray
    levels: tuple[float, ...] = ()
    times: np.ndarray | None = None
    static: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    stats: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
    name: str = "source"

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "lat", np.asarray(self.lat, np.float64))
        set_(self, "lon", np.asarray(self.lon, np.float64))
        set_(self, "levels", tuple(float(x) for x in self.levels))
        times = self.times
        if times is None:
            times = [int(self.records[i]["time"]) for i in range(len(self.records))]
        times = np.asarray(times, np.int64)
        if times.shape != (len(self.records),):
            raise DataError(f"{self.name}: {times.size} times for {len(self.records)} records")
        uniq, counts = np.unique(times, return_counts=True)
        if np.any(counts > 1):
            raise DataError(f"{self.name}: duplicate record times {uniq[counts > 1][:5].tolist()}")
        set_(self, "times", times)

    def close(self) -> None:
        """Release what the records hold open (threads, files, stores): ``records.close()``.

        Records that have a ``close`` must read again after it (reopening what they need), as
        `data_builders.builders.WeatherRecords` and the zarr source's records do.
        """
        close = getattr(self.records, "close", None)
        if callable(close):
            close()


def open_source(builder: Any, split: str) -> WeatherSource:
    """The `WeatherSource` of a built dataset's split.

    Args:
        builder (Any): A built `data_builders.builders.WeatherBuilder`, or a registered function
            builder whose ``as_data_source`` returns a `WeatherSource`.
        split (str): Split name, e.g. ``"train"``.

    Returns:
        WeatherSource: The split's records, times, grid, levels, static fields and statistics.
    """
    src = builder.as_data_source(split)
    if isinstance(src, WeatherSource):
        return src
    if not all(hasattr(builder, a) for a in ("grid", "times", "static", "stats")):
        raise TypeError(
            f"{type(builder).__name__}: cannot make a WeatherSource; subclass "
            "data_builders.builders.WeatherBuilder, or register a function returning a "
            "WeatherSource"
        )
    lat, lon, levels = builder.grid()
    name = f"{getattr(builder, 'name', 'dataset')}/{split}"
    return WeatherSource(
        records=src,
        lat=lat,
        lon=lon,
        levels=levels,
        times=builder.times(split),
        static=builder.static(),
        stats=builder.stats(),
        name=name,
    )


# --------------------------------------------------------------------------------------------
# Windows
# --------------------------------------------------------------------------------------------


def find_windows(
    times: np.ndarray, step_seconds: int, rollout_steps: int, last_leads: Sequence[int] = ()
) -> np.ndarray:
    """Sorted times ``now`` for which ``now + j * step`` exists for every j in -1..K.

    Args:
        times (np.ndarray): Available times (any integer unit, e.g. seconds), shape `(n,)`.
        step_seconds (int): The model step, in the unit of `times`.
        rollout_steps (int): K, the targets per window.
        last_leads (Sequence[int]): Leads of the last target after ``now + (K - 1) * step``, in
            the unit of `times`, that must all exist; empty: the step (the last target at
            ``now + K * step``).

    Returns:
        np.ndarray: int64 ``now`` times of the complete windows, shape `(n_windows,)`.
    """
    t = np.unique(np.asarray(times, np.int64))
    step = int(step_seconds)
    offsets = np.arange(-1, rollout_steps, dtype=np.int64) * step
    last = offsets[-1] + np.asarray(tuple(last_leads) or (step,), np.int64)
    offsets = np.concatenate([offsets, last])
    ok = np.isin(t[:, None] + offsets[None, :], t).all(axis=1)
    return t[ok]


def _shard(windows: np.ndarray, index: int, count: int, even: bool) -> np.ndarray:
    """This process's windows: strided (every season on every host), optionally equal-sized."""
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} not in [0, shard_count={count})")
    mine = windows[index::count]
    return mine[: len(windows) // count] if even else mine


class _BatchOrder(Sequence):
    """Batch j of the stream -> its windows' ``now`` times and last-target leads, `(b, 2)` int64
    seconds; pure arithmetic, no I/O.

    Epoch ``e = first_epoch + j // batches_per_epoch`` is a permutation of the windows by Grain's
    `index_shuffle` (what `MapDataset.shuffle` uses), seeded with a hash of ``(seed, e)``:
    `MapDataset.shuffle` seeds epoch e with ``seed + e``, so runs with seeds 1 and 2 would see
    the same orders one epoch apart. With several `leads` each window draws one per epoch,
    uniformly, from the same seed (`_lead_draws`), whatever the batch size or the shuffle.
    """

    def __init__(
        self,
        windows: np.ndarray,
        batch_size: int,
        drop_remainder: bool,
        shuffle: bool,
        seed: int,
        first_epoch: int,
        num_epochs: int | None,
        leads: np.ndarray,
    ) -> None:
        n = len(windows)
        self.windows, self.batch_size, self.first_epoch = windows, batch_size, first_epoch
        self.leads = leads
        self.num_epochs = num_epochs
        self.per_epoch = n // batch_size * batch_size if drop_remainder else n
        self.batches_per_epoch = -(-self.per_epoch // batch_size)
        self.shuffle, self.seed = shuffle, seed

    def __len__(self) -> int:
        if self.num_epochs is None:
            return sys.maxsize
        return self.batches_per_epoch * self.num_epochs

    def __getitem__(self, j: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= j < len(self):
            raise IndexError(j)
        epoch, b = divmod(int(j), self.batches_per_epoch)
        epoch += self.first_epoch
        lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, self.per_epoch)
        return np.array([self._window(epoch, k) for k in range(lo, hi)], np.int64).reshape(-1, 2)

    def _window(self, epoch: int, k: int) -> tuple[int, int]:
        if self.shuffle:
            k = grain.experimental.index_shuffle(
                k, max_index=len(self.windows) - 1, seed=_epoch_seed(self.seed, epoch), rounds=4
            )
        lead = 0
        if len(self.leads) > 1:
            lead = int(_lead_draws(self.seed, epoch, len(self.windows), len(self.leads))[k])
        return int(self.windows[k]), int(self.leads[lead])


@functools.lru_cache(maxsize=64)
def _epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed per (seed, epoch), decorrelated across both."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


@functools.lru_cache(maxsize=4)
def _lead_draws(seed: int, epoch: int, n_windows: int, n_leads: int) -> np.ndarray:
    """Which lead each window of `epoch` takes: uniform indices into the leads, `(n_windows,)`.

    A stream of its own (the trailing 1 tells it from `_epoch_seed`'s), so the leads do not
    depend on the shuffle.
    """
    return np.random.default_rng([seed, epoch, 1]).integers(n_leads, size=n_windows)


class _LoadBatch:
    """Windows ``(now, lead)`` -> ``(inputs, targets)``: each record needed is read once, checked,
    collated."""

    def __init__(self, source: WeatherSource, step_seconds: int, collate: _Collate) -> None:
        self._source = source
        # Up to the last target, which lies `lead` after the one before it.
        self._offsets = np.arange(-1, collate.rollout_steps, dtype=np.int64) * step_seconds
        self.index = {int(t): i for i, t in enumerate(source.times)}
        self.collate = collate

    def __call__(self, windows: np.ndarray) -> tuple[Batch, list[Batch]]:
        last = int(self._offsets[-1])
        times = [
            [int(now + o) for o in self._offsets] + [int(now + last + lead)]
            for now, lead in windows
        ]
        examples = self.read(sorted({t for w in times for t in w}))
        return self.collate([[examples[t] for t in w] for w in times])

    def read(self, times: list[int]) -> dict[int, Example]:
        """Records of `times` (overlapping windows share them), one after the other.

        Reads are sequential on purpose: parallelism comes from the prefetch threads (one batch
        per thread); array_record's parallel ``__getitems__`` on top of them only oversubscribes
        the cores (docs/design.md).
        """
        out = {}
        for t in times:
            i = self.index[t]
            example = self._source.records[i]
            if int(example["time"]) != t:
                raise DataError(
                    f"{self._source.name}: record {i} holds time {int(example['time'])}"
                    f", the index says {t}; the dataset's time index is stale"
                )
            out[t] = example
        return out


class _Collate:
    """A list of windows -> ``(inputs, targets)`` Batches, one copy per variable; target-only
    variables (a model's output-only ones) are left out of the inputs."""

    def __init__(
        self,
        source: WeatherSource,
        rollout_steps: int,
        target_only_surf_vars: Sequence[str] = (),
        target_only_atmos_vars: Sequence[str] = (),
    ) -> None:
        self._source, self.rollout_steps = source, rollout_steps
        self._target_only = {
            "surf": set(target_only_surf_vars),
            "atmos": set(target_only_atmos_vars),
        }
        self._lat, self._lon = tuple(source.lat.tolist()), tuple(source.lon.tolist())
        self._static = {k: np.array(v, np.float32) for k, v in source.static.items()}  # own copy
        for v in self._static.values():
            v.flags.writeable = False

    def __call__(self, windows: Sequence[Window]) -> tuple[Batch, list[Batch]]:
        for group, names in self._target_only.items():
            missing = sorted(names - set(windows[0][-1].get(group, {})))
            if missing:
                raise DataError(
                    f"{self._source.name}: the target-only variables {missing} are not in the data"
                )
        inputs = self.batch(windows, 0, 2, rollout_step=0, inputs=True)
        targets = [
            self.batch(windows, 1 + k, 2 + k, rollout_step=k)
            for k in range(1, self.rollout_steps + 1)
        ]
        return inputs, targets

    def batch(
        self,
        windows: Sequence[Window],
        lo: int,
        hi: int,
        rollout_step: int,
        inputs: bool = False,
    ) -> Batch:
        """Records ``lo:hi`` of each window as one Batch (history ``hi - lo``); `inputs` leaves
        out the target-only variables."""
        first = windows[0][0]
        names = {
            group: [
                v for v in first.get(group, {}) if not (inputs and v in self._target_only[group])
            ]
            for group in ("surf", "atmos")
        }
        surf = {v: self._stack(windows, lo, hi, "surf", v) for v in names["surf"]}
        atmos = {v: self._stack(windows, lo, hi, "atmos", v) for v in names["atmos"]}
        seconds = np.array([int(w[hi - 1]["time"]) for w in windows], np.int64)
        metadata = Metadata(
            lat=self._lat,
            lon=self._lon,
            time=(seconds // 60).astype(np.int32),
            atmos_levels=self._source.levels,
            rollout_step=rollout_step,
        )
        return Batch(
            surf_vars=surf, static_vars=dict(self._static), atmos_vars=atmos, metadata=metadata
        )

    def _stack(
        self, windows: Sequence[Window], lo: int, hi: int, group: str, var: str
    ) -> np.ndarray:
        """(b, hi - lo, ...) float32, filled in place (no intermediate stacks)."""
        h, w = len(self._lat), len(self._lon)
        shape = (h, w) if group == "surf" else (len(self._source.levels), h, w)
        out = np.empty((len(windows), hi - lo, *shape), np.float32)
        for i, window in enumerate(windows):
            for j in range(lo, hi):
                x = window[j][group][var]
                if x.shape != shape:
                    raise DataError(
                        f"{self._source.name}: {group} variable {var} at time "
                        f"{int(window[j]['time'])} has shape {x.shape}, expected {shape}"
                    )
                out[i, j - lo] = x
        return out


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------


def _lead_seconds(lead_times_hours: Sequence[float], step: int) -> np.ndarray:
    """The last target's leads in seconds, sorted, unique; `(step,)` when none are given."""
    seconds = {round(float(h) * 3600) for h in lead_times_hours} or {step}
    if min(seconds) <= 0 or any(s % 60 for s in seconds):
        raise ValueError(f"lead_times_hours must be positive whole minutes: {lead_times_hours}")
    return np.array(sorted(seconds), np.int64)


class Pipeline:
    """Windows of a `WeatherSource` -> shuffled, sharded, batched, prefetched `(inputs, targets)`.

    Iterating yields ``(inputs, targets)`` with numpy arrays on the host:

    * ``inputs``: `aurora.Batch` with history 2 -- ``surf_vars[v]`` ``(b, 2, h, w)``,
      ``atmos_vars[v]`` ``(b, 2, levels, h, w)``, ``static_vars[v]`` ``(h, w)`` (shared,
      read-only), all float32; ``metadata.time`` int32 ``(b,)`` minutes since 1970 of the
      **last** history step (index 1, "now"); history index 0 is ``now - step``;
      ``metadata.rollout_step == 0``.
    * ``targets``: a list of K `aurora.Batch`, one per lead: ``targets[k-1]`` holds the state at
      ``now + k * step`` with history dimension 1 (``(b, 1, h, w)``), its own valid time in
      ``metadata.time`` and ``metadata.rollout_step == k`` (the step of the rollout prediction it
      is compared with). Static variables as in ``inputs``.
    * Variable lead times (``lead_times_hours``, for models with ``variable_lead_time``): the
      last target lies ``lead`` after ``now + (K - 1) * step`` instead of one step, ``lead`` drawn
      per window and epoch, uniformly among ``lead_times_hours``, from ``seed`` (rows of a batch
      differ). The lead is in the targets' times; `trainers.lead_time` reads it from there. With
      an hourly source and ``(1, 2, 3, 6)``, one-step windows train Aurora 1.5's sub-6-hour leads.
    * Target-only variables (a model's ``output_only_*_vars``) are in the targets, not the inputs.

    A window (``now - step, now, now + step, ..., now + K * step``) is used only if **every** one
    of those times exists exactly in the source: gaps are skipped, never bridged. A source sampled
    more finely than ``step_hours`` just has more windows. With ``lead_times_hours`` the last
    target must exist at every one of the leads.

    Order, epochs, sharding, resume (all deterministic given ``seed``):

    * Process ``shard_index`` of ``shard_count`` owns the windows
      ``all_windows[shard_index::shard_count]`` (time-sorted) and reads only the records those
      need. With ``drop_remainder=True`` every shard is cut to ``len(all_windows) //
      shard_count`` windows so all processes run the same number of steps.
    * Each epoch is a fresh permutation of the shard's windows (Grain's ``index_shuffle``, seeded
      from ``(seed, epoch)``). With ``drop_remainder=True`` (training) an epoch is
      ``len(windows) // batch_size`` full batches and the few windows left over differ from epoch
      to epoch; with ``drop_remainder=False`` (evaluation) an epoch's last batch may be short.
      Batches never span two epochs.
    * Batching happens on window indices (`_BatchOrder`), then one Grain ``map`` reads each record
      a batch needs once (overlapping windows share records) and collates straight into the
      output arrays; Grain's element-wise ``.batch`` would stack twice and could not keep epochs
      apart.
    * ``iter(pipeline)`` runs all ``num_epochs``; ``pipeline.iterator(epoch)`` runs one epoch (the
      Trainer's ``DataSource.iterator(epoch)`` protocol, `trainers.data`). Both are
      `BatchIterator`s: ``it.get_state()`` is ``{"position": batches yielded}``, to store in the
      checkpoint; a fresh iterator given ``it.set_state(state)`` yields exactly the batches the
      first one would have yielded next, whatever the threads or worker processes of either.
      `dataset` is the Grain `MapDataset` of batches: ``pipeline.dataset[i]`` is batch i of this
      process's stream.
    * Host prefetch: ``num_threads`` threads build up to ``prefetch_buffer_size`` batches ahead
      of the consumer, so the accelerator does not wait on reading and decoding as long as a step
      takes longer than loading a batch (``benchmarks/input_pipeline.py`` measures both).
    * Worker processes: with ``num_workers > 0`` Grain's ``mp_prefetch`` builds batches in that
      many processes instead (batch i in worker ``i % num_workers``, each up to
      ``prefetch_buffer_size`` ahead, handed over in shared memory; the threads are not used).
      Copying and collating hold the GIL, so threads alone cannot use more than one core. The
      batches and their order do not depend on ``num_workers``, and ``get_state`` / ``set_state``
      stay exact. The source must be picklable (`data_builders.builders.WeatherRecords` and
      the zarr source's records are).
    * ``it.close()`` stops an iterator's threads or workers; closing the last open iterator of
      the pipeline also calls `WeatherSource.close` (the records' threads, files, stores).

    Args:
        source (WeatherSource): The dataset split.
        step_hours (float): The model step (6 h, or 12 h for 12-hourly data).
        rollout_steps (int): K, the targets per window.
        batch_size (int): Windows per batch, per process.
        shuffle (bool): Permute the windows every epoch.
        seed (int): Seed of the permutations.
        num_epochs (int, optional): Epochs to run; None repeats forever.
        shard_index (int): This process's index.
        shard_count (int): The number of processes.
        drop_remainder (bool): Full batches only, and equal-sized shards.
        num_threads (int): Prefetch threads; 0 reads synchronously, in ``next()``.
        prefetch_buffer_size (int): Batches prefetched ahead (per worker with workers).
        num_workers (int): Worker processes; 0 builds batches in this process.
        lead_times_hours (Sequence[float]): Leads of the last target, whole minutes; empty: the
            step.
        target_only_surf_vars (Sequence[str]): Surface variables left out of the inputs.
        target_only_atmos_vars (Sequence[str]): Atmospheric variables left out of the inputs.
    """

    def __init__(
        self,
        source: WeatherSource,
        *,
        step_hours: float = 6,
        rollout_steps: int = 1,
        batch_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        num_epochs: int | None = 1,
        shard_index: int = 0,
        shard_count: int = 1,
        drop_remainder: bool = True,
        num_threads: int = 2,
        prefetch_buffer_size: int = 2,
        num_workers: int = 0,
        lead_times_hours: Sequence[float] = (),
        target_only_surf_vars: Sequence[str] = (),
        target_only_atmos_vars: Sequence[str] = (),
    ) -> None:
        step = round(float(step_hours) * 3600)
        if step <= 0 or rollout_steps < 1 or batch_size < 1:
            raise ValueError("step_hours, rollout_steps and batch_size must be positive")
        self.leads = _lead_seconds(lead_times_hours, step)
        if num_epochs is not None and num_epochs < 1:
            raise ValueError("num_epochs must be positive or None (forever)")
        self.source, self.step_seconds, self.rollout_steps = source, step, rollout_steps
        self.batch_size, self.num_epochs, self.drop_remainder = (
            batch_size,
            num_epochs,
            drop_remainder,
        )
        if num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        self.num_workers = num_workers
        self.read_options = grain.ReadOptions(
            num_threads=0 if num_workers else num_threads,
            prefetch_buffer_size=0 if num_workers else prefetch_buffer_size,
        )
        self.mp_options = grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=max(1, prefetch_buffer_size)
        )
        self.all_windows = find_windows(source.times, step, rollout_steps, self.leads)
        if not len(self.all_windows):
            leads = f" (the last at leads {tuple(lead_times_hours)} h)" if lead_times_hours else ""
            raise DataError(
                f"{source.name}: no window of 2 history steps + {rollout_steps} "
                f"target(s){leads} at {step_hours} h steps among {len(source.times)} times"
            )
        self.windows = _shard(self.all_windows, shard_index, shard_count, drop_remainder)
        if (drop_remainder and len(self.windows) < batch_size) or not len(self.windows):
            raise DataError(
                f"{source.name}: {len(self.windows)} window(s) in shard {shard_index} "
                f"of {shard_count}, fewer than batch_size {batch_size}"
            )
        self._shuffle, self._seed = shuffle, seed
        self._streams, self._streams_lock = 0, threading.Lock()  # open iterator streams
        collate = _Collate(source, rollout_steps, target_only_surf_vars, target_only_atmos_vars)
        self._load = _LoadBatch(source, step, collate)
        self.dataset = self.epochs_dataset(0, num_epochs)
        self.windows_per_epoch = self._order(0, 1).per_epoch
        self.batches_per_epoch = self._order(0, 1).batches_per_epoch

    def _order(self, first_epoch: int, num_epochs: int | None) -> _BatchOrder:
        return _BatchOrder(
            self.windows,
            self.batch_size,
            self.drop_remainder,
            self._shuffle,
            self._seed,
            first_epoch,
            num_epochs,
            self.leads,
        )

    def epochs_dataset(self, first_epoch: int, num_epochs: int | None) -> grain.MapDataset:
        """Grain `MapDataset` of the batches of epochs ``first_epoch ...`` (random access)."""
        return grain.MapDataset.source(self._order(first_epoch, num_epochs)).map(self._load)

    def __len__(self) -> int:
        """Batches in the whole stream (all epochs); `sys.maxsize` when `num_epochs` is None."""
        return len(self.dataset)

    def has_times(self, seconds: Sequence[int]) -> np.ndarray:
        """Whether the source holds a state at each of `seconds`.

        Args:
            seconds (Sequence[int]): Valid times, int64 seconds since 1970.

        Returns:
            np.ndarray: bool of shape `(len(seconds),)`.
        """
        return np.isin(np.asarray(seconds, np.int64), self.source.times)

    def states_at(self, seconds: Sequence[int]) -> Batch:
        """The ground truth at `seconds`, one batch row each.

        Random access by valid time, e.g. for replay-buffer targets.

        Args:
            seconds (Sequence[int]): `b` valid times, int64 seconds since 1970.

        Returns:
            Batch: History 1 (``surf_vars[v]`` ``(b, 1, h, w)``), ``rollout_step`` 0.

        Raises:
            DataError: For a time the source does not hold (check with `has_times`).
        """
        seconds = [int(t) for t in seconds]
        missing = [t for t in seconds if t not in self._load.index]
        if missing:
            when = np.array(missing[:5], "datetime64[s]").tolist()
            raise DataError(f"{self.source.name}: no state at {when}")
        examples = self._load.read(sorted(set(seconds)))
        return self._load.collate.batch([[examples[t]] for t in seconds], 0, 1, rollout_step=0)

    def batch_windows(self, i: int, epoch: int = 0) -> np.ndarray:
        """The ``now`` times of batch i of `epoch`, without reading any data.

        Args:
            i (int): Batch index within the epoch.
            epoch (int): Epoch.

        Returns:
            np.ndarray: int64 seconds since 1970 of shape `(b,)`.
        """
        return self._order(epoch, 1)[i][:, 0]

    def batch_leads(self, i: int, epoch: int = 0) -> np.ndarray:
        """The leads of the last targets of batch i of `epoch`, int64 seconds `(b,)`, without
        reading any data (the step unless ``lead_times_hours`` is set)."""
        return self._order(epoch, 1)[i][:, 1]

    def iterator(self, epoch: int) -> BatchIterator:
        """Iterator over one epoch (the Trainer's `DataSource.iterator(epoch)` protocol)."""
        return BatchIterator(self.epochs_dataset(epoch, 1), self._iter, self._stream_closed)

    def __iter__(self) -> BatchIterator:
        """Iterator over all `num_epochs` epochs; `set_state` moves it to a saved position."""
        return BatchIterator(self.dataset, self._iter, self._stream_closed)

    def _iter(self, dataset: grain.MapDataset) -> Iterator[Any]:
        stream = dataset.to_iter_dataset(self.read_options)
        if self.num_workers:
            if not flags.FLAGS.is_parsed():  # Grain reads its absl flags when workers start
                flags.FLAGS.mark_as_parsed()
            stream = stream.mp_prefetch(self.mp_options)
        with self._streams_lock:
            self._streams += 1
        return iter(stream)

    def _stream_closed(self) -> None:
        """An iterator closed its stream: the last one closes the source (`WeatherSource.close`).

        Only then: iterators of one pipeline share the source's records. A stream dropped
        without `close` keeps the source open.
        """
        with self._streams_lock:
            self._streams -= 1
            last = self._streams == 0
        if last:
            self.source.close()


class BatchIterator:
    """The batches of a Grain `MapDataset` from a position on, with the position as its state.

    Grain's own iterator states differ between prefetch threads and worker processes (and between
    worker counts). Batches are a deterministic function of their index, so the number yielded is
    all a checkpoint needs: a run may resume with other `num_threads` or `num_workers`.

    Args:
        dataset: The batches, e.g. `Pipeline.dataset`.
        stream: Makes the iterator over a dataset (threads or worker processes).
        on_close: Called after `close` stopped a stream that `stream` made.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        stream: Callable[[grain.MapDataset], Iterator[Any]],
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self._dataset = dataset
        self._stream = stream
        self._on_close = on_close
        self._position = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            rest = self._dataset[self._position :] if self._position else self._dataset
            self._it = self._stream(rest)
        batch = next(self._it)
        self._position += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes or prefetch threads, if any; `next` starts them again.

        A `Pipeline`'s last open iterator also closes the source (`WeatherSource.close`).
        """
        if self._it is None:
            return
        close = getattr(self._it, "close", None)
        if close is not None:
            close()
        self._it = None
        if self._on_close is not None:
            self._on_close()

    def get_state(self) -> dict[str, Any]:
        """``{"position": n}``: the next batch is batch n of the dataset."""
        return {"position": self._position}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state["position"]`` (or Grain's ``next_index``, from older checkpoints).

        Raises:
            DataError: The state holds neither, e.g. one from worker processes of an older version.
        """
        if "position" in state:
            position = state["position"]
        elif "next_index" in state:
            position = state["next_index"]
        else:
            raise DataError(f"cannot resume the data iterator from state {sorted(state)}")
        self._position = int(position)
        self._it = None
