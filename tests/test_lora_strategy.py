"""LoRA training: only adapters train, no optimiser state for the frozen base, exact merge, export.

Also: `trainable` is a property of any strategy (a path predicate through the real Trainer), and
the Trainer trains a configured copy of its strategy, leaving the one it was given unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import aurora
from tests.helpers import random_batch, tiny_model
from trainers.data import InMemoryData
from trainers.strategies.base import Strategy
from trainers.strategies.lora import (
    LoRAStrategy,
    adapter_index,
    export_merged,
    is_lora_path,
    lora_counts,
    merge_adapters,
    merged_model,
    parameter_counts,
)
from trainers.strategies.rollout import RolloutStrategy
from trainers.strategies.trainable import Trainable
from trainers.trainer import Trainer

LORA_LR, BASE_LR = 1e-2, 1e-4
OPTIM = ml_collections.ConfigDict(
    {
        "learning_rate": 1e-3,
        "lora_learning_rate": LORA_LR,
        "warmup_steps": 0,
        "schedule": "constant",
        "weight_decay": 0.0,
    }
)


def _example(model: aurora.Aurora, seed: int, k: int = 2):
    """(inputs with history 2, k one-step targets 6 h apart), as in tests/test_trainer.py."""
    series = random_batch(model, history=2 + k, seed=seed)
    window = lambda lo, hi: series.replace(
        surf_vars={n: v[:, lo:hi] for n, v in series.surf_vars.items()},
        atmos_vars={n: v[:, lo:hi] for n, v in series.atmos_vars.items()},
    )
    targets = []
    for i in range(k):
        t = window(2 + i, 3 + i)
        targets.append(
            t.replace(metadata=t.metadata.replace(time=np.asarray(t.metadata.time) + 360 * (i + 1)))
        )
    return window(0, 2), targets


def _flat(params) -> dict[tuple[str, ...], np.ndarray]:
    return {
        k: np.array(v) for k, v in traverse_util.flatten_dict(dict(jax.device_get(params))).items()
    }


def _float_elements(tree) -> int:
    return sum(
        int(x.size)
        for x in jax.tree_util.tree_leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.floating)
    )


def _fit(strategy: Strategy, params, steps: int, tmp_path, **trainer_kwargs) -> Trainer:
    """Train `steps` optimiser steps from `params` (host copies: the trainer donates its state)."""
    model = strategy.model
    trainer = Trainer(
        strategy,
        optimizer=OPTIM,
        workdir=tmp_path,
        max_steps=steps,
        log_every_n_steps=1,
        init_params=jax.tree_util.tree_map(np.array, params),
        **trainer_kwargs,
    )
    trainer.fit(InMemoryData([_example(model, seed) for seed in range(2)], seed=3))
    return trainer


@pytest.fixture(scope="module")
def lora_model() -> aurora.Aurora:
    return tiny_model(use_lora=True, lora_mode="single", lora_steps=40)


def _perturbed(model: aurora.Aurora, inputs, *, adapters: bool, seed: int = 1):
    """Initial parameters plus noise, standing in for pretrained weights.

    A fresh Aurora's AdaLN modulation is zero (as in microsoft-aurora), which zeroes every Swin
    block's branch and so every LoRA gradient; the noise makes the blocks, and the adapters, matter.
    `adapters=False` leaves the adapters at their initialisation (B = 0), as fine-tuning starts.
    """
    params = model.init(jax.random.PRNGKey(0), inputs)["params"]
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(flat))
    return traverse_util.unflatten_dict(
        {
            k: (
                v + 0.05 * jax.random.normal(key, v.shape) if adapters or not is_lora_path(k) else v
            )
            for (k, v), key in zip(flat.items(), keys)
        }
    )


@pytest.fixture(scope="module")
def initial(lora_model):
    return _flat(_perturbed(lora_model, _example(lora_model, 0)[0], adapters=False))


@pytest.fixture(scope="module")
def trained(lora_model, initial, tmp_path_factory):
    strategy = LoRAStrategy(RolloutStrategy(lora_model, steps=2, backprop="all", remat=False))
    return _fit(strategy, traverse_util.unflatten_dict(initial), 3, tmp_path_factory.mktemp("lora"))


def test_needs_a_model_with_lora() -> None:
    with pytest.raises(ValueError, match="use_lora=True"):
        LoRAStrategy(RolloutStrategy(tiny_model(use_lora=False), steps=2))


def test_base_is_bit_identical_and_adapters_train(trained, initial) -> None:
    assert trained.global_step == 3
    after = _flat(trained.state.params)
    assert after.keys() == initial.keys()
    base = [k for k in initial if not is_lora_path(k)]
    lora = [k for k in initial if is_lora_path(k)]
    assert base and lora
    for k in base:
        assert after[k].tobytes() == initial[k].tobytes(), f"frozen {'/'.join(k)} changed"
    for k in lora:
        assert not np.array_equal(after[k], initial[k]), f"adapter {'/'.join(k)} did not train"


def test_optimizer_state_is_adam_moments_of_the_adapters_only(trained, initial) -> None:
    counts = parameter_counts(traverse_util.unflatten_dict(initial))
    elements = _float_elements(trained.state.opt_state)
    assert elements == 2 * counts["lora"], "Adam's mu and nu for the adapters, nothing for the base"
    ratio = elements / counts["total"]
    assert ratio == pytest.approx(2 * counts["lora"] / counts["total"]) and ratio < 0.1


def test_lora_is_the_rollout_strategy_with_lora_trainables(trained, lora_model) -> None:
    strategy = trained.strategy
    assert type(strategy) is RolloutStrategy and strategy.model.use_lora
    assert strategy.trainable == Trainable.lora()
    assert strategy.steps == 2 and strategy.window == 2 and strategy.default_controls() == {}
    assert LoRAStrategy(RolloutStrategy(lora_model, curriculum=True)).default_controls().keys() == {
        "grad_window"
    }
    plain = RolloutStrategy(lora_model, steps=3)
    assert LoRAStrategy(plain).trainable == Trainable.lora() and plain.trainable == Trainable.all()
    assert RolloutStrategy(lora_model, trainable="lora").trainable == Trainable.lora()


def test_train_base_uses_its_own_learning_rate(lora_model, initial, tmp_path) -> None:
    """One Adam step moves each element by at most its learning rate (and about that much)."""
    strategy = LoRAStrategy(
        RolloutStrategy(lora_model, steps=1, remat=False),
        train_base=True,
        base_learning_rate=BASE_LR,
    )
    trainer = _fit(strategy, traverse_util.unflatten_dict(initial), 1, tmp_path)
    after = _flat(trainer.state.params)
    moved = {
        group: max(
            float(np.abs(after[k] - initial[k]).max())
            for k in initial
            if is_lora_path(k) == (group == "lora")
        )
        for group in ("lora", "base")
    }
    assert moved["lora"] == pytest.approx(LORA_LR, rel=1e-2)
    assert moved["base"] == pytest.approx(BASE_LR, rel=1e-2)
    assert (
        _float_elements(trainer.state.opt_state)
        == 2 * parameter_counts(trainer.state.params)["total"]
    )


def test_a_path_predicate_trains_only_its_parameters(tmp_path) -> None:
    """`trainable` is any strategy's: here a RolloutStrategy that trains the decoder only."""
    model = tiny_model()
    initial = _flat(_perturbed(model, _example(model, 0)[0], adapters=True))
    in_decoder = lambda path: path[0] == "decoder"
    strategy = RolloutStrategy(model, steps=2, remat=False, trainable=in_decoder)
    trainer = _fit(strategy, traverse_util.unflatten_dict(initial), 2, tmp_path)
    after = _flat(trainer.state.params)
    decoder = [k for k in initial if in_decoder(k)]
    assert decoder and len(decoder) < len(initial)
    for k in initial:
        if not in_decoder(k):
            assert after[k].tobytes() == initial[k].tobytes(), f"frozen {'/'.join(k)} changed"
    assert all(not np.array_equal(after[k], initial[k]) for k in decoder if k[-1] == "kernel")
    trained_elements = sum(initial[k].size for k in decoder)
    assert _float_elements(trainer.state.opt_state) == 2 * trained_elements


def test_the_trainer_leaves_the_given_strategy_unchanged(lora_model, tmp_path) -> None:
    strategy = LoRAStrategy(RolloutStrategy(lora_model, steps=1, remat=False))
    trainer = Trainer(
        strategy,
        optimizer=OPTIM,
        workdir=tmp_path,
        max_steps=1,
        precision="bf16-mixed",
        remat="all",
    )
    assert strategy.model is lora_model and strategy.remat is False
    configured = trainer.strategy
    assert type(configured) is RolloutStrategy and configured.trainable == Trainable.lora()
    assert configured.model.autocast and configured.model.remat and configured.model.remat_stages
    assert configured.remat and configured.steps == 1


@pytest.mark.parametrize(
    ("mode", "steps", "train_base", "trained_adapters"),
    [
        # Rollout step 0 runs without the adapter: the 1-step loss leaves it alone while the
        # base, trained here, shows that the update did happen.
        ("from_second", 1, True, set()),
        pytest.param(  # step 2's call uses the one adapter
            "from_second",
            2,
            False,
            {0},
            marks=pytest.mark.slow,  # CI time
        ),
        pytest.param(  # step k trains adapter k - 1; adapters 2, 3 stay
            "all",
            2,
            False,
            {0, 1},
            marks=pytest.mark.slow,  # CI time
        ),
    ],
)
def test_lora_modes_train_the_adapters_of_the_rollout_steps_they_serve(
    mode, steps, train_base, trained_adapters, tmp_path
) -> None:
    """`from_second` and `all` trained through `LoRAStrategy(RolloutStrategy)` and the Trainer:
    per leaf, the adapters (leading axis) that moved are those the rollout's steps apply."""
    model = tiny_model(use_lora=True, lora_mode=mode, lora_steps=4)
    initial = _flat(_perturbed(model, _example(model, 0)[0], adapters=True))
    strategy = LoRAStrategy(
        RolloutStrategy(model, steps=steps, backprop="all", remat=False),
        train_base=train_base,
        base_learning_rate=BASE_LR,
    )
    trainer = _fit(strategy, traverse_util.unflatten_dict(initial), 2, tmp_path)
    after = _flat(trainer.state.params)
    lora = [k for k in initial if is_lora_path(k)]
    assert lora and {initial[k].shape[0] for k in lora} == {4 if mode == "all" else 1}
    for k in lora:
        moved = {
            i for i in range(initial[k].shape[0]) if not np.array_equal(after[k][i], initial[k][i])
        }
        assert moved == trained_adapters, f"{'/'.join(k)}: adapters {sorted(moved)} moved"
    base_moved = [
        k for k in initial if not is_lora_path(k) and not np.array_equal(after[k], initial[k])
    ]
    if train_base:
        assert base_moved, "the base trains (so the step did update the parameters)"
    else:
        assert not base_moved, f"frozen base parameters moved: {base_moved[:3]}"


def test_pretrained_params_without_adapters_get_fresh_ones(lora_model) -> None:
    plain = tiny_model(use_lora=False)
    inputs = _example(plain, 0)[0]
    base = plain.init(jax.random.PRNGKey(0), inputs)["params"]
    strategy = LoRAStrategy(RolloutStrategy(lora_model, steps=2))
    tx, _ = strategy.make_optimizer(OPTIM, 3)
    state = strategy.init_state(jax.random.PRNGKey(1), inputs, tx, base)
    flat = _flat(state.params)
    assert any(is_lora_path(k) for k in flat)
    assert all(not v.any() for k, v in flat.items() if k[-1] == "lora_B"), (
        "B = 0: the base model's output"
    )
    assert all(np.array_equal(flat[k], v) for k, v in _flat(base).items())


def _assert_same_prediction(a: aurora.Batch, b: aurora.Batch) -> None:
    """rtol 1e-5, with float32 rounding near zero judged against the field's own scale."""
    for fields_a, fields_b in ((a.surf_vars, b.surf_vars), (a.atmos_vars, b.atmos_vars)):
        for name, x in fields_a.items():
            x, y = np.asarray(x), np.asarray(fields_b[name])
            np.testing.assert_allclose(
                x, y, rtol=1e-5, atol=1e-5 * float(np.abs(y).max()), err_msg=name
            )


@pytest.mark.parametrize(
    ("mode", "merge_step", "check_steps"), [("single", None, (0, 3)), ("all", 1, (1,))]
)
def test_merged_model_predicts_like_the_lora_model(mode, merge_step, check_steps) -> None:
    model = tiny_model(use_lora=True, lora_mode=mode, lora_steps=4)
    inputs = _example(model, 0)[0]
    params = _perturbed(model, inputs, adapters=True)
    merged_arch = merged_model(model)
    merged = merge_adapters(model, params, step=merge_step)
    assert not merged_arch.use_lora and not any(
        is_lora_path(k) for k in traverse_util.flatten_dict(merged)
    )
    lora_apply = jax.jit(lambda b: model.apply({"params": params}, b))
    merged_apply = jax.jit(lambda b: merged_arch.apply({"params": merged}, b))
    for step in check_steps:
        batch = inputs.replace(metadata=inputs.metadata.replace(rollout_step=np.int32(step)))
        with_lora = lora_apply(batch)
        _assert_same_prediction(with_lora, merged_apply(batch))
    without = merge_adapters(model, params, step=model.lora_steps)  # no adapter runs there
    base_only = merged_arch.apply({"params": without}, batch)
    effect = float(jnp.abs(base_only.atmos_vars["z"] - with_lora.atmos_vars["z"]).max())
    assert effect > 1.0, "the adapters must change the prediction (else the check above is vacuous)"


@pytest.mark.parametrize("mode", ["from_second", "all"])
def test_merge_needs_a_step_when_adapters_differ_by_step(mode) -> None:
    model = tiny_model(use_lora=True, lora_mode=mode, lora_steps=4)
    with pytest.raises(ValueError, match="step="):
        merge_adapters(model, {})
    assert adapter_index(model, 0) == (None if mode == "from_second" else 0)
    assert adapter_index(model, 2) == (0 if mode == "from_second" else 2)
    assert adapter_index(model, 4) is None


def test_export_writes_orbax_and_a_pytorch_state_dict(tmp_path) -> None:
    import orbax.checkpoint as ocp

    from aurora.convert import convert_pytorch_checkpoint

    model = tiny_model(use_lora=True)
    params = _perturbed(model, _example(model, 0)[0], adapters=True)
    paths = export_merged(model, params, tmp_path / "export")
    merged = _flat(merge_adapters(model, params))
    with ocp.StandardCheckpointer() as checkpointer:
        restored = _flat(checkpointer.restore(paths["orbax"]))
    from_torch = _flat(convert_pytorch_checkpoint(paths["pytorch"], merged_model(model)))
    assert restored.keys() == merged.keys() == from_torch.keys()
    for k in merged:
        np.testing.assert_array_equal(restored[k], merged[k])
        np.testing.assert_array_equal(from_torch[k], merged[k])
    with np.load(paths["pytorch"]) as state:
        assert not any("lora" in key for key in state.files)


def test_lora_config_describes_a_lora_rollout() -> None:
    from configs import lora

    config = lora.get_config()
    assert config.model.kwargs.use_lora and config.model.kwargs.lora_mode == "single"
    assert config.strategy.name == "lora" and config.strategy.inner == "rollout"
    kwargs = {k: v for k, v in config.strategy.items() if k not in ("name", "inner")}
    model = tiny_model(use_lora=True)
    strategy = LoRAStrategy.wrapping(RolloutStrategy, model, **kwargs)
    assert isinstance(strategy, RolloutStrategy) and strategy.steps == config.strategy.steps
    _, schedule = strategy.make_optimizer(config.optimizer, config.trainer.max_steps)
    assert float(schedule(config.optimizer.warmup_steps)) == pytest.approx(
        config.optimizer.lora_learning_rate
    )


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["AuroraSmallPretrained", "Aurora"])
def test_lora_is_a_small_fraction_of_full_size_models(preset) -> None:
    model = aurora.PRESETS[preset](use_lora=True)
    counts = lora_counts(model, random_batch(model, h=16, w=32, levels=(500,)))
    ratio = counts["lora"] / counts["total"]
    print(
        f"{preset}: LoRA {counts['lora']:,} of {counts['total']:,} parameters ({ratio:.4%}); "
        f"Adam state {2 * counts['lora']:,}"
    )
    assert 0 < ratio < 0.01
