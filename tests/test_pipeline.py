"""Input pipeline and builder registry: windows, gaps, batch contract, resume, sharding.

Datasets are built once per module with the real HRES sample (8 six-hourly times) and read
through ``as_data_source()``; one build leaves out 2024-06-03T18 to make a gap.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorflow_datasets as tfds

from aurora.batch import Batch
from data_builders.builders import WeatherBuilder
from data_builders.pipeline import Pipeline, WeatherSource, find_windows, open_source
from data_builders.readers import DataError, open_dataset
from data_builders.registry import (
    UnknownBuilderError,
    get_builder,
    load_source,
    register_builder,
    registered_builders,
    unregister_builder,
)

tfds.disable_progress_bar()

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
NATL = DATA / "hres_an_sfc_pl_20160925-20161001_12h_10deg_natlantic.nc"
STATIC = DATA / "era5_static_z_lsm_0.25deg.nc"
HOUR = 3600
T0 = int(np.datetime64("2024-06-03T00", "s").astype(np.int64))  # first sample time
CONFIG = dict(
    paths=[HRES_PL],
    static_paths=[STATIC],
    surf_vars=(),
    atmos_vars=("z", "t", "r"),
    static_vars=("lsm", "z"),
    levels=(500, 850),
)
HOLE = {"train": [("2024-06-03T00", "2024-06-03T12"), ("2024-06-04T00", "2024-06-04T18")]}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("datasets")


@pytest.fixture(scope="module")
def source(data_dir: Path) -> WeatherSource:
    return load_source("hres", "train", data_dir=data_dir, **CONFIG)


@pytest.fixture(scope="module")
def holed(data_dir: Path) -> WeatherSource:
    return load_source("hres", "train", data_dir=data_dir, splits=HOLE, **CONFIG)


def leaves(batch: tuple[Batch, list[Batch]]) -> list[np.ndarray]:
    inputs, targets = batch
    out = []
    for b in (inputs, *targets):
        out += [b.atmos_vars[k] for k in sorted(b.atmos_vars)] + [
            b.surf_vars[k] for k in sorted(b.surf_vars)
        ]
        out += [np.asarray(b.metadata.time), np.asarray(b.metadata.rollout_step)]
    return out


def assert_same(xs: list, ys: list) -> None:
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        for a, b in zip(leaves(x), leaves(y)):
            np.testing.assert_array_equal(a, b)


# ---- windows ---------------------------------------------------------------------------------


def test_find_windows_needs_every_time() -> None:
    t = np.array([0, 6, 12, 24, 30, 36, 42]) * HOUR  # 18 h missing
    assert (find_windows(t, 6 * HOUR, 1) // HOUR).tolist() == [6, 30, 36]
    assert (find_windows(t, 6 * HOUR, 2) // HOUR).tolist() == [30]
    assert (find_windows(t, 12 * HOUR, 1) // HOUR).tolist() == [12, 24]  # 30 would need 18 h
    assert find_windows(t, 6 * HOUR, 4).size == 0


def test_gap_is_skipped_not_bridged(holed: WeatherSource) -> None:
    assert 18 * HOUR + T0 not in holed.times
    p = Pipeline(holed, rollout_steps=1, shuffle=False, num_threads=0)
    assert ((p.all_windows - T0) // HOUR).tolist() == [6, 30, 36]
    nows = sorted(int(x.metadata.time[0]) * 60 for x, _ in p)
    assert nows == p.all_windows.tolist()
    with pytest.raises(DataError, match="no window of 2 history steps"):
        Pipeline(holed, rollout_steps=4)


def test_batch_contract_and_values(source: WeatherSource) -> None:
    K, step = 2, 6 * HOUR
    p = Pipeline(source, rollout_steps=K, batch_size=2, seed=3, num_threads=0)
    ref = open_dataset(HRES_PL, variables=["z", "t", "r"], levels=[500, 850])
    ref_s = ref["time"].values.astype("datetime64[s]").astype(np.int64).tolist()
    inputs, targets = p.dataset[0]
    nows = p.batch_windows(0)
    assert inputs.atmos_vars["z"].shape == (2, 2, 2, 19, 36) and inputs.surf_vars == {}
    assert inputs.atmos_vars["z"].dtype == np.float32
    assert inputs.static_vars["lsm"].shape == (19, 36) and set(inputs.static_vars) == {"lsm", "z"}
    assert inputs.metadata.time.dtype == np.int32 and inputs.metadata.rollout_step == 0
    assert inputs.metadata.atmos_levels == (500.0, 850.0) and len(inputs.metadata.lat) == 19
    np.testing.assert_array_equal(inputs.metadata.time.astype(np.int64) * 60, nows)
    assert len(targets) == K
    for k, target in enumerate(targets, start=1):
        assert (
            target.atmos_vars["t"].shape == (2, 1, 2, 19, 36) and target.metadata.rollout_step == k
        )
        np.testing.assert_array_equal(target.metadata.time.astype(np.int64) * 60, nows + k * step)
        for b, now in enumerate(nows):
            i = ref_s.index(int(now + k * step))
            np.testing.assert_array_equal(target.atmos_vars["t"][b, 0], ref["t"].values[i])
    for b, now in enumerate(nows):
        for h, offset in enumerate((-step, 0)):
            i = ref_s.index(int(now + offset))
            np.testing.assert_array_equal(inputs.atmos_vars["r"][b, h], ref["r"].values[i])


def test_twelve_hour_step_on_twelve_hourly_data(data_dir: Path) -> None:
    src = load_source(
        "era5",
        "train",
        data_dir=data_dir,
        paths=[NATL],
        surf_vars=("msl",),
        atmos_vars=("t",),
        static_vars=(),
        levels=None,
    )
    p = Pipeline(src, step_hours=12, rollout_steps=3, shuffle=False, num_threads=0)
    assert len(p.all_windows) == 13 - (2 + 3) + 1  # 13 consecutive times, windows of 5
    inputs, targets = p.dataset[0]
    assert inputs.surf_vars["msl"].shape == (1, 2, 7, 12) and inputs.static_vars == {}
    assert int(targets[2].metadata.time[0]) - int(inputs.metadata.time[0]) == 36 * 60
    with pytest.raises(DataError, match="no window"):
        Pipeline(src, step_hours=6)


# ---- order, resume, sharding ---------------------------------------------------------------


def test_resume_gives_identical_batches(source: WeatherSource) -> None:
    p = Pipeline(source, rollout_steps=1, batch_size=2, seed=7, num_epochs=3, num_threads=2)
    assert p.batches_per_epoch == 3 and len(p) == 9  # 6 windows, batches of 2, 3 epochs
    uninterrupted = list(iter(p))
    it = iter(p)
    first = [next(it) for _ in range(4)]
    state = it.get_state()
    resumed = iter(Pipeline(source, rollout_steps=1, batch_size=2, seed=7, num_epochs=3))
    resumed.set_state(state)
    assert_same(first + list(resumed), uninterrupted)
    # per-epoch iterators (the Trainer's protocol) resume the same way
    ep = p.iterator(1)
    next(ep)
    state = ep.get_state()
    again = p.iterator(1)
    again.set_state(state)
    assert_same(list(again), uninterrupted[4:6])


def test_workers_give_the_same_batches_and_resume_exactly(source: WeatherSource) -> None:
    kw = dict(rollout_steps=1, batch_size=2, seed=7, num_epochs=2)
    in_process = list(iter(Pipeline(source, num_threads=0, **kw)))
    p = Pipeline(source, num_workers=2, **kw)
    it = iter(p)
    uninterrupted = list(it)
    it.close()
    assert_same(uninterrupted, in_process)
    it = iter(p)
    first = [next(it) for _ in range(3)]  # mid-epoch, workers one batch apart
    state = it.get_state()
    it.close()
    resumed = iter(Pipeline(source, num_workers=2, **kw))
    resumed.set_state(state)
    assert_same(first + list(resumed), uninterrupted)
    resumed.close()
    # The state is a position: a run may resume with other worker or thread counts.
    assert state == {"position": 3}
    for other in (dict(num_workers=0, num_threads=2), dict(num_workers=1)):
        resumed = iter(Pipeline(source, **other, **kw))
        resumed.set_state(state)
        assert_same(first + list(resumed), uninterrupted)
        resumed.close()


class ClosingRecords(list):
    """Records that count their `close` calls."""

    closed = 0

    def close(self) -> None:
        self.closed += 1


def test_closing_the_last_iterator_closes_the_source() -> None:
    src = synthetic_source("train")
    records = ClosingRecords(src.records)
    p = Pipeline(dataclasses.replace(src, records=records), shuffle=False, num_threads=1)
    a, b, idle = iter(p), p.iterator(0), iter(p)
    next(a), next(b)
    idle.close()  # never started: nothing to close
    a.close()
    assert records.closed == 0  # b still reads the records
    b.close()
    b.close()
    assert records.closed == 1
    assert len(list(a)) == len(p) - 1  # the records read again, and close again
    a.close()
    assert records.closed == 2


def test_resume_from_an_older_grain_iterator_state(source: WeatherSource) -> None:
    kw = dict(rollout_steps=1, batch_size=2, seed=7, num_epochs=2)
    uninterrupted = list(iter(Pipeline(source, **kw)))
    resumed = iter(Pipeline(source, **kw))
    resumed.set_state({"next_index": 2})  # what checkpoints held before BatchIterator
    assert_same(list(resumed), uninterrupted[2:])
    with pytest.raises(DataError, match="cannot resume the data iterator"):
        resumed.set_state({"workers_state": {}})


def test_shuffle_is_seeded_and_reshuffled_each_epoch(source: WeatherSource) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        p = Pipeline(source, batch_size=1, seed=seed, num_epochs=2)
        return [int(p.batch_windows(i, epoch)[0]) for i in range(p.batches_per_epoch)]

    assert order(1, 0) == order(1, 0)
    assert (
        sorted(order(1, 0)) == sorted(order(1, 1)) == sorted(Pipeline(source).all_windows.tolist())
    )
    assert order(1, 0) != order(1, 1)  # a new permutation every epoch
    assert order(1, 1) != order(2, 0)  # seeds are not epochs shifted (grain's seed + epoch)
    sync = [int(x.metadata.time[0]) * 60 for x, _ in Pipeline(source, seed=1, num_threads=0)]
    threaded = [int(x.metadata.time[0]) * 60 for x, _ in Pipeline(source, seed=1, num_threads=3)]
    assert sync == threaded == order(1, 0)  # prefetch threads never change the order


class CountingRecords:
    """Records proxy that remembers which record indices were read."""

    def __init__(self, records: Any) -> None:
        self.records, self.read = records, set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        self.read.add(int(i))
        return self.records[i]


def test_shards_are_disjoint_cover_all_and_read_only_their_records(source: WeatherSource) -> None:
    all_windows = Pipeline(source).all_windows.tolist()
    for even in (False, True):
        seen: list[int] = []
        for i in range(4):
            counting = CountingRecords(source.records)
            shard_src = dataclasses.replace(source, records=counting)
            p = Pipeline(
                shard_src, shard_index=i, shard_count=4, drop_remainder=even, num_threads=0
            )
            mine = [int(x.metadata.time[0]) * 60 for x, _ in p]
            assert sorted(mine) == sorted(p.windows.tolist())
            needed = {
                int(np.flatnonzero(source.times == w + o)[0])
                for w in mine
                for o in (-6 * HOUR, 0, 6 * HOUR)
            }
            assert counting.read == needed
            seen += mine
        assert len(seen) == len(set(seen))  # disjoint
        if even:  # equal shares: 6 windows over 4 shards -> 1 each, 2 left out
            assert len(seen) == 4 * (len(all_windows) // 4)
        else:
            assert sorted(seen) == all_windows  # cover everything


# ---- registry ----------------------------------------------------------------------------------


def synthetic_source(split: str, n_times: int = 6, step_hours: int = 6) -> WeatherSource:
    """A registered function builder: smooth fields whose values encode their time."""
    lat, lon = np.linspace(90, -90, 5), np.arange(8) * 45.0
    base = 1_600_000_000 if split == "train" else 1_700_000_000
    times = base + np.arange(n_times) * step_hours * HOUR
    records = [
        {
            "time": int(t),
            "surf": {"2t": np.full((5, 8), 250 + i, np.float32)},
            "atmos": {"q": np.full((2, 5, 8), i * 1e-4, np.float32)},
        }
        for i, t in enumerate(times)
    ][::-1]  # record order need not be time order
    return WeatherSource(
        records=records,
        lat=lat,
        lon=lon,
        levels=(500, 850),
        times=times[::-1],
        stats={"q_500": (1e-3, 1e-3)},
        name=f"synthetic/{split}",
    )


def test_register_function_builder_and_read_through_pipeline() -> None:
    register_builder("test_synthetic", synthetic_source)
    try:
        assert "test_synthetic" in registered_builders() and "era5" in registered_builders()
        builder = get_builder("test_synthetic", n_times=5)
        builder.download_and_prepare()
        src = open_source(builder, "train")
        assert src.stats["q_500"] == (1e-3, 1e-3)
        p = Pipeline(src, rollout_steps=1, shuffle=False, num_threads=0)
        (inputs, targets), *_ = list(p)
        np.testing.assert_array_equal(inputs.surf_vars["2t"][0, :, 0, 0], [250, 251])
        np.testing.assert_array_equal(targets[0].surf_vars["2t"][0, 0, 0, 0], 252)
    finally:
        unregister_builder("test_synthetic")


@register_builder("test_tiny_hres")
class TinyHres(WeatherBuilder, skip_registration=True):
    """A user's builder: HRES sample, one variable, its own defaults; registered by decorator."""

    name = "tiny_hres"
    DEFAULTS = dict(
        paths=[HRES_PL],
        surf_vars=(),
        atmos_vars=("t",),
        static_vars=(),
        levels=(850,),
        splits={"train": ("2024-06-03", "2024-06-04T06"), "test": ("2024-06-04T12", None)},
    )


def test_register_tfds_builder_subclass(data_dir: Path) -> None:
    src = load_source("test_tiny_hres", "train", data_dir=data_dir)
    assert len(src.times) == 6 and src.levels == (850.0,)
    assert set(src.stats) == {"t_850"}
    inputs, _targets = Pipeline(src, shuffle=False, num_threads=0).dataset[0]
    ref = open_dataset(HRES_PL, variables=["t"], levels=[850])
    np.testing.assert_array_equal(inputs.atmos_vars["t"][0, :, 0], ref["t"].values[:2, 0])
    assert len(load_source("test_tiny_hres", "test", data_dir=data_dir).times) == 2


def test_registry_errors() -> None:
    with pytest.raises(
        UnknownBuilderError, match="unknown dataset builder 'nope'; registered: .*era5.*hres"
    ):
        get_builder("nope")
    with pytest.raises(ValueError, match="taken"):
        register_builder("era5", synthetic_source)
    with pytest.raises(TypeError, match="DatasetBuilder"):
        register_builder("bad", int)
