"""Trainer, loss and RolloutStrategy: gradients, the guarded update, exact resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from aurora.rollout import advance_batch
from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint
from callbacks.grad_stop import GradStop
from tests.helpers import random_batch, tiny_model
from trainers.checkpointing import load_params
from trainers.data import InMemoryData
from trainers.loss import LossConfig, aurora_loss
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer, _to_device_batch

OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 2, "schedule": "constant", "weight_decay": 0.01}
)


def _example(model, seed: int, k: int = 2):
    """An (inputs, targets) pair: history 2 and k one-step targets, 6 h apart."""
    series = random_batch(model, history=2 + k, seed=seed)
    inputs = series.replace(
        surf_vars={n: v[:, :2] for n, v in series.surf_vars.items()},
        atmos_vars={n: v[:, :2] for n, v in series.atmos_vars.items()},
    )
    targets = []
    for i in range(k):
        t = series.replace(
            surf_vars={n: v[:, 2 + i : 3 + i] for n, v in series.surf_vars.items()},
            atmos_vars={n: v[:, 2 + i : 3 + i] for n, v in series.atmos_vars.items()},
        )
        targets.append(
            t.replace(metadata=t.metadata.replace(time=np.asarray(t.metadata.time) + 360 * (i + 1)))
        )
    return inputs, targets


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    example = _example(model, 0)
    params = model.init(jax.random.PRNGKey(0), example[0])["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    return model, example, params


def test_loss_matches_independent_numpy(setup) -> None:
    model, (inputs, targets), params = setup
    pred = model.apply({"params": params}, inputs)
    target = targets[0]
    config = LossConfig(atmos_weights={"z": {500: 2.0}, "t": 1.7}, alpha=0.25, beta=1.0, gamma=2.0)
    loss, _ = aurora_loss(pred, target, config)

    from aurora.normalisation import atmos_location_scale, surf_location_scale

    surf_terms = []
    for name in pred.surf_vars:
        loc, scale = surf_location_scale(name)
        p = (np.asarray(pred.surf_vars[name], np.float64) - loc) / scale
        t = (np.asarray(target.surf_vars[name], np.float64) - loc) / scale
        surf_terms.append(config.surf_weights.get(name, 1.0) * np.abs(p - t).mean())
    atmos_terms = []
    levels = pred.metadata.atmos_levels
    for name in pred.atmos_vars:
        loc, scale = atmos_location_scale(name, levels)
        p = (np.asarray(pred.atmos_vars[name], np.float64) - loc) / scale
        t = (np.asarray(target.atmos_vars[name], np.float64) - loc) / scale
        weights = np.array(
            [
                2.0
                if (name == "z" and lv == 500)
                else (
                    1.7
                    if name == "t"
                    else (1.0 if name == "z" else config.atmos_weights.get(name, 1.0))
                )
                for lv in levels
            ]
        )
        per_level = np.abs(p - t).mean(axis=(0, 1, 3, 4))
        atmos_terms.append((weights * per_level).mean())
    expected = 2.0 / 9 * (0.25 * sum(surf_terms) + 1.0 * sum(atmos_terms))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def _manual_two_step_loss(model, params, inputs, targets, detach_second_input: bool):
    config = LossConfig()
    pred1 = model.apply({"params": params}, inputs)
    l1, _ = aurora_loss(pred1, targets[0], config)
    nxt = advance_batch(inputs, pred1)
    if detach_second_input:
        nxt = nxt.replace(
            surf_vars=jax.lax.stop_gradient(nxt.surf_vars),
            atmos_vars=jax.lax.stop_gradient(nxt.atmos_vars),
        )
    pred2 = model.apply({"params": params}, nxt)
    l2, _ = aurora_loss(pred2, targets[1], config)
    return (l1 + l2) / 2


@pytest.mark.parametrize(
    ("backprop", "curriculum"),
    [
        pytest.param("all", False, id="all-static", marks=pytest.mark.slow),  # CI time
        pytest.param("all", True, id="all-traced"),
        pytest.param("pushforward", False, id="pushforward-static", marks=pytest.mark.slow),
        pytest.param("pushforward", True, id="pushforward-traced"),
    ],
)
def test_two_step_rollout_gradient_equals_explicit_calls(setup, backprop, curriculum) -> None:
    model, example, params = setup
    inputs, targets = _to_device_batch(example)
    strategy = RolloutStrategy(model, steps=2, backprop=backprop, curriculum=curriculum)
    grad = jax.grad(lambda p: strategy.loss_fn(p, inputs, targets, strategy.default_controls())[0])(
        params
    )
    manual = jax.grad(
        lambda p: _manual_two_step_loss(model, p, inputs, example[1], backprop == "pushforward")
    )(params)
    for a, b in zip(jax.tree_util.tree_leaves(grad), jax.tree_util.tree_leaves(manual)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)


@pytest.mark.slow  # CI time
def test_stop_gradient_removes_earlier_step_gradients(setup) -> None:
    """Last-step loss only: with window 1 the gradient is that of one call on a detached input."""
    model, example, params = setup
    inputs, targets = _to_device_batch(example)
    full = RolloutStrategy(model, steps=2, backprop="all", average_loss=False)
    push = RolloutStrategy(
        model, steps=2, backprop="pushforward", average_loss=False
    )  # gradient-free first step
    g_full = jax.grad(lambda p: full.loss_fn(p, inputs, targets, full.default_controls())[0])(
        params
    )
    g_push = jax.grad(lambda p: push.loss_fn(p, inputs, targets, push.default_controls())[0])(
        params
    )
    pred1 = model.apply({"params": params}, inputs)
    detached = jax.lax.stop_gradient(advance_batch(inputs, pred1))
    g_one = jax.grad(
        lambda p: aurora_loss(model.apply({"params": p}, detached), example[1][1], LossConfig())[0]
    )(params)
    for a, b in zip(jax.tree_util.tree_leaves(g_push), jax.tree_util.tree_leaves(g_one)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-7)
    diff = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_push))
    )
    assert diff > 1e-6, "backprop through both steps must differ from the detached gradient"


def test_warm_up_starts_above_zero_and_reaches_the_peak() -> None:
    from trainers.optim import make_schedule

    config = ml_collections.ConfigDict(
        {"learning_rate": 1e-3, "warmup_steps": 4, "schedule": "cosine", "min_lr_ratio": 0.1}
    )
    schedule = make_schedule(config, 14)
    lrs = [float(schedule(k)) for k in range(15)]
    np.testing.assert_allclose(lrs[:5], [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rtol=1e-6)
    assert lrs[14] == pytest.approx(1e-4) and np.all(np.diff(lrs[3:]) <= 0)


def test_a_model_time_step_other_than_the_datas_is_refused_at_start(tmp_path) -> None:
    from datetime import timedelta

    model = tiny_model(timestep=timedelta(hours=12))  # as Aurora12hPretrained; data 6-hourly
    trainer = _trainer(model, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"model steps 12 h .* 6 h after .*step_hours=12"):
        trainer.fit(_data(tiny_model(), n=1))
    assert trainer.state is None and trainer.global_step == 0


def _trainer(model, workdir, *, max_steps, callbacks=(), curriculum=False, **kwargs):
    strategy = RolloutStrategy(model, steps=2, backprop="all", curriculum=curriculum)
    return Trainer(
        strategy,
        optimizer=OPTIM,
        callbacks=list(callbacks),
        workdir=workdir,
        max_steps=max_steps,
        log_every_n_steps=1,
        **kwargs,
    )


def _data(model, n=4):
    return InMemoryData([_example(model, seed) for seed in range(n)], seed=3)


def test_fit_reduces_the_loss_below_the_untrained_models_and_validates(tmp_path) -> None:
    """Validation at every `val_check_interval` steps; the trained model scores well below the
    untrained one (the same initial state) on the same data."""
    model = tiny_model()
    data = InMemoryData([_example(model, 0)] * 2, shuffle=False)
    validated: list[tuple[int, float]] = []

    class Seen(Callback):
        def on_validation_end(self, trainer):
            validated.append((trainer.global_step, trainer.callback_metrics["val/loss"]))

    optim = ml_collections.ConfigDict({"learning_rate": 5e-3, "schedule": "constant"})
    trainer = Trainer(
        RolloutStrategy(model, steps=2),
        optimizer=optim,
        callbacks=[Seen()],
        max_steps=12,
        val_check_interval=6,
        log_every_n_steps=1,
    )
    untrained = trainer.validate(data)["val/loss"]  # the initial state fit starts from
    validated.clear()
    trainer.fit(data, data)
    assert trainer.global_step == 12 and int(trainer.state.step) == 12
    assert [step for step, _ in validated] == [6, 12]
    trained = trainer.validate(data)["val/loss"]
    assert trained == pytest.approx(validated[-1][1], rel=1e-6)
    assert trained < validated[0][1] < untrained
    assert trained < 0.9 * untrained  # random targets: about 0.85 after 12 steps
    assert trainer.callback_metrics["train/loss"] < untrained


def test_rmse_example_callback_logs_the_rmse_of_the_updated_model(tmp_path) -> None:
    """examples/rmse_callback.py: every N steps, the z500 RMSE of the just-updated parameters'
    one-step prediction against the first target, computed here in float64 numpy."""
    from callbacks.writers import NoopWriter
    from examples.rmse_callback import RmseCallback

    logged: dict[int, dict[str, float]] = {}
    params: dict[int, object] = {}

    class Writer(NoopWriter):
        def write_scalars(self, step, scalars):
            logged.setdefault(step, {}).update(scalars)

    class Params(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            params[trainer.global_step] = (jax.device_get(trainer.state.params), batch)

    model = tiny_model()
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=4,
        callbacks=[RmseCallback("z", 500, every_n_steps=2), Params()],
        writers=[Writer()],
    )
    trainer.fit(_data(model, n=2))
    assert [s for s in sorted(logged) if "train/rmse_z500" in logged[s]] == [2, 4]
    for step in (2, 4):
        state_params, (inputs, targets) = params[step]
        pred = model.apply({"params": state_params}, _to_device_batch((inputs, targets))[0])
        level = list(inputs.metadata.atmos_levels).index(500)
        got = np.asarray(pred.atmos_vars["z"], np.float64)[:, 0, level]
        want = np.asarray(targets[0].atmos_vars["z"], np.float64)[:, 0, level, : got.shape[-2]]
        rmse = np.sqrt(np.mean((got - want) ** 2))
        assert logged[step]["train/rmse_z500"] == pytest.approx(rmse, rel=1e-4)
    assert trainer.callback_metrics["train/rmse_z500"] == logged[4]["train/rmse_z500"]


def test_steady_state_steps_do_not_wait_for_the_device(tmp_path, monkeypatch) -> None:
    """With log_every_n_steps=3, only the logged steps (GradStop's flags, at 3 and 6) and the
    steps after them (the logged metrics, a step late, at 4 and 7) read arrays from the device;
    steps 1, 2 and 5 read none, with GradStop, ProgressBar and LearningRateMonitor on. The rows
    are written at their own steps."""
    import io

    from jax._src.array import ArrayImpl

    from callbacks.lr_monitor import LearningRateMonitor
    from callbacks.progress import ProgressBar
    from callbacks.writers import NoopWriter

    reads: dict[int, int] = {}
    window: list[int] = []  # the step being run, between its start and end hooks
    value = ArrayImpl._value

    def counted(self):  # every device -> host read (float(x), np.asarray(x), jax.device_get(x))
        if window:
            reads[window[0]] = reads.get(window[0], 0) + 1
        return value.fget(self)

    monkeypatch.setattr(ArrayImpl, "_value", property(counted))
    rows: dict[int, set[str]] = {}

    class Writer(NoopWriter):
        def write_scalars(self, step, scalars):
            rows.setdefault(step, set()).update(scalars)

    class Window(Callback):  # last: its window spans the step and every other callback's end hook
        def on_train_batch_start(self, trainer, batch, batch_idx):
            window[:] = [trainer.global_step + 1]

        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            window.clear()

    model = tiny_model()
    stream = io.StringIO()
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=7,
        callbacks=[GradStop(), ProgressBar(stream=stream), LearningRateMonitor(), Window()],
        writers=[Writer()],
    )
    trainer.log_every_n_steps = 3
    trainer.fit(_data(model, n=2))
    assert trainer.global_step == 7
    assert set(reads) == {3, 4, 6, 7}, reads
    assert {s for s, tags in rows.items() if "train/loss" in tags} == {3, 6}
    assert "lr" in rows[3] and "lr" in rows[6]
    lines = stream.getvalue().splitlines()
    assert "step 3/7" in lines[0] and "step 7/7" in lines[-1] and "(step 6)" in lines[-1]


class _Crash(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash between checkpoints")


def test_resume_after_a_crash_is_bit_identical(tmp_path) -> None:
    model = tiny_model()
    data = _data(model, n=3)  # 3 batches per epoch: the run crosses epochs

    straight = _trainer(
        model, tmp_path / "a", max_steps=8, callbacks=[ModelCheckpoint(every_n_steps=3)]
    )
    straight.fit(data)

    crashed = _trainer(
        model, tmp_path / "b", max_steps=8, callbacks=[ModelCheckpoint(every_n_steps=3), _Crash(5)]
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(data)
    resumed = _trainer(
        model, tmp_path / "b", max_steps=8, callbacks=[ModelCheckpoint(every_n_steps=3)]
    )
    resumed.fit(data)
    assert resumed.global_step == 8

    for a, b in zip(
        jax.tree_util.tree_leaves(straight.state), jax.tree_util.tree_leaves(resumed.state)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_gradients_skip_the_update_or_stop(tmp_path) -> None:
    model = tiny_model()
    good = _example(model, 0)
    bad_inputs = good[0].replace(
        surf_vars={**good[0].surf_vars, "2t": np.full_like(good[0].surf_vars["2t"], np.nan)}
    )
    data = InMemoryData([(bad_inputs, good[1])], shuffle=False)

    guard = GradStop(on_nonfinite="skip")
    trainer = _trainer(model, tmp_path, max_steps=2, callbacks=[guard])
    trainer.fit(InMemoryData([good], shuffle=False))
    before = jax.tree_util.tree_map(np.asarray, trainer.state.params)
    trainer.max_steps = 3
    trainer.fit(data)
    after = trainer.state.params
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert guard.skipped == 1 and "input 2t" in guard.events[0]["culprits"]

    stopper = GradStop(on_nonfinite="stop")
    trainer = _trainer(model, tmp_path / "stop", max_steps=5, callbacks=[stopper])
    trainer.fit(InMemoryData([(bad_inputs, good[1])] * 3, shuffle=False))
    assert trainer.global_step == 1 and trainer.should_stop


def test_grad_window_schedule_changes_without_recompiling(tmp_path) -> None:
    model = tiny_model()
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            seen.append(int(trainer.controls["grad_window"]))

    trainer = _trainer(
        model,
        tmp_path,
        max_steps=4,
        callbacks=[GradStop(schedule=[(0, 1), (2, 2)]), Record()],
        curriculum=True,
    )
    trainer.fit(_data(model, n=2))
    assert seen == [1, 1, 2, 2]
    assert trainer._compiled["train"]._cache_size() == 1


def test_fast_dev_run_runs_one_batch_and_writes_nothing(tmp_path) -> None:
    model = tiny_model()
    data = _data(model, n=2)
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=None,
        fast_dev_run=True,
        callbacks=[ModelCheckpoint(every_n_steps=1)],
    )
    trainer.fit(data, data)
    assert trainer.global_step == 1
    assert "val/loss" in trainer.callback_metrics
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.slow  # CI time: heavy, and its neighbours cover the same code in CI
def test_accumulated_gradients_equal_one_step_on_the_mean(tmp_path) -> None:
    """Two micro-batches with accumulate_grad_batches=2 == one optimiser step on the mean
    gradient."""
    model = tiny_model()
    a, b = _example(model, 1), _example(model, 2)
    optim = ml_collections.ConfigDict(
        {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"}
    )
    strategy = RolloutStrategy(model, steps=2, backprop="all")
    accumulated = Trainer(
        strategy, optimizer=optim, workdir=tmp_path, max_steps=1, accumulate_grad_batches=2
    )
    accumulated.fit(InMemoryData([a, b], shuffle=False))
    assert accumulated.global_step == 1

    from trainers.optim import make_optimizer

    tx, _ = make_optimizer(optim, 1)
    state = strategy.init_state(jax.random.PRNGKey(0), _to_device_batch(a)[0], tx)
    grads = [
        jax.grad(
            lambda p, ex=ex: strategy.loss_fn(
                p, *_to_device_batch(ex), strategy.default_controls()
            )[0]
        )(state.params)
        for ex in (a, b)
    ]
    mean = jax.tree_util.tree_map(lambda x, y: (x + y) / 2, *grads)
    expected, _ = state.apply_gradients(mean)
    moved = 0.0
    for x, y, x0 in zip(
        jax.tree_util.tree_leaves(expected.params),
        jax.tree_util.tree_leaves(accumulated.state.params),
        jax.tree_util.tree_leaves(state.params),
    ):
        # Adam's first update is ~lr * sign(g): where g is ~0, float rounding of the two ways of
        # averaging flips a few elements by ~1e-6 (lr = 1e-2), so compare against the step size.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
        moved = max(moved, float(np.abs(np.asarray(y) - np.asarray(x0)).max()))
    assert moved > 1e-4, "the accumulated step must actually update the parameters"


def test_on_exception_checkpoint_saves_the_last_good_state(tmp_path) -> None:
    from callbacks.checkpoint import OnExceptionCheckpoint

    model = tiny_model()
    data = _data(model, n=3)
    crashed = _trainer(
        model,
        tmp_path,
        max_steps=8,
        callbacks=[ModelCheckpoint(every_n_steps=100), OnExceptionCheckpoint(), _Crash(2)],
    )
    with pytest.raises(RuntimeError):
        crashed.fit(data)
    assert (tmp_path / "checkpoints" / "2").exists(), "the state at the crash was saved"
    resumed = _trainer(model, tmp_path, max_steps=3, callbacks=[ModelCheckpoint(every_n_steps=100)])
    resumed.fit(data)
    assert resumed.global_step == 3


def test_in_step_measurements_requested_by_callbacks(tmp_path) -> None:
    """The norms callbacks ask for are computed in the step; under warm-up (OPTIM: 2 steps) the
    first step already moves the weights."""
    seen: dict[int, dict[str, float]] = {}

    class Norms(Callback):
        measurements = ("grad_norm", "update_norm", "param_norm")

        def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
            seen[trainer.global_step] = {k: float(outputs[k]) for k in self.measurements}

    model = tiny_model()
    trainer = _trainer(model, tmp_path, max_steps=3, callbacks=[Norms()])
    trainer.fit(_data(model, n=2))
    assert sorted(seen) == [1, 2, 3]
    assert all(v > 0 for norms in seen.values() for v in norms.values()), seen
    with pytest.raises(ValueError, match="Unknown in-step measurements"):

        class Bad(Callback):
            measurements = ("hessian",)

        _trainer(model, tmp_path, max_steps=1, callbacks=[Bad()])


def test_best_checkpoints_are_ranked_by_their_own_steps_validation(tmp_path) -> None:
    """best/N holds step N ranked by step N's val/loss, although validation runs after the step's
    scheduled save; save_top_k keeps the lowest; the latest stay apart for resume."""

    class Seen(Callback):
        def __init__(self):
            self.val: dict[int, float] = {}

        def on_validation_end(self, trainer):
            self.val[trainer.global_step] = trainer.callback_metrics["val/loss"]

    model = tiny_model()
    data = _data(model, n=3)
    checkpoint = ModelCheckpoint(every_n_steps=2, max_to_keep=2, monitor="val/loss", save_top_k=2)
    seen = Seen()
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=8,
        val_check_interval=2,
        limit_val_batches=1,
        callbacks=[checkpoint, seen],
    )
    trainer.fit(data, data)
    assert sorted(seen.val) == [2, 4, 6, 8]
    best = checkpoint.best_manager
    assert sorted(best.all_steps()) == sorted(sorted(seen.val, key=seen.val.get)[:2])
    for step in best.all_steps():
        assert best.metrics(step)["val/loss"] == pytest.approx(seen.val[step], rel=1e-6)
    assert sorted(checkpoint.manager.all_steps()) == [6, 8]

    # ckpt_path: "best", "last" or one checkpoint's path, into a new trainer on the same directory.
    fresh = _trainer(
        model,
        tmp_path,
        max_steps=8,
        limit_val_batches=1,
        callbacks=[ModelCheckpoint(monitor="val/loss")],
    )
    best_step = min(seen.val, key=seen.val.get)
    for ckpt_path, step in [("best", best_step), (tmp_path / "checkpoints" / "6", 6), ("last", 8)]:
        val = fresh.validate(data, ckpt_path=ckpt_path)["val/loss"]
        assert fresh.global_step == step and val == pytest.approx(seen.val[step], rel=1e-5)
    # init: the parameters of a full training checkpoint
    params = load_params(tmp_path / "checkpoints" / "best" / str(best_step))
    fresh.validate(data, ckpt_path="best")
    for a, b in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(fresh.state.params)
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="needs a ModelCheckpoint callback with a monitor"):
        _trainer(model, tmp_path, max_steps=1, callbacks=[ModelCheckpoint()]).validate(
            data, ckpt_path="best"
        )


@pytest.mark.parametrize(
    "remat, blocks, stages, steps",
    [
        ("none", False, False, False),
        ("backbone", True, False, False),
        ("stages", True, True, False),
        ("all", True, True, True),
    ],
)
def test_remat_policies_set_the_model_and_the_rollout(
    tmp_path, remat, blocks, stages, steps
) -> None:
    def trainer(policy: str) -> Trainer:
        strategy = RolloutStrategy(tiny_model(), steps=2, remat=False)
        return Trainer(strategy, optimizer=OPTIM, workdir=tmp_path, max_steps=1, remat=policy)

    model = trainer(remat).strategy.model
    assert (model.remat, model.remat_stages, trainer(remat).strategy.remat) == (
        blocks,
        stages,
        steps,
    )
    with pytest.raises(ValueError, match="remat must be one of"):
        trainer("blocks")


def test_hooks_by_stage_and_writers_rewound_to_the_restored_step(tmp_path) -> None:
    """fit / validate / predict call Lightning's hooks in Lightning's order (predict's epoch hooks
    included); at fit start the trainer tells each writer the step it resumes from (-1: none)."""
    from callbacks.writers import NoopWriter

    class Recorder(Callback):
        def __init__(self):
            self.calls: list[str] = []

    hooks = [n for n in vars(Callback) if n.startswith("on_") or n in ("setup", "teardown")]
    for name in hooks:
        setattr(Recorder, name, lambda self, trainer, *args, _name=name: self.calls.append(_name))

    class Rewound(NoopWriter):
        def __init__(self):
            self.steps: list[int] = []

        def rewind(self, step: int) -> None:
            self.steps.append(step)

    model = tiny_model()
    data = _data(model, n=2)
    recorder, writer = Recorder(), Rewound()
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=1,
        callbacks=[ModelCheckpoint(every_n_steps=1), recorder],
        writers=[writer],
        limit_val_batches=1,
    )
    trainer.fit(data)
    assert writer.steps == [-1]
    assert recorder.calls[:2] == ["setup", "on_fit_start"] and recorder.calls[-1] == "teardown"
    assert "on_load_checkpoint" not in recorder.calls and "on_save_checkpoint" in recorder.calls
    recorder.calls.clear()
    trainer.validate(data)
    assert recorder.calls == [
        "setup",
        "on_validation_start",
        "on_validation_epoch_start",
        "on_validation_batch_start",
        "on_validation_batch_end",
        "on_validation_epoch_end",
        "on_validation_end",
        "teardown",
    ]
    recorder.calls.clear()
    for _ in trainer.predict(InMemoryData([_example(model, 0)], shuffle=False)):
        pass
    assert recorder.calls == [
        "setup",
        "on_predict_start",
        "on_predict_epoch_start",
        "on_predict_batch_start",
        "on_predict_batch_end",
        "on_predict_epoch_end",
        "on_predict_end",
        "teardown",
    ]

    resumed_writer, resumed_recorder = Rewound(), Recorder()
    resumed = _trainer(
        model,
        tmp_path,
        max_steps=2,
        callbacks=[ModelCheckpoint(every_n_steps=1), resumed_recorder],
        writers=[resumed_writer],
    )
    resumed.fit(data)
    assert resumed_writer.steps == [1] and resumed.global_step == 2
    assert resumed_recorder.calls[:3] == ["setup", "on_load_checkpoint", "on_fit_start"]
    assert "on_save_checkpoint" in resumed_recorder.calls
