"""Model behaviour beyond parity: presets, parameter counts, LoRA modes, rollout, variable sets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aurora
from aurora.convert import _example_batch, param_shapes
from aurora.rollout import advance_batch
from tests.helpers import random_batch, tiny_model


def _count(model: aurora.Aurora) -> int:
    return int(sum(np.prod(s) for s in param_shapes(model, _example_batch(model)).values()))


@pytest.mark.parametrize(
    "preset, kwargs, expected",
    [
        ("AuroraSmallPretrained", {}, 112_797_584),
        ("AuroraSmallPretrained", {"use_lora": True}, 113_338_256),
        ("AuroraPretrained", {}, 1_256_300_176),
        ("Aurora", {}, 1_259_150_992),
    ],
)
def test_parameter_counts_match_microsoft_aurora(preset: str, kwargs: dict, expected: int) -> None:
    assert _count(aurora.PRESETS[preset](**kwargs)) == expected


def test_presets_keep_microsoft_aurora_hyperparameters() -> None:
    assert aurora.AuroraSmall is aurora.AuroraSmallPretrained
    assert aurora.Aurora().use_lora and not aurora.AuroraPretrained().use_lora
    assert aurora.Aurora12hPretrained().timestep_minutes == 12 * 60
    assert aurora.AuroraHighRes().patch_size == 10
    assert aurora.AuroraSmall().embed_dim == 256


@pytest.fixture(scope="module")
def lora_setup():
    model = tiny_model(use_lora=True, lora_mode="all", lora_steps=3)
    batch = random_batch(model)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    # AdaLN modulations and LoRA B start at zero, which would make the backbone (and LoRA) a
    # no-op: perturb every parameter so that each adapter changes the output.
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    return model, batch, params


def _surf(model, params, batch, step, **overrides):
    batch = batch.replace(metadata=batch.metadata.replace(rollout_step=step))
    return np.asarray(model.clone(**overrides).apply({"params": params}, batch).surf_vars["2t"])


def test_lora_modes_select_adapters_by_rollout_step(lora_setup) -> None:
    model, batch, params = lora_setup
    # "all": each step below lora_steps uses its own adapter; beyond, none.
    outs = [_surf(model, params, batch, s) for s in range(4)]
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])
    no_lora = model.clone(use_lora=False)
    base_out = np.asarray(
        no_lora.apply(
            {"params": _strip_lora(params)},
            batch.replace(metadata=batch.metadata.replace(rollout_step=3)),
        ).surf_vars["2t"]
    )
    np.testing.assert_allclose(outs[3], base_out, rtol=0, atol=0)

    # "single" keeps its adapter at every step (the earlier JAX port switched it off after step 0).
    single = model.clone(lora_mode="single")
    p1 = _first_adapter_only(params)
    a = np.asarray(single.apply({"params": p1}, batch).surf_vars["2t"])
    b = np.asarray(
        single.apply(
            {"params": p1}, batch.replace(metadata=batch.metadata.replace(rollout_step=2))
        ).surf_vars["2t"]
    )
    no_step_effect = np.asarray(
        no_lora.apply({"params": _strip_lora(params)}, batch).surf_vars["2t"]
    )
    assert not np.array_equal(a, no_step_effect)
    np.testing.assert_allclose(a, b, rtol=0, atol=0)

    # "from_second": no adapter at step 0, the shared adapter from step 1 on.
    second = model.clone(lora_mode="from_second")
    c0 = np.asarray(second.apply({"params": p1}, batch).surf_vars["2t"])
    c1 = np.asarray(
        second.apply(
            {"params": p1}, batch.replace(metadata=batch.metadata.replace(rollout_step=1))
        ).surf_vars["2t"]
    )
    np.testing.assert_allclose(c0, no_step_effect, rtol=0, atol=0)
    np.testing.assert_allclose(c1, a, rtol=0, atol=0)


def _strip_lora(params):
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: v for k, v in flat.items() if not k[-1].startswith("lora_")}
    )


def _first_adapter_only(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x[:1] if "lora_" in jax.tree_util.keystr(path) else x, params
    )


def test_rollout_advances_time_and_step_and_compiles_once() -> None:
    traces = []

    class Counting(aurora.Aurora):
        def __call__(self, batch):
            traces.append(1)  # runs only while tracing
            return super().__call__(batch)

    model = Counting(
        encoder_depths=(1, 2),
        encoder_num_heads=(2, 4),
        decoder_depths=(2, 1),
        decoder_num_heads=(4, 2),
        embed_dim=32,
        num_heads=4,
        window_size=(2, 2, 4),
        use_lora=False,
    )
    batch = random_batch(model)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    traces.clear()
    preds = list(aurora.rollout(model, params, batch, steps=3))
    assert len(traces) == 1, "one compiled step must serve every rollout step"
    start = np.datetime64("2020-06-01T12:00")
    for k, pred in enumerate(preds, start=1):
        assert int(pred.metadata.rollout_step) == k
        assert np.datetime64(pred.metadata.datetimes()[0]) == start + np.timedelta64(6 * k, "h")
        assert pred.surf_vars["2t"].shape == (1, 1, 16, 32)
        assert pred.atmos_vars["z"].shape == (1, 1, 3, 16, 32)
    # The next input is the old history's last step followed by the prediction.
    nxt = advance_batch(batch, preds[0])
    np.testing.assert_array_equal(nxt.surf_vars["2t"][:, 0], batch.surf_vars["2t"][:, 1])
    np.testing.assert_array_equal(nxt.surf_vars["2t"][:, 1], preds[0].surf_vars["2t"][:, 0])


def test_configurable_variable_sets_and_short_history() -> None:
    """No surface variables (statics only), an extra atmospheric variable with dataset
    statistics."""
    model = tiny_model(
        surf_vars=(),
        static_vars=("lsm", "z"),
        atmos_vars=("z", "t", "r"),
        surf_stats={"r_100": (20.0, 20.0), "r_500": (50.0, 30.0), "r_850": (70.0, 20.0)},
    )
    rng = np.random.default_rng(0)
    levels = (100, 500, 850)
    batch = aurora.Batch(
        surf_vars={},
        static_vars={
            "lsm": rng.random((16, 32), dtype=np.float32),
            "z": rng.random((16, 32), dtype=np.float32),
        },
        atmos_vars={
            v: rng.standard_normal((2, 1, 3, 16, 32)).astype(np.float32) for v in ("z", "t", "r")
        },
        metadata=aurora.Metadata(
            lat=np.linspace(90, -90, 17)[:-1],
            lon=np.linspace(0, 360, 32, endpoint=False),
            time=(np.datetime64("2016-09-25T00:00"),) * 2,
            atmos_levels=levels,
        ),
    )
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    pred = model.apply({"params": params}, batch)
    assert pred.surf_vars == {}
    assert set(pred.atmos_vars) == {"z", "t", "r"}
    assert np.isfinite(np.asarray(pred.atmos_vars["r"])).all()


def test_unknown_variable_is_a_clear_error() -> None:
    model = tiny_model()
    batch = random_batch(model)
    batch = batch.replace(surf_vars={**batch.surf_vars, "tp": batch.surf_vars["2t"]})
    with pytest.raises(ValueError, match=r"surface variables \['tp'\]"):
        model.init(jax.random.PRNGKey(0), batch)


def test_bf16_autocast_stays_close_to_float32() -> None:
    model = tiny_model()
    batch = random_batch(model)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    full = np.asarray(model.apply({"params": params}, batch).atmos_vars["t"])
    half = model.clone(autocast=True).apply({"params": params}, batch).atmos_vars["t"]
    assert half.dtype == jnp.float32
    assert np.abs(np.asarray(half) - full).max() / np.abs(full).max() < 2e-2


@pytest.mark.parametrize("stages", [False, True])
def test_remat_gives_the_same_values_and_gradients(stages) -> None:
    model = tiny_model()
    batch = random_batch(model)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten(
        [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )

    def loss(p, m):
        return jnp.mean(m.apply({"params": p}, batch).atmos_vars["t"])

    plain = jax.jit(jax.value_and_grad(lambda p: loss(p, model)))(params)
    remat = jax.jit(
        jax.value_and_grad(lambda p: loss(p, model.clone(remat=True, remat_stages=stages)))
    )(params)
    np.testing.assert_allclose(float(plain[0]), float(remat[0]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(plain[1]), jax.tree_util.tree_leaves(remat[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-8)
