"""A stochastic model (`stochastic=True`, e.g. AuroraV1p5Ensemble) through the whole Trainer.

Every model call of a stochastic Aurora draws backbone noise from the "noise" rng stream. In
training the key is the step's (`fold_in(state.rng, state.step)`, shared with drop-out), so two
seeds train differently and one seed repeats exactly; validation and test losses draw from the
trainer's seed, so they are reproducible; `Trainer.predict` makes members with the ensemble
forecasts' member keys.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aurora.rollout import ModelStep, rollout
from callbacks.base import Callback
from tests.helpers import tiny_model
from tests.test_ensemble_eval import hres, stochastic  # noqa: F401 (fixtures)
from tests.test_trainer import OPTIM, _example
from trainers.data import InMemoryData
from trainers.evaluation.forecasts import member_key
from trainers.state import TrainState
from trainers.strategies.base import Strategy, stack_targets
from trainers.trainer import Trainer


def _live_noise(params: Any) -> Any:
    """`params` with every all-zero leaf (the AdaLN and noise modulations, as initialised in
    microsoft-aurora) given random weights, so that the noise reaches the output; large enough
    that the loss (dominated by the random targets) moves by many float32 steps with the noise."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [
        x if np.any(np.asarray(x)) else 0.3 * jax.random.normal(k, x.shape, x.dtype)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


ONE_STAGE = {
    "encoder_depths": (1,),
    "encoder_num_heads": (2,),
    "decoder_depths": (1,),
    "decoder_num_heads": (2,),
}
"""A one-stage Swin: the same code paths, less compile time."""


@pytest.fixture(scope="module")
def setup() -> tuple[Any, Any, InMemoryData]:
    model = tiny_model(stochastic=True, **ONE_STAGE)
    examples = [_example(model, seed, k=2) for seed in range(2)]
    params = jax.jit(model.init)(jax.random.key(0), examples[0][0])["params"]
    return model, _live_noise(params), InMemoryData(examples, shuffle=False)


class _Losses(Callback):
    """Records every training step's and validation batch's loss."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.val_losses: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, batch: Any, i: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_validation_batch_end(self, trainer: Trainer, outputs: Any, batch: Any, i: int) -> None:
        self.val_losses.append(float(outputs["loss"]))


def _trainer(model: Any, params: Any, seed: int, **kwargs: Any) -> Trainer:
    """A trainer of `model` from `params` (copied: training donates the state's buffers)."""
    return Trainer(
        Strategy(model),
        optimizer=OPTIM,
        seed=seed,
        init_params=jax.tree.map(jnp.copy, params),
        ckpt_path=None,
        log_every_n_steps=1,
        **kwargs,
    )


def test_fit_draws_its_noise_from_the_seed(setup: tuple) -> None:
    """The same parameters, so only the noise (from the seed) tells the runs apart."""
    model, params, data = setup

    def fit(seed: int) -> list[float]:
        losses = _Losses()
        _trainer(model, params, seed, max_steps=2, callbacks=[losses]).fit(data)
        return losses.losses

    first, again, other = fit(0), fit(0), fit(1)
    assert len(first) == 2 and np.all(np.isfinite(first))
    assert first == again
    assert first[0] != other[0]  # the same parameters: only the noise differs


def test_each_training_step_and_rollout_step_draws_new_noise(setup: tuple) -> None:
    """The training copy's model call with the step's key: the same step repeats, the next step
    and the next rollout step (same input otherwise) draw other noise."""
    model, params, data = setup
    inputs = data.examples[0][0]
    state = TrainState.create(params, optax.sgd(0.0), jax.random.key(1))
    strategy = Strategy(model)

    @jax.jit
    def predict(step: jax.Array, rollout_step: jax.Array) -> jax.Array:
        training = strategy.in_training(state.replace(step=step))
        meta = inputs.metadata.replace(rollout_step=rollout_step)
        return training.apply_model(params, inputs.replace(metadata=meta)).atmos_vars["t"]

    five = predict(jnp.int32(5), jnp.int32(0))
    np.testing.assert_array_equal(five, predict(jnp.int32(5), jnp.int32(0)))
    assert not np.array_equal(five, predict(jnp.int32(6), jnp.int32(0)))
    assert not np.array_equal(five, predict(jnp.int32(5), jnp.int32(1)))


def test_validation_and_test_losses_are_reproducible(setup: tuple) -> None:
    model, params, data = setup
    trainer = _trainer(model, params, 0, max_steps=1)
    validated = trainer.validate(data)["val/loss"]
    assert np.isfinite(validated)
    assert trainer.validate(data)["val/loss"] == validated
    assert trainer.test(data)["test/loss"] == validated  # the same key rule in both loops

    # A new run (or a resumed one) with the seed meets the same noise; another seed, other noise.
    def batch_losses(seed: int) -> list[float]:
        losses = _Losses()
        _trainer(model, params, seed, max_steps=1, callbacks=[losses]).validate(data)
        return losses.val_losses

    same, other = batch_losses(0), batch_losses(1)
    assert np.mean(same) == pytest.approx(validated, rel=1e-6)
    assert same[0] != other[0] and same[1] != other[1]
    # Without a key (the strategy's own eval step) a stochastic model refuses to run.
    state = TrainState.create(params, optax.sgd(0.0), jax.random.key(1))
    inputs, targets = data.examples[0]
    with pytest.raises(ValueError, match="needs a noise key"):
        Strategy(model).eval_step(state, (inputs, stack_targets(targets)), {})


def test_predict_makes_members_with_the_forecast_member_keys(setup: tuple) -> None:
    model, params, data = setup
    trainer = _trainer(model, params, 3, max_steps=1, limit_predict_batches=1)
    (members,) = trainer.predict(data, steps=2, members=2)
    assert len(members) == 2 and all(len(m) == 2 for m in members)
    t = lambda pred: np.asarray(pred.atmos_vars["t"])
    assert not np.array_equal(t(members[0][1]), t(members[1][1]))
    # The member keys of --mode=predict: the seed, the member and the batch's first init.
    inputs = data.examples[0][0]
    init = int(np.ravel(inputs.metadata.time)[0]) * 60
    for m, member in enumerate(members):
        key = member_key(3, m, init)
        want = list(rollout(ModelStep(model), params, inputs, 2, rng=key))
        for got, expected in zip(member, want, strict=True):
            np.testing.assert_array_equal(t(got), t(expected))
    (single,) = trainer.predict(data, steps=2)  # one member: a list of steps, member 0's
    np.testing.assert_array_equal(t(single[1]), t(members[0][1]))
    deterministic = Trainer(Strategy(tiny_model()), optimizer=OPTIM, max_steps=1)
    with pytest.raises(ValueError, match="members > 1 needs a stochastic model"):
        next(iter(deterministic.predict(data, members=2)))


@pytest.mark.slow  # CI time: its own model and sample
def test_forecast_scores_of_a_stochastic_model_come_from_the_trainers_seed(
    request: pytest.FixtureRequest,
) -> None:
    """The `ForecastScores` callback's rollouts after each validation: member 0's keys of the
    trainer's seed (`Trainer.seed`), so the logged RMSE repeats with the seed. The model, its
    live-noise parameters and the 10° sample are test_ensemble_eval's fixtures."""
    from callbacks.forecast_scores import ForecastScores

    step, params = request.getfixturevalue("stochastic")
    callback = ForecastScores(lead_hours=(6,), variables=[("z", 500)], max_inits=1)
    callback.attach_source(request.getfixturevalue("hres"))
    rmse = lambda seed: callback.scores(step.model, params, seed=seed)["forecast/rmse/z500/6h"]
    first = rmse(0)
    assert np.isfinite(first) and rmse(0) == first and rmse(1) != first


@pytest.mark.slow
def test_test_mode_with_members_reports_crps_spread_and_skill(tmp_path: Path) -> None:
    """`--mode=test` with `config.eval.members=2` (what main.py runs) for the demo's model made
    stochastic, after a short fit (which moves the zero-initialised modulations, so the noise
    reaches the output): the test loss and WB2's ensemble scores."""
    from configs import demo
    from trainers.run import run

    config = demo.get_config()
    config.model.kwargs.stochastic = True
    config.trainer.max_steps = 2
    config.trainer.log_every_n_steps = 1
    config.eval.members, config.eval.steps, config.eval.figures = 2, 1, False
    run(config, tmp_path, "fit")
    first = run(config, tmp_path, "test")
    assert first["global_step"] == 2 and np.isfinite(first["metrics"]["test/loss"])
    assert run(config, tmp_path, "test")["metrics"] == first["metrics"]
    evaluation = first["evaluation"]
    assert evaluation["members"] == 2
    with open(evaluation["scores"]) as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == "aurora"]
    assert rows
    for row in rows:
        assert float(row["crps"]) > 0 and float(row["spread"]) > 0 and float(row["skill"]) > 0
