"""Lightning's Trainer knobs, each through the real Trainer with the tiny model of test_trainer.

Validation cadence (`check_val_every_n_epoch`, fractional `val_check_interval`), `limit_*_batches`
as counts and fractions, `fast_dev_run=N`, `gradient_clip_algorithm`, `precision="bf16-true"`,
`num_sanity_val_steps`, `min_steps` / `min_epochs`, `overfit_batches`, per-instance callback
state keys and hyper-parameters sent to every writer.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint
from callbacks.writers import (
    CsvWriter,
    JsonlWriter,
    NoopWriter,
    TensorBoardWriter,
    WandbWriter,
)
from tests.helpers import tiny_model
from tests.test_callbacks_basic import _tb_events
from tests.test_trainer import _data, _example, _trainer
from trainers.checkpointing import _saved_key, callback_keys
from trainers.data import InMemoryData
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer, _to_device_batch


class Recorder(Callback):
    """Records `(hook, global_step, batch_idx, sanity_checking)` for the hooks tests look at."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int | None, bool]] = []

    def _add(self, trainer, hook: str, batch_idx: int | None = None) -> None:
        self.calls.append((hook, trainer.global_step, batch_idx, trainer.sanity_checking))

    def on_train_start(self, trainer) -> None:
        self._add(trainer, "train_start")

    def on_sanity_check_start(self, trainer) -> None:
        self._add(trainer, "sanity_start")

    def on_sanity_check_end(self, trainer) -> None:
        self._add(trainer, "sanity_end")

    def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
        self._add(trainer, "train", batch_idx)

    def on_validation_start(self, trainer) -> None:
        self._add(trainer, "val_start")

    def on_validation_batch_start(self, trainer, batch, batch_idx) -> None:
        self._add(trainer, "val", batch_idx)

    def on_test_batch_start(self, trainer, batch, batch_idx) -> None:
        self._add(trainer, "test", batch_idx)

    def on_predict_batch_start(self, trainer, batch, batch_idx) -> None:
        self._add(trainer, "predict", batch_idx)

    def steps(self, hook: str) -> list[int]:
        return [step for name, step, _, _ in self.calls if name == hook]

    def count(self, hook: str) -> int:
        return len(self.steps(hook))


class Rows(NoopWriter):
    """Keeps every scalar written, by step."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}

    def write_scalars(self, step, scalars) -> None:
        self.rows.setdefault(int(step), {}).update(scalars)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_validation_every_n_epochs_at_epoch_ends_and_at_fractions_of_an_epoch(model) -> None:
    """`check_val_every_n_epoch=2`: epoch-end validation after epochs 2 and 4 only;
    `val_check_interval=0.5` with it: twice in every second epoch, after half and all of its
    steps."""
    epoch_end = Recorder()
    trainer = _trainer(
        model,
        None,
        max_steps=None,
        max_epochs=4,
        check_val_every_n_epoch=2,
        limit_val_batches=1,
        callbacks=[epoch_end],
    )
    trainer.fit(_data(model, n=1), _data(model, n=1))
    assert epoch_end.steps("val_start") == [2, 4]

    fractional = Recorder()
    trainer = _trainer(
        model,
        None,
        max_steps=None,
        max_epochs=2,
        val_check_interval=0.5,
        check_val_every_n_epoch=2,
        limit_val_batches=1,
        callbacks=[fractional],
    )
    trainer.fit(_data(model, n=4), _data(model, n=1))
    assert fractional.steps("val_start") == [6, 8]
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        _trainer(model, None, max_steps=1, val_check_interval=1.5)


def test_limits_as_counts_and_fractions_in_every_loop(model) -> None:
    """An int limit is a number of batches, a float a fraction of the data's batches (rounded
    down); `limit_val_batches=0` turns validation off."""
    recorder = Recorder()
    data = _data(model, n=4)
    trainer = _trainer(
        model,
        None,
        max_steps=None,
        max_epochs=1,
        limit_train_batches=0.5,
        limit_val_batches=0.25,
        limit_test_batches=3,
        limit_predict_batches=0.5,
        callbacks=[recorder],
    )
    trainer.fit(data, data)
    assert trainer.global_step == 2 and recorder.count("train") == 2
    assert recorder.count("val") == 1  # at the epoch's end, 0.25 of 4 batches
    trainer.test(data)
    assert recorder.count("test") == 3
    assert len(list(trainer.predict(data))) == 2 and recorder.count("predict") == 2

    silent = Recorder()
    trainer = _trainer(
        model, None, max_steps=1, limit_val_batches=0, val_check_interval=1, callbacks=[silent]
    )
    trainer.fit(data, data)
    assert silent.count("val_start") == 0
    with pytest.raises(ValueError, match="of 4 batches is none"):
        _trainer(model, None, max_steps=1, limit_test_batches=0.1).test(data)


def test_fast_dev_run_n_runs_n_batches_everywhere_and_writes_nothing(tmp_path, model) -> None:
    recorder, rows = Recorder(), Rows()
    csv = CsvWriter(tmp_path / "metrics.csv")
    data = _data(model, n=4)
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=None,
        fast_dev_run=2,
        callbacks=[ModelCheckpoint(every_n_steps=1), recorder],
        writers=[rows, csv],
        config=ml_collections.ConfigDict({"seed": 1}),
    )
    trainer.fit(data, data)
    assert trainer.global_step == 2 and recorder.count("train") == 2
    assert recorder.steps("val") == [2, 2]
    trainer.test(data)
    assert recorder.count("test") == 2
    assert len(list(trainer.predict(data))) == 2
    csv.close()
    assert rows.rows == {}
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1:] == []
    assert not (tmp_path / "hparams.yaml").exists()
    assert not list(tmp_path.glob("checkpoints/*"))


@pytest.mark.slow  # CI time
def test_gradient_clip_algorithm_value_clips_each_entry(model) -> None:
    """One step with `gradient_clip_algorithm="value"` equals AdamW on the gradient clipped entry
    by entry, which here differs from clipping its global norm. A large `eps` makes the AdamW
    update proportional to the gradient, so that the way it was clipped shows."""
    example = _example(model, 0)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), _to_device_batch(example)[0])["params"]
    optim = ml_collections.ConfigDict(
        {"learning_rate": 1.0, "warmup_steps": 0, "schedule": "constant", "eps": 10.0}
    )
    clip = 1e-3
    trainer = Trainer(
        RolloutStrategy(model, steps=2),
        optimizer=optim,
        max_steps=1,
        init_params=jax.device_get(params),  # a copy: the state's buffers are donated
        gradient_clip_val=clip,
        gradient_clip_algorithm="value",
    )
    trainer.fit(InMemoryData([example], shuffle=False))

    strategy = trainer.strategy
    inputs, targets = _to_device_batch(example)
    loss = lambda p: strategy.loss_fn(p, inputs, targets, strategy.default_controls())[0]
    grads = jax.jit(jax.grad(loss))(params)

    def one_step(clipping: optax.GradientTransformation):
        tx = optax.chain(clipping, optax.adamw(1.0, eps=10.0, weight_decay=0.0))
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    by_value, by_norm = one_step(optax.clip(clip)), one_step(optax.clip_by_global_norm(clip))
    got = jax.tree_util.tree_leaves(trainer.state.params)
    for a, b, c in zip(got, jax.tree_util.tree_leaves(by_value), jax.tree_util.tree_leaves(params)):
        np.testing.assert_allclose(
            np.asarray(a) - np.asarray(c), np.asarray(b) - np.asarray(c), rtol=1e-3, atol=1e-9
        )
    moved = lambda new: np.sqrt(
        sum(
            float(jnp.sum((x - y) ** 2))
            for x, y in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(params))
        )
    )
    assert moved(by_value) > 10 * moved(by_norm)  # the two algorithms differ here
    with pytest.raises(ValueError, match="gradient_clip_algorithm"):
        _trainer(model, None, max_steps=1, gradient_clip_algorithm="max")


BF16 = np.dtype(jnp.bfloat16)


@pytest.mark.slow  # CI time
def test_bf16_true_keeps_parameters_and_adam_moments_in_bfloat16(model) -> None:
    """`precision="bf16-true"`: every floating parameter and optimiser moment is bfloat16 before
    and after training steps, the steps move the parameters and the loss stays finite."""
    trainer = _trainer(model, None, max_steps=2, precision="bf16-true")
    data = _data(model, n=2)
    trainer.load(data)
    before = jax.device_get(trainer.state.params)
    trainer.fit(data)
    assert trainer.strategy.model.autocast  # the backbone computes in bfloat16
    floating = lambda tree: [
        x.dtype for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert set(floating(trainer.state.params)) == {BF16}
    assert set(floating(trainer.state.opt_state)) == {BF16}
    assert set(floating(before)) == {BF16}
    after = jax.device_get(trainer.state.params)
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before))
    )
    assert np.isfinite(trainer.callback_metrics["train/loss"])


@pytest.mark.slow  # CI time: heavy, and its neighbours cover the same code in CI
def test_sanity_check_runs_validation_batches_first_and_logs_nothing(model) -> None:
    """`num_sanity_val_steps=2`: two validation batches before the first training batch, between
    the sanity hooks and with `sanity_checking` set; no row written, no metric kept, and no best
    checkpoint ranked by them. `-1` runs every (limited) validation batch."""
    recorder, rows = Recorder(), Rows()
    data = _data(model, n=3)
    trainer = _trainer(
        model,
        None,
        max_steps=1,
        num_sanity_val_steps=2,
        callbacks=[recorder],
        writers=[rows],
    )
    trainer.fit(data, data)
    assert [(name, step, i, sanity) for name, step, i, sanity in recorder.calls][:6] == [
        ("sanity_start", 0, None, True),
        ("val_start", 0, None, True),
        ("val", 0, 0, True),
        ("val", 0, 1, True),
        ("sanity_end", 0, None, True),
        ("train_start", 0, None, False),
    ]
    assert not any(k.startswith("val/") for k in trainer.callback_metrics)
    assert not any(k.startswith("val/") for row in rows.rows.values() for k in row)
    assert rows.rows[1]["train/loss"] > 0  # the writer does get the training rows

    everything = Recorder()
    trainer = _trainer(
        model,
        None,
        max_steps=1,
        num_sanity_val_steps=-1,
        limit_val_batches=3,
        callbacks=[everything],
    )
    trainer.fit(data, data)
    assert everything.steps("val") == [0, 0, 0]


class StopAt(Callback):
    """Asks to stop after `step`; `agreed`: as Preemption does, agreed by every process."""

    def __init__(self, step: int, agreed: bool = False) -> None:
        self.step, self.agreed = step, agreed

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
            trainer.stop_agreed = self.agreed


@pytest.mark.slow  # CI time
def test_min_steps_and_min_epochs_hold_a_stop_back_but_not_an_agreed_one(model) -> None:
    data = _data(model, n=2)
    stop_at_1 = dict(max_steps=10, callbacks=[StopAt(1)])
    free = _trainer(model, None, **stop_at_1)
    free.fit(data)
    assert free.global_step == 1
    held = _trainer(model, None, min_steps=3, **stop_at_1)
    held.fit(data)
    assert held.global_step == 3
    epochs = _trainer(model, None, min_epochs=2, **stop_at_1)
    epochs.fit(data)
    assert (epochs.global_step, epochs.current_epoch) == (4, 2)  # two epochs of two batches
    preempted = _trainer(model, None, max_steps=10, min_steps=3, callbacks=[StopAt(1, True)])
    preempted.fit(data)
    assert preempted.global_step == 1


@pytest.mark.slow  # CI time: heavy, and its neighbours cover the same code in CI
def test_overfit_batches_trains_and_validates_on_the_same_first_batches(model) -> None:
    """`overfit_batches=2` of shuffled data: every epoch trains on the first two examples of
    epoch 0's order, in that order, and validation runs on those two, not on the given data."""
    examples = [_example(model, seed) for seed in range(4)]
    data = InMemoryData(examples, seed=3)
    first = [id(ex) for ex in list(data.iterator(0))[:2]]
    assert first != [id(ex) for ex in list(data.iterator(1))[:2]]  # the data does reshuffle

    seen: dict[str, list[int]] = {"train": [], "val": []}

    class Seen(Callback):
        def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
            seen["train"].append(id(batch))

        def on_validation_batch_start(self, trainer, batch, batch_idx) -> None:
            seen["val"].append(id(batch))

    trainer = _trainer(
        model, None, max_steps=None, max_epochs=3, overfit_batches=2, callbacks=[Seen()]
    )
    trainer.fit(data, InMemoryData([_example(model, 9)], shuffle=False))
    assert seen["train"] == first * 3
    assert seen["val"] == first * 3  # at each epoch's end


class Counter(Callback):
    """A callback with state: how many training batches it saw."""

    def __init__(self, name: str) -> None:
        self.name, self.seen = name, 0

    def on_train_batch_start(self, trainer, batch, batch_idx) -> None:
        self.seen += 1 if self.name == "a" else 10

    def state_dict(self) -> dict[str, int]:
        return {"seen": self.seen}

    def load_state_dict(self, state) -> None:
        self.seen = state["seen"]


def test_two_callbacks_of_one_class_keep_their_own_state(tmp_path, model) -> None:
    """State keys carry the constructor's arguments (`Counter{'name': 'a'}`), so each of two
    callbacks of one class gets its own state back on resume."""
    data = _data(model, n=2)
    first = [Counter("a"), Counter("b")]
    trainer = _trainer(
        model, tmp_path, max_steps=1, callbacks=[ModelCheckpoint(every_n_steps=1), *first]
    )
    trainer.fit(data)
    assert [c.seen for c in first] == [1, 10]
    resumed = [Counter("b"), Counter("a")]  # another order: the keys, not positions, decide
    trainer = _trainer(
        model, tmp_path, max_steps=2, callbacks=[ModelCheckpoint(every_n_steps=1), *resumed]
    )
    trainer.fit(data)
    assert trainer.restored_checkpoint is not None
    assert [c.seen for c in resumed] == [20, 2]


def test_state_keys_unique_and_checkpoints_keyed_by_class_name_still_load() -> None:
    a, b, again = Counter("a"), Counter("b"), Counter("a")
    assert callback_keys([a, b, again]) == [
        "Counter{'name': 'a'}",
        "Counter{'name': 'b'}",
        "Counter{'name': 'a'}#2",
    ]
    old = {"Counter": {"seen": 5}, "Other": {}}  # written before keys carried arguments
    assert _saved_key(a.state_key, Counter, old, [a]) == "Counter"
    assert _saved_key(a.state_key, Counter, old, [a, b]) is None  # whose would it be?


def test_hyperparameters_reach_every_writer_once_at_fit_start(tmp_path, model, monkeypatch) -> None:
    """The config goes to the CSV writer's `hparams.yaml`, a JSONL `hparams` record,
    TensorBoard's HPARAMS and TEXT dashboards and the W&B run's config, before the first training
    row."""
    import yaml

    config = ml_collections.ConfigDict(
        {"optimizer": {"learning_rate": 1e-3, "schedule": "constant"}, "strategy": {"steps": 2}}
    )
    writers = [
        CsvWriter(tmp_path / "metrics.csv"),
        JsonlWriter(tmp_path / "metrics.jsonl"),
        TensorBoardWriter(tmp_path / "tb"),
    ]
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # keep the user's ~/.cache clean
    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    run = WandbWriter(project="knobs", dir=tmp_path, mode="offline", settings=settings)
    trainer = _trainer(model, None, max_steps=1, writers=[*writers, run], config=config)
    trainer.fit(_data(model, n=1))
    assert dict(run.run.config)["optimizer.learning_rate"] == 1e-3
    for writer in [*writers, run]:
        writer.close()

    assert yaml.safe_load((tmp_path / "hparams.yaml").read_text()) == config.to_dict()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["hparams"] for r in records if "hparams" in r] == [
        {"optimizer.learning_rate": 1e-3, "optimizer.schedule": "constant", "strategy.steps": 2}
    ]
    assert "hparams" in records[0] and "train/loss" in records[1]
    values = {v.tag: v for event in _tb_events(tmp_path / "tb") for v in event.summary.value}
    assert "_hparams_/session_start_info" in values
    text = values["hparams/text_summary"].tensor.string_val[0].decode()
    assert "| optimizer.learning_rate | 0.001 |" in text
