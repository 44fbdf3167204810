"""Tests on 8 simulated CPU devices, in a process of their own: tests/test_sharding.py and the
8-device tests below.

The device count is fixed when JAX starts, so these tests cannot share the main test process (one
device); `test_eight_device_suite` starts pytest again with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and requires every one of them to pass. To
run them directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        .venv/bin/python -m pytest tests/test_sharding.py tests/test_multidevice.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tests.helpers import random_batch, tiny_model
from trainers import sharding
from trainers.data import InMemoryData
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer, _to_device_batch

ROOT = Path(__file__).resolve().parents[1]
EIGHT = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (simulated) devices")
OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.01}
)
SMALL = 1024  # shard leaves of at least this many elements (the default is for real models)


@pytest.mark.skipif(jax.device_count() == 8, reason="already on 8 devices: the suite runs directly")
def test_eight_device_suite() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_sharding.py",
            "tests/test_multidevice.py",
            "--deselect",
            "tests/test_multidevice.py::test_eight_device_suite",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    passed = re.search(r"(\d+) passed", result.stdout)
    assert (
        passed and int(passed.group(1)) >= 6 and "skipped" not in result.stdout.splitlines()[-1]
    ), tail


def _example(model, rows: int = 8):
    inputs = random_batch(model, batch=rows, h=8, w=16)
    target = random_batch(model, batch=rows, history=1, h=8, w=16, seed=1)
    target = target.replace(
        metadata=target.metadata.replace(
            time=np.asarray(inputs.metadata.time) + 360, rollout_step=1
        )
    )
    return inputs, [target]


def _initial_state(mesh, strategy=None):
    trainer = Trainer(
        strategy or RolloutStrategy(tiny_model()),
        optimizer=OPTIM,
        mesh=mesh,
        min_shard_size=SMALL,
        max_steps=0,  # fit only builds the state
    )
    return trainer.fit(InMemoryData([_example(tiny_model())], shuffle=False))


def _bytes(state) -> tuple[int, int, int]:
    """(total, on the first device, of the leaves left replicated) of a sharded state."""
    leaves = jax.tree_util.tree_leaves(state)
    total = sum(x.nbytes for x in leaves)
    first = sum(x.addressable_shards[0].data.nbytes for x in leaves)
    replicated = sum(x.nbytes for x in leaves if x.sharding.is_fully_replicated)
    return total, first, replicated


@EIGHT
def test_state_is_created_sharded_and_equals_the_one_device_state() -> None:
    """FSDP over 8: each device holds 1/8 of the state from the start, with the values one
    device would have made; the state is only ever built inside the sharded program."""
    built_outside_jit = []
    strategy = RolloutStrategy(tiny_model())
    init_state = strategy.init_state

    def spy(*args, **kwargs):
        state = init_state(*args, **kwargs)
        built_outside_jit.append(not isinstance(state.step, jax.core.Tracer))
        return state

    strategy.init_state = spy
    state = _initial_state(sharding.make_mesh(data=1, fsdp=8), strategy)
    assert built_outside_jit and not any(built_outside_jit)

    total, first, replicated = _bytes(state)
    assert first <= (total - replicated) / 8 * 1.01 + replicated, (first, total, replicated)
    assert replicated < total / 10 and first < total / 6

    one_device = _initial_state(None)
    for a, b in zip(
        jax.tree_util.tree_leaves(one_device), jax.tree_util.tree_leaves(state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@EIGHT
def test_initialisation_program_needs_about_an_eighth_per_device() -> None:
    """XLA's plan of the initialisation under FSDP 8: per device, the state's shards and little
    else (random initialisers compute only their own shard)."""
    strategy = RolloutStrategy(tiny_model())
    tx, _ = strategy.make_optimizer(OPTIM, None)
    inputs = jax.tree_util.tree_map(jnp.zeros_like, _to_device_batch(_example(tiny_model()))[0])
    init = lambda params: strategy.init_state(jax.random.PRNGKey(0), inputs, tx, params)
    mesh = sharding.make_mesh(data=1, fsdp=8)
    create, _ = sharding.jit_init(init, None, mesh=mesh, min_shard_size=SMALL)
    plan = create.lower(None).compile().memory_analysis()
    total, first, _ = _bytes(create(None))
    assert plan.output_size_in_bytes == pytest.approx(first, rel=0.02)
    assert plan.temp_size_in_bytes < first / 2
    assert plan.output_size_in_bytes + plan.temp_size_in_bytes < total / 4


INVOLUNTARY = "Involuntary full rematerialization"


@pytest.mark.slow  # CI time
@EIGHT
def test_fsdp_steps_keep_activations_split_by_rows(capfd) -> None:
    """With the model's activation sharding hints in context, XLA never replicates a whole
    activation to re-split it (the FSDP-sharded kernels of the level Perceivers' heads and of the
    backbone's patch splitting otherwise leak their sharding into the activations)."""
    model = tiny_model()
    trainer = Trainer(
        RolloutStrategy(model),
        optimizer=OPTIM,
        mesh=sharding.make_mesh(data=1, fsdp=8),
        min_shard_size=SMALL,
        max_steps=1,
        remat="backbone",
    )
    trainer.fit(InMemoryData([_example(model)], shuffle=False))
    err = capfd.readouterr().err
    assert trainer.global_step == 1
    assert INVOLUNTARY not in err, err[err.find(INVOLUNTARY) - 300 :][:1500]


@EIGHT
def test_chunked_rematerialisation_chunks_each_devices_rows(monkeypatch) -> None:
    """A rematerialised level Perceiver with more rows per device than its chunk scans over each
    device's own rows (never over the sharded axis), with the values and gradients of one device."""
    from aurora.model import layers
    from aurora.model.perceiver import PerceiverResampler

    calls = []
    per_shard = layers._remat_in_chunks_per_shard
    monkeypatch.setattr(
        layers,
        "_remat_in_chunks_per_shard",
        lambda *args, **kwargs: calls.append(args[-1]) or per_shard(*args, **kwargs),
    )
    module = PerceiverResampler(latent_dim=16, head_dim=4, num_heads=2, remat=True, chunk=3)
    rng = np.random.default_rng(0)
    latents = jnp.asarray(rng.standard_normal((2, 16)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((8 * 10, 3, 16)), jnp.float32)  # 10 rows per device
    params = module.init(jax.random.PRNGKey(0), latents, x)

    def loss(params, x):
        out = module.apply(params, latents, x)
        return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size)

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1))
    expected = jax.jit(value_and_grad)(params, x)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.BATCH_AXES))
    sharded = jax.jit(sharding.in_mesh(value_and_grad, mesh))(params, jax.device_put(x, rows))
    assert calls == [8]
    # Per-device batches may sum in another order: float32 rounding of the leaf's magnitude.
    for a, b in zip(
        jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(sharded), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4 * np.max(np.abs(a)))
