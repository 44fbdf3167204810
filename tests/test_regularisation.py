"""Drop-path and drop-out for training (microsoft-aurora's `drop_path` / `drop_rate`).

Inference (`apply` without rngs, `deterministic=True`) must be exactly what it was; training
(`deterministic=False` with a "dropout" key) drops residual branches per sample and elements in the
MLPs, the attention and the encoder; the Trainer passes a fresh key every step and none when it
validates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aurora.model.layers import drop_path_scale
from aurora.model.swin3d import Swin3DTransformerBackbone, Swin3DTransformerBlock
from tests.helpers import random_batch, tiny_model
from tests.test_trainer import OPTIM, _example
from trainers.data import InMemoryData
from trainers.state import TrainState
from trainers.strategies.base import Strategy, stack_targets
from trainers.trainer import Trainer


def _noisy(params, seed: int = 0, scale: float = 0.02):
    """`params` plus noise, so that zero-initialised AdaLN modulations (which make every Swin
    block an identity at initialisation) let the blocks act."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, noisy)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    batch = random_batch(model)
    params = _noisy(jax.jit(model.init)(jax.random.key(0), batch))
    return params, batch


@functools.cache
def _jitted(model, train: bool):
    """One compiled function per model and mode."""
    if not train:
        return jax.jit(model.apply)
    return jax.jit(lambda p, b, k: model.apply(p, b, rngs={"dropout": k}, deterministic=False))


def _apply(model, params, batch, key=None):
    if key is None:
        return _jitted(model, False)(params, batch)
    return _jitted(model, True)(params, batch, key)


def _fields(pred) -> dict[str, np.ndarray]:
    return {
        **{f"surf/{k}": np.asarray(v) for k, v in pred.surf_vars.items()},
        **{f"atmos/{k}": np.asarray(v) for k, v in pred.atmos_vars.items()},
    }


def _max_diff(a, b) -> float:
    fa, fb = _fields(a), _fields(b)
    return max(float(np.abs(fa[k] - fb[k]).max()) for k in fa)


def test_deterministic_rates_and_rate_zero_in_training_leave_the_output_unchanged(setup) -> None:
    """Rates only act in training: deterministic with rates > 0, and training with rates 0, give
    the plain model's output bit for bit."""
    params, batch = setup
    plain = _fields(_apply(tiny_model(), params, batch))
    regularised = tiny_model(drop_path=0.3, drop_rate=0.2)
    for pred in (
        _apply(regularised, params, batch),
        _apply(tiny_model(), params, batch, jax.random.key(1)),
    ):
        for name, value in _fields(pred).items():
            np.testing.assert_array_equal(value, plain[name], err_msg=name)


@pytest.mark.parametrize("rates", [{"drop_path": 0.3}, {"drop_rate": 0.2}])
def test_training_mode_draws_from_the_dropout_key(setup, rates) -> None:
    """Each rate on its own changes the output in training; the key decides how (same key, same
    output; another key, another output)."""
    params, batch = setup
    model = tiny_model(**rates)
    plain = _apply(model, params, batch)
    first = _apply(model, params, batch, jax.random.key(1))
    again = _apply(model, params, batch, jax.random.key(1))
    other = _apply(model, params, batch, jax.random.key(2))
    assert _max_diff(first, again) == 0.0
    assert _max_diff(first, other) > 1e-3
    assert _max_diff(first, plain) > 1e-3
    for value in _fields(first).values():
        assert np.all(np.isfinite(value))


def test_drop_path_scale_is_zero_or_the_inverse_keep_rate_with_mean_one() -> None:
    rate, n = 0.25, 20000
    scale = np.asarray(drop_path_scale(jax.random.key(0), rate, n))
    assert scale.shape == (n, 1, 1)
    assert set(np.unique(scale)) == {0.0, np.float32(1 / (1 - rate))}
    kept = np.mean(scale > 0)
    assert abs(kept - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    assert abs(scale.mean() - 1.0) < 0.02


@pytest.mark.parametrize("chunk", [0, 16])
def test_a_blocks_dropped_branch_is_dropped_per_sample_and_kept_ones_are_rescaled(chunk) -> None:
    """With the MLP branch silenced (its AdaLN modulation zero), a block is `x + s * a(x)` with
    `s` in {0, 1 / (1 - p)} per sample: every token of a sample agrees (also across the
    chunks of a rematerialised block), and the mean over samples is the deterministic block."""
    rate, batch, res = 0.3, 128, (2, 4, 8)
    dim = 16
    block = Swin3DTransformerBlock(dim, 2, (2, 2, 4), (1, 1, 2), drop_path=rate, chunk=chunk)
    x = jax.random.normal(jax.random.key(0), (1, 64, dim))
    c = jax.random.normal(jax.random.key(1), (1, dim))
    params = block.init(jax.random.key(2), x, c, res, 0)["params"]
    modulation = params["norm1"]["ln_modulation_1"]
    params["norm1"]["ln_modulation_1"] = {
        "kernel": jax.random.normal(jax.random.key(3), modulation["kernel"].shape),
        "bias": modulation["bias"],
    }
    xs, cs = jnp.broadcast_to(x, (batch, *x.shape[1:])), jnp.broadcast_to(c, (batch, dim))
    deterministic = jax.jit(block.apply, static_argnums=3)({"params": params}, x, c, res, 0)
    branch = np.asarray(deterministic - x)[0]
    assert np.abs(branch).max() > 1e-2

    train = jax.jit(block.clone(deterministic=False).apply, static_argnums=3)
    out = train({"params": params}, xs, cs, res, 0, rngs={"dropout": jax.random.key(4)})
    added = np.asarray(out - xs)
    scale = (added * branch).sum(axis=(1, 2)) / (branch**2).sum()  # each sample's factor
    np.testing.assert_allclose(added, scale[:, None, None] * branch, atol=1e-5)
    kept = scale > 0.5
    np.testing.assert_allclose(scale[kept], 1 / (1 - rate), rtol=1e-5)
    np.testing.assert_allclose(scale[~kept], 0.0, atol=1e-5)
    assert 0 < kept.sum() < batch
    np.testing.assert_allclose(added.mean(axis=0), branch, atol=0.3 * np.abs(branch).max())


def test_drop_path_rates_rise_linearly_over_each_half() -> None:
    backbone = Swin3DTransformerBackbone(
        encoder_depths=(2, 6, 2), decoder_depths=(2, 6, 2), drop_path_rate=0.18
    )
    rates = [r for i in range(3) for r in backbone.drop_path_rates((2, 6, 2), i)]
    np.testing.assert_allclose(rates, np.linspace(0, 0.18, 10), rtol=1e-6)


@pytest.mark.slow
def test_remat_training_runs_and_stays_deterministic_when_asked(setup) -> None:
    """The chunked, rematerialised blocks draw their own masks per chunk in training and are the
    plain model's in evaluation; gradients through them are finite."""
    params, batch = setup
    plain = _apply(tiny_model(drop_path=0.2, drop_rate=0.1), params, batch)
    model = tiny_model(drop_path=0.2, drop_rate=0.1, remat=True)
    assert _max_diff(_apply(model, params, batch), plain) < 1e-5
    assert _max_diff(_apply(model, params, batch, jax.random.key(1)), plain) > 1e-3

    def loss(p):
        pred = model.apply(p, batch, rngs={"dropout": jax.random.key(1)}, deterministic=False)
        return sum(jnp.mean(v**2) for v in pred.surf_vars.values())

    grads = jax.jit(jax.grad(loss))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_training_step_draws_a_key_per_step_and_evaluation_is_deterministic() -> None:
    """The strategy's training step uses a key of its step (same step, same loss; next step,
    another), its evaluation is the model without drop-out, bit for bit."""
    model = tiny_model(drop_path=0.1, drop_rate=0.1)
    inputs, targets = _example(model, 0, k=1)
    batch = (inputs, stack_targets(targets))
    params = _noisy(jax.jit(model.init)(jax.random.key(0), inputs)["params"])
    state = TrainState.create(params, optax.sgd(0.0), jax.random.key(1))
    evaluated = jax.jit(Strategy(model).eval_step)(state, batch, {})["loss"]
    plain = jax.jit(Strategy(tiny_model()).eval_step)(state, batch, {})["loss"]
    assert float(evaluated) == float(plain)

    train_loss = jax.jit(lambda s: Strategy(model).train_step(s, batch, {})[1]["loss"])
    at_step = lambda n: float(train_loss(state.replace(step=jnp.int32(n))))
    assert at_step(5) == at_step(5)
    assert at_step(5) != at_step(6)
    assert abs(at_step(5) - float(plain)) > 1e-4 * abs(float(plain))


@pytest.mark.slow
def test_trainer_fit_with_drop_path_runs_and_validates_deterministically() -> None:
    model = tiny_model(drop_path=0.1, drop_rate=0.1)
    data = InMemoryData([_example(model, 0, k=1)] * 2, shuffle=False)
    trainer = Trainer(Strategy(model), optimizer=OPTIM, max_steps=2, log_every_n_steps=1)
    trainer.fit(data, data)
    assert int(trainer.state.step) == 2
    assert np.isfinite(trainer.callback_metrics["train/loss"])
    validated = trainer.validate(data)["val/loss"]
    assert trainer.validate(data)["val/loss"] == validated
