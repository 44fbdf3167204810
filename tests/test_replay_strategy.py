"""ReplayStrategy: targets at each entry's valid time, the lead-time cap, FIFO, exact resume; its
buffer's compact states, spill to disk and incremental checkpoints.

Trained through the real Trainer on a TFDS dataset built from the bundled IFS HRES sample (eight
six-hourly 10° analyses), with a tiny Aurora.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from aurora.batch import Batch
from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint
from data_builders.pipeline import Pipeline, WeatherSource
from data_builders.registry import load_source
from tests.helpers import tiny_model
from trainers.data import InMemoryData
from trainers.strategies.lora import LoRAStrategy
from trainers.strategies.replay import Entry, ReplayBuffer, ReplayStrategy
from trainers.strategies.replay_buffer import Layout, decode, encode
from trainers.strategies.trainable import Trainable, is_lora_path
from trainers.trainer import Trainer

DATA = Path(__file__).parent / "data"
OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
)
VARS = dict(surf_vars=(), atmos_vars=("z", "t"), static_vars=("lsm", "z"))
STEP_MINUTES = 360


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> WeatherSource:
    return load_source(
        "hres",
        "train",
        data_dir=tmp_path_factory.mktemp("datasets"),
        paths=[DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"],
        static_paths=[DATA / "era5_static_z_lsm_0.25deg.nc"],
        levels=(500, 850),
        **VARS,
    )


def _pipeline(source: WeatherSource) -> Pipeline:
    return Pipeline(source, rollout_steps=1, batch_size=2, num_threads=0, seed=1)


def _model(**kwargs):
    return tiny_model(patch_size=2, **VARS, **kwargs)


class Record(Callback):
    """Keeps each training example, the buffer after each step and its first step's histories."""

    def __init__(self) -> None:
        self.examples: list[tuple[int, Batch, Batch]] = []
        self.buffers: list[list[Entry]] = []
        self.first: dict[Entry, tuple[dict, dict]] = {}

    def on_train_batch_start(self, trainer, batch, batch_idx):
        inputs, targets = batch
        self.examples.append((trainer.global_step, inputs, targets[0]))

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        buffer = trainer.strategy.buffer
        self.buffers.append(list(buffer.entries))
        if not self.first:
            self.first = {e: buffer.history(e) for e in buffer.entries}


def _fit(strategy, source, workdir=None, max_steps=10, callbacks=()):
    trainer = Trainer(
        strategy,
        optimizer=OPTIM,
        callbacks=list(callbacks),
        workdir=workdir,
        max_steps=max_steps,
        log_every_n_steps=1,
    )
    trainer.fit(_pipeline(source))
    return trainer


def _record_index(source: WeatherSource) -> dict[int, int]:
    return {int(t) // 60: i for i, t in enumerate(source.times)}


def test_targets_lead_time_cap_and_pushed_back_predictions(source) -> None:
    """One run checks the paper's semantics: every target is the truth at its entry's valid time,
    leads stay within a cap that grows on schedule, predictions come back one step further."""
    record = Record()
    schedule = ((0, 12), (8, 30))
    strategy = ReplayStrategy(_model(), capacity=40, refresh_every=4, max_lead_hours=schedule)
    trainer = _fit(strategy, source, max_steps=16, callbacks=[record])
    assert trainer.global_step == 16 and trainer.strategy.updates == 16
    assert strategy.updates == 0 and not len(strategy.buffer), "the given strategy is unchanged"
    cap = lambda step: [h for s, h in schedule if s <= step][-1]

    index = _record_index(source)
    early, late = set(), set()
    for step, inputs, target in record.examples:
        np.testing.assert_array_equal(target.metadata.time, inputs.metadata.time + STEP_MINUTES)
        np.testing.assert_array_equal(
            target.metadata.rollout_step, inputs.metadata.rollout_step + 1
        )
        for row, minutes in enumerate(np.asarray(target.metadata.time)):
            truth = source.records[index[int(minutes)]]
            for v in ("z", "t"):
                np.testing.assert_array_equal(
                    target.atmos_vars[v][row, 0], truth["atmos"][v][:, :-1]
                )  # cropped row
        lead_hours = (np.asarray(inputs.metadata.rollout_step) + 1) * 6
        assert np.all(lead_hours <= cap(step)), (step, lead_hours)
        (early if step < 8 else late).update(lead_hours.tolist())
    assert max(early) == 12 and max(late) > 12, (
        "the cap bounds leads, and raising it lets them grow"
    )

    for step, buffer in enumerate(record.buffers, start=1):
        for entry in buffer:
            assert entry.target_time == entry.time + STEP_MINUTES
            assert entry.target_time in index, "only entries whose target exists in the data enter"
            assert entry.lead_steps * 6 <= cap(step - 1)

    # After the first update, each sampled entry has a child one step further whose history is
    # (the entry's newest state, the prediction).
    # (the entry's newest state, the prediction), sharing the entry's newest state.
    (_, inputs, _) = record.examples[0]
    children = [
        e for e in record.buffers[0] if e.rollout_step == int(inputs.metadata.rollout_step[0]) + 1
    ]
    assert len(children) == 2
    parents = {e.states[1]: e for e in record.buffers[0] if e not in children}
    for row, child in enumerate(children):
        assert child.time == int(inputs.metadata.time[row]) + STEP_MINUTES
        assert child.states[0] in parents, "the child shares its parent's newest state"
        _, atmos = record.first[child]
        np.testing.assert_array_equal(atmos["z"][0], np.asarray(inputs.atmos_vars["z"][row, 1]))
        assert not np.array_equal(atmos["z"][1], atmos["z"][0])


def test_buffer_is_fifo_and_samples_within_the_cap() -> None:
    buffer = ReplayBuffer(capacity=3)
    for i in range(5):
        z = np.full((2, 1, 2, 2), i, np.float32)
        buffer.push_history({}, {"z": z}, time=i, rollout_step=i % 2, target_time=i + 360)
    assert [e.time for e in buffer.entries] == [2, 3, 4]
    assert len(buffer._states) == 6, "the evicted entries' states are dropped"
    drawn = buffer.sample(np.random.default_rng(0), 50, max_lead_steps=1)
    assert {e.time for e in drawn} == {2, 4}  # rollout_step 1 (lead 2 steps) is excluded
    with pytest.raises(RuntimeError, match="lead-time cap"):
        ReplayBuffer(1).sample(np.random.default_rng(0), 1, 1)


def _state(seed: int, h: int = 6, w: int = 8) -> tuple[dict, dict]:
    """One state of weather-like magnitudes: `surf["2t"]` (h, w), `atmos` `z` / `t` (2, h, w)."""
    rng = np.random.default_rng(seed)
    field = lambda mean, spread, *shape: (mean + spread * rng.standard_normal(shape)).astype(
        np.float32
    )
    surf = {"2t": field(288, 15, h, w)}
    atmos = {"z": field(55_000, 3_000, 2, h, w), "t": field(250, 10, 2, h, w)}
    return surf, atmos


def test_stored_states_round_trip_within_the_stated_bounds() -> None:
    """What `buffer_dtype` changes: uint16 (the default) errs by at most half a step of each
    field's range, bfloat16 by up to 2^-8 of each value (tens of times more on a geopotential),
    float32 not at all; NaN survives uint16."""
    assert ReplayStrategy(_model()).buffer.dtype == "uint16"
    surf, atmos = _state(0)
    layout = Layout.of(surf, atmos)
    x = layout.pack(surf, atmos)
    assert x.shape == (5, 6, 8) and layout.channels == 5
    np.testing.assert_array_equal(layout.unpack(x)[1]["t"], atmos["t"])

    stored = encode(x, "uint16")
    assert stored["data"].dtype == np.uint16 and stored["data"].nbytes == x.nbytes // 2
    step = (x.max(axis=(1, 2)) - x.min(axis=(1, 2))).astype(np.float64) / 65534
    error = np.abs(decode(stored, "uint16") - x).max(axis=(1, 2))
    bound = step / 2 + np.spacing(np.abs(x).max(axis=(1, 2)))
    assert np.all(error <= bound), (error, bound)
    assert np.all(error > step / 100), "the bound is tight, not vacuous"

    half = np.abs(decode(encode(x, "bfloat16"), "bfloat16") - x)
    assert np.all(half <= np.abs(x) * 2.0**-8)
    z = slice(1, 3)  # the geopotential's channels
    assert half[z].max() > 20 * error[z].max(), "bfloat16 errs far more on geopotential"

    np.testing.assert_array_equal(decode(encode(x, "float32"), "float32"), x)
    x[0, 0, 0] = np.nan
    back = decode(encode(x, "uint16"), "uint16")
    assert np.isnan(back[0, 0, 0]) and np.isfinite(back).sum() == x.size - 1
    with pytest.raises(ValueError, match="buffer_dtype"):
        ReplayStrategy(_model(), buffer_dtype="float16")


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_spilled_states_read_back_exactly_and_are_deleted_with_their_entries(
    tmp_path, dtype
) -> None:
    """A buffer over a RAM budget reads its spilled states back exactly as one that keeps them in
    memory; states shared by a chain of entries are stored once and deleted with the last."""
    x = Layout.of(*_state(0)).pack(*_state(0))
    state_bytes = sum(a.nbytes for a in encode(x, dtype).values())  # with uint16's offset, scale
    memory = ReplayBuffer(4, dtype)
    disk = ReplayBuffer(4, dtype, spill_dir=tmp_path, ram_bytes=3 * state_bytes)
    for buffer in (memory, disk):
        surf, atmos = _state(0)
        stack = lambda a, b: {v: np.stack([a[v], b[v]]) for v in a}
        later = _state(1)
        parent = buffer.push_history(
            stack(surf, later[0]), stack(atmos, later[1]), time=0, rollout_step=0, target_time=6
        )
        for i in range(2, 7):  # a chain: each child's older state is its parent's newer one
            s, a = _state(i)
            child = buffer.push_child(parent, s, a, i, i - 1, i + 6)
            assert child.states[0] == parent.states[1]
            parent = child
    assert len(memory._states) == len(disk._states) == 5, "four chained entries share states"
    [spill] = tmp_path.iterdir()
    files = sorted(spill.glob("*.npz"))
    assert len(files) == 2, "the oldest states beyond the budget are on disk"
    assert disk.nbytes() == {"ram": 3 * state_bytes, "disk": sum(f.stat().st_size for f in files)}
    for a, b in zip(memory.entries, disk.entries, strict=True):
        ha, hb = memory.history(a), disk.history(b)
        for v in ("z", "t"):
            np.testing.assert_array_equal(ha[1][v], hb[1][v])
        np.testing.assert_array_equal(ha[0]["2t"], hb[0]["2t"])
    twin = copy.deepcopy(disk)  # as the Trainer copies the strategy it is given
    assert twin._spill != disk._spill and len(list(twin._spill.glob("*.npz"))) == 2
    for a, b in zip(twin.entries, disk.entries, strict=True):
        np.testing.assert_array_equal(twin.history(a)[1]["z"], disk.history(b)[1]["z"])
    twin.close()
    disk.clear()
    assert not list(spill.glob("*.npz"))
    disk.close()
    assert not spill.exists(), "the spill directory goes with its buffer"


def test_checkpoints_write_only_new_states_and_prune_the_rest(tmp_path) -> None:
    """`save` writes the states its store lacks and an index; `restore` reassembles the buffer
    (in another buffer, whose own new states never take an old name); `prune` keeps what the
    kept checkpoints name."""
    buffer, store = ReplayBuffer(3), tmp_path / "store"
    surf, atmos = _state(0)
    two = lambda d: {v: np.stack([x, x + 1]) for v, x in d.items()}
    first = buffer.push_history(two(surf), two(atmos), 0, 0, 6)
    written = buffer.save(store, 1, {"rng": 1})
    files = {p.stem: p.stat().st_size for p in (store / "states").glob("*.npz")}
    assert set(files) == set(first.states) and written == sum(files.values())

    parent = first
    for i in (1, 2):
        s, a = _state(i)
        parent = buffer.push_child(parent, s, a, 6 * i, i, 6 * i + 6)
    written = buffer.save(store, 2, {"rng": 2})
    new = set(buffer._states) - set(files)
    assert len(new) == 2 and written == sum(
        (store / "states" / f"{n}.npz").stat().st_size for n in new
    ), "the second checkpoint holds only the states added since the first"
    assert written == sum(files.values()), "two new states, as many bytes as the first two"

    restored = ReplayBuffer(3)
    assert restored.restore(store, 2)["rng"] == 2
    assert restored.entries == buffer.entries
    for e in buffer.entries:
        for n in e.states:
            np.testing.assert_array_equal(restored.state(n), buffer.state(n))
    s, a = _state(9)
    child = restored.push_child(restored.entries[-1], s, a, 30, 3, 36)
    assert child.states[1] not in set(files) | new, "a new state never takes a stored one's name"

    ReplayBuffer.prune(store, [2])
    assert ReplayBuffer.steps(store) == [2]
    names = {p.stem for p in (store / "states").glob("*.npz")}
    assert names == set(buffer._states), "states no kept index names are deleted"
    with pytest.raises(FileNotFoundError):
        ReplayBuffer(3).restore(store, 1)


def _contents(strategy: ReplayStrategy) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Each entry in buffer order: its times, which states it shares (numbered by first use) and
    its decoded history `(2, channels, h, w)`."""
    buffer, number = strategy.buffer, {}
    for e in buffer.entries:
        for name in e.states:
            number.setdefault(name, len(number))
    return [
        (
            (e.time, e.rollout_step, e.target_time, *(number[n] for n in e.states)),
            np.stack([buffer.state(n) for n in e.states]),
        )
        for e in buffer.entries
    ]


def _assert_same_buffer(got: list, want: list) -> None:
    assert [key for key, _ in got] == [key for key, _ in want]
    for (_, a), (_, b) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_resume_restores_the_buffer_and_training_exactly(source, tmp_path) -> None:
    """A crash at step 7 resumes from step 4's checkpoint and ends as the uninterrupted run does,
    bit for bit. The interrupted runs spill every state to disk (the uninterrupted one keeps them
    in memory), and the resumed run's step-8 checkpoint writes only the states added since step
    4."""

    def strategy(**kwargs):
        return ReplayStrategy(
            _model(), capacity=12, refresh_every=3, max_lead_hours=((0, 24),), seed=7, **kwargs
        )

    def spilling():
        return strategy(spill_dir=tmp_path / "spill", buffer_ram_gb=0)

    class Crash(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("simulated crash")

    class Snapshot(Callback):
        """The strategy's state and buffer at step `step`, and what that step's checkpoint wrote
        (read at the next step's start: checkpoint callbacks run last at every hook)."""

        def __init__(self, step: int) -> None:
            self.step = step

        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if trainer.global_step == self.step:
                strategy = trainer.strategy
                self.state = json.loads(json.dumps(strategy.host_state()))
                self.contents = _contents(strategy)
                self.names = set(strategy.buffer._states)
                self.spilled = strategy.buffer.nbytes()

        def on_train_batch_start(self, trainer, batch, batch_idx):
            if trainer.global_step == self.step:
                self.written = trainer.strategy.checkpoint_bytes
                store = trainer.workdir / "checkpoints" / "replay" / "process_0" / "states"
                self.files = {p.stem: p.stat().st_size for p in store.glob("*.npz")}

    at4 = Snapshot(4)
    straight = _fit(strategy(), source, tmp_path / "a", max_steps=11, callbacks=[at4])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            spilling(),
            source,
            tmp_path / "b",
            max_steps=11,
            callbacks=[ModelCheckpoint(every_n_steps=4), Crash()],
        )

    # The checkpoint at step 4 restores the buffer exactly as the uninterrupted run had it then.
    checkpoints = tmp_path / "b" / "checkpoints"
    probe = Trainer(
        spilling(),
        optimizer=OPTIM,
        callbacks=[ModelCheckpoint(directory=checkpoints)],
        workdir=tmp_path / "b",
        max_steps=4,
    )
    probe.load(_pipeline(source), ckpt_path=checkpoints / "4")
    probe = probe.strategy
    assert probe.host_state() == at4.state
    _assert_same_buffer(_contents(probe), at4.contents)
    assert probe.buffer.nbytes()["ram"] == 0 < probe.buffer.nbytes()["disk"]
    restored_names = set(probe.buffer._states)

    at8 = Snapshot(8)
    resumed = _fit(
        spilling(),
        source,
        tmp_path / "b",
        max_steps=11,
        callbacks=[ModelCheckpoint(every_n_steps=4, max_to_keep=1), at8],
    )
    assert resumed.global_step == 11
    assert resumed.strategy.host_state() == straight.strategy.host_state()
    _assert_same_buffer(_contents(resumed.strategy), _contents(straight.strategy))
    for a, b in zip(
        jax.tree_util.tree_leaves(straight.state),
        jax.tree_util.tree_leaves(resumed.state),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Step 8's checkpoint wrote exactly the states added since step 4 (it restored from there).
    store = checkpoints / "replay" / "process_0" / "states"
    new = at8.names - restored_names
    assert new and new < at8.names, "some states are new, some were checkpointed at step 4"
    assert at8.written == sum(at8.files[n] for n in new)
    assert at8.written < sum(at8.files[n] for n in at8.names)
    assert at8.spilled["ram"] == 0
    # The store keeps the indices of the checkpoints that exist and the states they name.
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert ReplayBuffer.steps(store.parent) == steps == [11]
    named = set()
    for step in steps:
        index = json.loads((store.parent / "index" / f"{step}.json").read_text())
        named.update(n for e in index["entries"] for n in e["states"])
    assert {p.stem for p in store.glob("*.npz")} == named


def test_rows_of_different_rollout_steps_use_their_own_adapters(source) -> None:
    model = _model(use_lora=True, lora_mode="all", lora_steps=3)
    strategy = ReplayStrategy(model)
    inputs, _ = next(iter(_pipeline(source).iterator(0)))
    inputs = inputs.crop(2)
    params = model.init(jax.random.PRNGKey(0), inputs)["params"]
    params = jax.tree_util.tree_map_with_path(  # non-zero B, so every adapter differs
        lambda p, x: (
            x + 0.05 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
            if "lora_B" in str(p)
            else x
        ),
        params,
    )
    mixed = inputs.replace(
        metadata=inputs.metadata.replace(rollout_step=np.array([0, 2], np.int32))
    )
    got = jax.jit(strategy.predict)(params, mixed)
    apply = jax.jit(lambda batch: model.apply({"params": params}, batch))
    for row, step in enumerate((0, 2)):
        one = inputs.replace(
            atmos_vars={v: x[row : row + 1] for v, x in inputs.atmos_vars.items()},
            metadata=inputs.metadata.replace(
                time=inputs.metadata.time[row : row + 1], rollout_step=np.int32(step)
            ),
        )
        want = apply(one)
        for v in ("z", "t"):
            np.testing.assert_allclose(
                got.atmos_vars[v][row],
                want.atmos_vars[v][0],
                rtol=2e-5,
                atol=1e-5 * float(np.abs(want.atmos_vars[v]).max()),
            )
        assert int(got.metadata.rollout_step[row]) == step + 1
    assert not np.allclose(got.atmos_vars["t"][0], got.atmos_vars["t"][1])


@pytest.mark.parametrize("how", ["LoRAStrategy", "trainable", "train_base"])
def test_replay_with_lora_trains_the_adapters_and_keeps_the_base_bit_identical(source, how) -> None:
    """LoRA asked for by wrapping (`LoRAStrategy(ReplayStrategy(...))`) or by `trainable="lora"`:
    every adapter moves, the base stays bit-identical, Adam holds adapter moments only. With
    `train_base=True` the base moves too."""
    model = _model(use_lora=True)
    inputs, _ = next(iter(_pipeline(source).iterator(0)))
    params = model.init(jax.random.PRNGKey(0), inputs.crop(2))["params"]
    params = jax.tree_util.tree_map(  # non-zero AdaLN modulation and B, so the adapters matter
        lambda x: np.asarray(x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape)),
        params,
    )
    replay = dict(refresh_every=2, max_lead_hours=((0, 18),))
    if how == "trainable":
        strategy = ReplayStrategy(model, trainable="lora", **replay)
    else:
        strategy = LoRAStrategy(ReplayStrategy(model, **replay), train_base=how == "train_base")
        assert type(strategy) is ReplayStrategy
        assert strategy.trainable == Trainable.lora(train_base=how == "train_base")
    trainer = Trainer(
        strategy,
        optimizer=OPTIM,
        max_steps=2,
        log_every_n_steps=1,
        init_params=jax.tree_util.tree_map(np.copy, params),
    )
    trainer.fit(_pipeline(source))
    assert len(trainer.strategy.buffer) > 2 and trainer.strategy.state_dict()["updates"] == 2
    before = traverse_util.flatten_dict(params)
    after = traverse_util.flatten_dict(jax.device_get(trainer.state.params))
    lora = [k for k in before if is_lora_path(k)]
    assert lora and len(lora) < len(before)
    moved = {k for k, v in before.items() if not np.array_equal(np.asarray(after[k]), v)}
    assert set(lora) <= moved, f"adapters that did not train: {sorted(set(lora) - moved)}"
    trained = before if how == "train_base" else lora
    if how == "train_base":
        assert len(moved) > len(lora), "the base trains too"
    else:
        assert moved == set(lora), f"base parameters that moved: {sorted(moved - set(lora))}"
    moments = sum(
        x.size
        for x in jax.tree_util.tree_leaves(trainer.state.opt_state)
        if np.issubdtype(x.dtype, np.floating)
    )
    assert moments == 2 * sum(before[k].size for k in trained)


def test_needs_data_with_access_by_time(source) -> None:
    examples = [next(iter(_pipeline(source).iterator(0)))]
    trainer = Trainer(ReplayStrategy(_model()), optimizer=OPTIM, max_steps=1)
    with pytest.raises(TypeError, match="by valid time"):
        trainer.fit(InMemoryData(examples))
    with pytest.raises(ValueError, match="strategy.steps=1"):
        ReplayStrategy(_model(), steps=2)


WORKER = "tests.workers.distributed_replay"


@pytest.mark.slow  # two processes start JAX and compile: minutes on a shared 2-core machine
@pytest.mark.skipif(jax.device_count() != 1, reason="the workers use one CPU device each")
def test_each_process_checkpoints_and_restores_its_own_buffer(tmp_path) -> None:
    """Two processes (`jax.distributed` on localhost, gloo) train replay on their own shards of
    the data: each keeps the predictions of its own rows, and restoring the checkpoint gives each
    process back its own buffer and sampling state, not process 0's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", WORKER, str(i), "2", str(port), str(tmp_path)],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    try:
        logs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)

    results = [json.loads((tmp_path / f"process_{i}.json").read_text()) for i in range(2)]
    for process, result in enumerate(results):
        assert result["restored"] == result["trained"], f"process {process}'s buffer"
        origins = {t - step * STEP_MINUTES for t, step, _, _ in result["trained"]["entries"]}
        assert origins <= set(result["fresh_times"]), "every entry descends from its own rows"
        assert any(step > 0 for _, step, _, _ in result["trained"]["entries"])
    assert set(results[0]["fresh_times"]).isdisjoint(results[1]["fresh_times"])
    assert results[0]["trained"]["entries"] != results[1]["trained"]["entries"]
    stores = tmp_path / "run" / "checkpoints" / "replay"
    assert sorted(p.name for p in stores.iterdir()) == ["process_0", "process_1"]
