"""EMA, Profiler and ModelSummary, run through the real Trainer on the tiny model."""

from __future__ import annotations

import io
from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint
from callbacks.ema import EMA
from callbacks.model_summary import ModelSummary, summarize
from callbacks.profiler import Profiler
from tests.helpers import tiny_model
from tests.test_trainer import _example
from trainers.data import InMemoryData
from trainers.strategies.lora import LoRAStrategy
from trainers.strategies.rollout import RolloutStrategy
from trainers.strategies.trainable import Trainable
from trainers.trainer import Trainer, _to_device_batch

OPTIM = ml_collections.ConfigDict({"learning_rate": 5e-3, "schedule": "constant"})


def _data(model, n: int = 2) -> InMemoryData:
    return InMemoryData([_example(model, seed, k=1) for seed in range(n)], shuffle=False)


def _trainer(strategy, callbacks, workdir=None, **kwargs) -> Trainer:
    return Trainer(
        strategy,
        optimizer=OPTIM,
        callbacks=callbacks,
        workdir=workdir,
        log_every_n_steps=1,
        **{"max_steps": 3, **kwargs},
    )


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


class _Params(Callback):
    """The parameters when training starts and after every optimiser step, on the host."""

    def __init__(self):
        self.seen: list[dict] = []

    def on_train_start(self, trainer):
        self.seen.append(_flat(trainer.state.params))

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.seen.append(_flat(trainer.state.params))


def _decoder_only(path) -> bool:
    return path[0] == "decoder"


def _strategy(model) -> RolloutStrategy:
    """One strategy (and `EMA(decay=0.5)` where the test allows) for every test that trains, so
    that they share one compiled step."""
    return RolloutStrategy(model, steps=1, trainable=Trainable.where(_decoder_only))


@pytest.mark.parametrize(
    ("ema", "decays"),
    [
        (EMA(decay=0.7), (0.7, 0.7, 0.7)),
        (EMA(decay=0.6, warmup_power=1.0), (0.0, 0.5, 0.6)),  # min(0.6, 1 - 1/n)
    ],
    ids=["constant", "warmup"],
)
def test_ema_equals_a_hand_computation_over_three_steps(ema, decays) -> None:
    """Only the trainable leaves are averaged (here the decoder's); each equals
    `d * ema + (1 - d) * params` over the 3 steps, starting from the initial parameters."""
    model = tiny_model()
    params = _Params()
    trainer = _trainer(_strategy(model), [params, ema])
    trainer.fit(_data(model))

    average = _flat(ema.average(trainer))
    assert set(average) == {k for k in params.seen[0] if k[0] == "decoder"}
    expected = {k: params.seen[0][k].astype(np.float64) for k in average}
    for d, seen in zip(decays, params.seen[1:]):
        expected = {k: d * e + (1 - d) * seen[k] for k, e in expected.items()}
    assert any(not np.allclose(expected[k], params.seen[-1][k]) for k in average)
    for k, value in average.items():
        np.testing.assert_allclose(value, expected[k], rtol=1e-5, atol=1e-7, err_msg=str(k))


def test_averaged_params_keep_the_parameters_structure_with_empty_modules() -> None:
    """A model without surface variables has `surf_heads: {}`: the averaged parameters still have
    the parameters' exact structure (the evaluation step's shardings are a prefix of it), with the
    frozen leaves the parameters' own and the trained ones the average."""
    params = {"decoder": {"head": {"kernel": np.ones((2, 2), np.float32)}, "surf_heads": {}}}
    params["encoder"] = {"kernel": np.zeros(3, np.float32)}
    ema = EMA(decay=0.5)
    stand_in = SimpleNamespace(strategy=_strategy(tiny_model()), state=None)
    average = ema.init_device_state(stand_in, params)
    assert _flat(average["params"]).keys() == {("decoder", "head", "kernel")}
    stand_in.state = SimpleNamespace(
        params=params, extras={"callbacks": {ema.device_state_key: average}}
    )
    averaged = ema.averaged_params(stand_in)
    assert jax.tree_util.tree_structure(averaged) == jax.tree_util.tree_structure(params)
    assert averaged["encoder"]["kernel"] is params["encoder"]["kernel"]


def _mean_loss(trainer: Trainer, data: InMemoryData, params) -> float:
    """The mean validation loss with `params`, by the trainer's compiled evaluation step."""
    state = trainer.state.replace(params=params)
    losses = []
    for example in data.iterator(0):
        batch = _to_device_batch(example)
        losses.append(float(trainer._eval_step(batch)(state, batch, trainer.controls)["loss"]))
    return float(np.mean(losses))


def test_validation_uses_the_average_and_test_the_trained_parameters() -> None:
    """Validation (in fit and on its own) scores the averaged parameters, which score otherwise
    than the trained ones; `test` (not in `evaluate`) scores the trained ones; afterwards the state
    holds the trained parameters again."""
    model = tiny_model()
    data = _data(model)
    ema = EMA(decay=0.5)
    validated: list[float] = []

    class Seen(Callback):
        def on_validation_end(self, trainer):
            validated.append(trainer.callback_metrics["val/loss"])

    trainer = _trainer(_strategy(model), [ema, Seen()], val_check_interval=3)
    trainer.fit(data, data)
    trained = trainer.state.params
    with_average = _mean_loss(trainer, data, ema.averaged_params(trainer))
    with_trained = _mean_loss(trainer, data, trained)
    assert abs(with_average - with_trained) > 1e-3 * with_trained
    assert validated == [pytest.approx(with_average, rel=1e-5)]
    assert trainer.validate(data)["val/loss"] == pytest.approx(with_average, rel=1e-5)
    assert trainer.test(data)["test/loss"] == pytest.approx(with_trained, rel=1e-5)
    assert trainer.state.params is trained


def test_resume_restores_the_average_exactly(tmp_path) -> None:
    """A run resumed from another's step-2 checkpoint ends at step 4 with the same average, bit
    for bit. `ModelCheckpoint` comes first in the list, so it saves step 2 before `EMA`'s own
    `on_train_batch_end` has updated the average. A run without the EMA refuses the checkpoint."""

    def run(workdir, ckpt_path="last"):
        model = tiny_model()
        ema = EMA(decay=0.5)
        callbacks = [ModelCheckpoint(every_n_steps=2, async_checkpointing=False), ema]
        trainer = _trainer(_strategy(model), callbacks, workdir, max_steps=4, ckpt_path=ckpt_path)
        trainer.fit(_data(model, n=3))
        return trainer, ema

    straight, straight_ema = run(tmp_path / "a")
    resumed, resumed_ema = run(tmp_path / "b", ckpt_path=tmp_path / "a" / "checkpoints" / "2")
    assert resumed.restored_checkpoint == tmp_path / "a" / "checkpoints" / "2"
    a, b = _flat(straight_ema.average(straight)), _flat(resumed_ema.average(resumed))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))

    # A run without the EMA is told why the checkpoint does not fit, not that it is damaged.
    model = tiny_model()
    without = _trainer(_strategy(model), [])
    with pytest.raises(ValueError, match=r"device state of the callbacks \['EMA"):
        without.validate(_data(model), ckpt_path=tmp_path / "a" / "checkpoints" / "2")


def test_profiler_writes_a_tensorboard_trace_of_the_chosen_steps(tmp_path) -> None:
    model = tiny_model()
    profiler = Profiler(start_step=1, num_steps=1)
    trainer = _trainer(_strategy(model), [EMA(decay=0.5), profiler], tmp_path)
    trainer.fit(_data(model))
    traces = list((tmp_path / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert not profiler.tracing
    jax.profiler.start_trace(str(tmp_path / "again"))  # the trace was stopped
    jax.profiler.stop_trace()


def _leaf_count(flat: dict, keep=lambda path: True) -> int:
    return sum(int(np.prod(v.shape)) for k, v in flat.items() if keep(k))


def _summary_fit(strategy, summary: ModelSummary) -> Trainer:
    """A fit that builds the state and calls `on_fit_start`, but runs no step (none to compile)."""
    trainer = _trainer(strategy, [summary], max_steps=None, max_epochs=1, limit_train_batches=0)
    trainer.fit(_data(strategy.model, n=1))
    assert trainer.global_step == 0
    return trainer


def test_model_summary_counts_match_a_hand_count() -> None:
    printed = io.StringIO()
    summary = ModelSummary(max_depth=2, stream=printed)
    trainer = _summary_fit(_strategy(tiny_model()), summary)
    flat = _flat(trainer.state.params)
    rows = {row.name: row for row in summary.rows}
    total = rows["total"]
    assert total.total == _leaf_count(flat) == total.trainable + total.frozen
    assert total.trainable == _leaf_count(flat, _decoder_only) > 0
    assert total.bytes == 4 * total.total  # float32
    for name in {k[0] for k in flat}:
        row = rows[name]
        assert row.total == _leaf_count(flat, lambda k, n=name: k[0] == n)
        assert row.frozen == (0 if name == "decoder" else row.total)
    modules = {k[:2] for k in flat if len(k) > 2}
    assert {r.name for r in summary.rows} == {*(k[0] for k in flat), *map("/".join, modules)} | {
        "total"
    }
    for module in modules:
        assert rows["/".join(module)].total == _leaf_count(flat, lambda k, m=module: k[:2] == m)
    assert f"Total params: {total.total:,}" in printed.getvalue() == summary.table() + "\n"


def test_model_summary_of_lora_freezes_exactly_the_base_model() -> None:
    """Under LoRA the frozen count is the base model's whole count (a model without adapters)."""
    base = tiny_model()
    batch = _example(base, 0, k=1)[0]
    shapes = jax.eval_shape(lambda: base.init(jax.random.PRNGKey(0), batch)["params"])
    base_count = _leaf_count(traverse_util.flatten_dict(shapes))
    summary = ModelSummary(max_depth=0)
    strategy = LoRAStrategy(RolloutStrategy(tiny_model(use_lora=True), steps=1))
    trainer = _summary_fit(strategy, summary)
    (total,) = summary.rows
    assert total.frozen == base_count
    lora = _leaf_count(_flat(trainer.state.params), lambda k: k[-1] in ("lora_A", "lora_B"))
    assert total.trainable == lora > 0
    assert summarize(trainer.state.params, None, 0)[0].frozen == 0
