"""ReplayStrategy: targets at each entry's valid time, the lead-time cap, FIFO, exact resume.

Trained through the real Trainer on a TFDS dataset built from the bundled IFS HRES sample (eight
six-hourly 10° analyses), with a tiny Aurora.
"""

from __future__ import annotations

import json
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
    """Keeps each training example and the buffer after each step."""

    def __init__(self) -> None:
        self.examples: list[tuple[int, Batch, Batch]] = []
        self.buffers: list[list[Entry]] = []

    def on_train_batch_start(self, trainer, batch, batch_idx):
        inputs, targets = batch
        self.examples.append((trainer.global_step, inputs, targets[0]))

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.buffers.append(list(trainer.strategy.buffer.entries))


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
    (_, inputs, _) = record.examples[0]
    children = [
        e for e in record.buffers[0] if e.rollout_step == int(inputs.metadata.rollout_step[0]) + 1
    ]
    assert len(children) == 2
    for row, child in enumerate(children):
        assert child.time == int(inputs.metadata.time[row]) + STEP_MINUTES
        np.testing.assert_array_equal(
            child.atmos["z"][0], np.asarray(inputs.atmos_vars["z"][row, 1])
        )
        assert not np.array_equal(child.atmos["z"][1], child.atmos["z"][0])


def test_buffer_is_fifo_and_samples_within_the_cap() -> None:
    buffer = ReplayBuffer(capacity=3)
    entries = [
        Entry(
            {},
            {"z": np.full((2, 1, 2, 2), i, np.float32)},
            time=i,
            rollout_step=i % 2,
            target_time=i + 360,
        )
        for i in range(5)
    ]
    for e in entries:
        buffer.push(e)
    assert [e.time for e in buffer.entries] == [2, 3, 4]
    drawn = buffer.sample(np.random.default_rng(0), 50, max_lead_steps=1)
    assert {e.time for e in drawn} == {2, 4}  # rollout_step 1 (lead 2 steps) is excluded
    with pytest.raises(RuntimeError, match="lead-time cap"):
        ReplayBuffer(1).sample(np.random.default_rng(0), 1, 1)


def test_resume_restores_the_buffer_and_training_exactly(source, tmp_path) -> None:
    def strategy():
        return ReplayStrategy(
            _model(), capacity=5, refresh_every=3, max_lead_hours=((0, 24),), seed=7
        )

    class Crash(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if trainer.global_step == 7:
                raise RuntimeError("simulated crash")

    class Snapshot(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            if trainer.global_step == 4:
                self.state = json.loads(json.dumps(trainer.strategy.state_dict()))
                self.arrays = trainer.strategy.array_state()

    snapshot = Snapshot()
    straight = _fit(strategy(), source, tmp_path / "a", max_steps=11, callbacks=[snapshot])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            strategy(),
            source,
            tmp_path / "b",
            max_steps=11,
            callbacks=[ModelCheckpoint(every_n_steps=4), Crash()],
        )

    # The checkpoint at step 4 restores the buffer exactly as the uninterrupted run had it then.
    probe = Trainer(
        strategy(),
        optimizer=OPTIM,
        callbacks=[ModelCheckpoint(directory=tmp_path / "b" / "checkpoints")],
        workdir=tmp_path / "b",
        max_steps=4,
    )
    probe.load(_pipeline(source), ckpt_path=tmp_path / "b" / "checkpoints" / "4")
    probe = probe.strategy
    assert probe.state_dict() == snapshot.state
    assert len(probe.buffer) == len(snapshot.arrays["atmos"]["z"])
    for v, stacked in snapshot.arrays["atmos"].items():
        np.testing.assert_array_equal(probe.buffer.arrays()["atmos"][v], stacked)

    resumed = _fit(
        strategy(),
        source,
        tmp_path / "b",
        max_steps=11,
        callbacks=[ModelCheckpoint(every_n_steps=4)],
    )
    assert resumed.global_step == 11
    assert resumed.strategy.state_dict() == straight.strategy.state_dict()
    for a, b in zip(resumed.strategy.buffer.entries, straight.strategy.buffer.entries, strict=True):
        for v in a.atmos:
            np.testing.assert_array_equal(a.atmos[v], b.atmos[v])
    for a, b in zip(
        jax.tree_util.tree_leaves(straight.state),
        jax.tree_util.tree_leaves(resumed.state),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
