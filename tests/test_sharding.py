"""Sharding on 8 simulated CPU devices: data parallel and FSDP equal one device; checkpoints move
between meshes.

These tests need `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before JAX starts, so
they are skipped in the main test process (one device) and run in a subprocess of their own by
`tests/test_multidevice.py`. To run them directly:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        .venv/bin/python -m pytest tests/test_sharding.py
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest

from callbacks.checkpoint import ModelCheckpoint
from tests.helpers import random_batch, tiny_model
from trainers import sharding
from trainers.data import InMemoryData
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

pytestmark = pytest.mark.skipif(
    jax.device_count() != 8, reason="needs 8 (simulated) devices; see module docstring"
)

OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.01}
)
ROWS = 8
SMALL = 1024  # shard leaves of at least this many elements (the default is for real models)


def _data(model) -> InMemoryData:
    examples = []
    for seed in range(2):
        inputs = random_batch(model, batch=ROWS, h=8, w=16, seed=seed)
        target = random_batch(model, batch=ROWS, history=1, h=8, w=16, seed=seed + 10)
        target = target.replace(
            metadata=target.metadata.replace(
                time=np.asarray(inputs.metadata.time) + 360, rollout_step=1
            )
        )
        examples.append((inputs, [target]))
    return InMemoryData(examples, shuffle=False)


def _fit(mesh, workdir=None, max_steps=2, callbacks=()):
    model = tiny_model()
    trainer = Trainer(
        RolloutStrategy(model),
        optimizer=OPTIM,
        mesh=mesh,
        min_shard_size=SMALL,
        max_steps=max_steps,
        workdir=workdir,
        callbacks=list(callbacks),
        log_every_n_steps=1,
    )
    trainer.fit(_data(model))
    return trainer


def _host(tree):
    return [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]


def test_mesh_sizes() -> None:
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1}
    assert dict(sharding.make_mesh(data=2, fsdp=-1).shape) == {"data": 2, "fsdp": 4}
    assert dict(sharding.make_mesh(data=1, fsdp=8).shape) == {"data": 1, "fsdp": 8}
    with pytest.raises(ValueError, match="cannot be split"):
        sharding.make_mesh(data=3, fsdp=-1)
    with pytest.raises(ValueError, match="devices, but there are 8"):
        sharding.make_mesh(data=2, fsdp=2)


def test_fsdp_shards_parameters_and_rules_override() -> None:
    model = tiny_model()
    batch = random_batch(model, batch=1, h=8, w=16)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
    mesh = sharding.make_mesh(data=1, fsdp=8)
    shardings = sharding.state_shardings(params, mesh, min_shard_size=SMALL)

    total = per_device = 0
    for leaf, s in zip(
        jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings), strict=True
    ):
        nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
        total += nbytes
        per_device += int(np.prod(s.shard_shape(leaf.shape))) * leaf.dtype.itemsize
    replicated = sum(
        int(np.prod(x.shape)) * x.dtype.itemsize
        for x in jax.tree_util.tree_leaves(params)
        if np.prod(x.shape) < SMALL
    )
    assert per_device <= (total - replicated) / 8 * 1.05 + replicated, (per_device, total)
    assert per_device < total / 4

    rules = [(r"qkv/kernel$", (None, "fsdp")), (r"proj/kernel$", ())]
    named = jax.tree_util.tree_map_with_path(
        lambda p, s: (sharding.path_name(p), s.spec),
        sharding.state_shardings(params, mesh, rules, SMALL),
    )
    specs = dict(
        jax.tree_util.tree_leaves(
            named, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
        )
    )
    assert all(
        spec == jax.sharding.PartitionSpec(None, "fsdp")
        for name, spec in specs.items()
        if name.endswith("qkv/kernel")
    )
    assert all(
        spec == jax.sharding.PartitionSpec()
        for name, spec in specs.items()
        if name.endswith("proj/kernel")
    )


def test_data_parallel_and_fsdp_steps_equal_one_device() -> None:
    single = _fit(None)
    for mesh in (
        sharding.make_mesh(data=8, fsdp=1),
        sharding.make_mesh(data=2, fsdp=4),
    ):  # pure DP; DP x FSDP
        sharded = _fit(mesh)
        assert sharded.callback_metrics["train/loss"] == pytest.approx(
            single.callback_metrics["train/loss"], rel=1e-5
        )
        for a, b in zip(_host(single.state.params), _host(sharded.state.params), strict=True):
            # 3 % of a 1e-3 Adam step. Adam divides by the gradient's own size, so where a gradient
            # nearly cancels over the grid (the decoder's head biases), another reduction order
            # moves the parameter by up to ~2 % of a step differently (7e-6 to 1.7e-5 measured).
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=3e-5)
        leaves = jax.tree_util.tree_leaves(sharded.state.params)
        assert all(x.sharding.mesh.shape == mesh.shape for x in leaves)
        if mesh.shape["fsdp"] > 1:
            assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in leaves), (
                "FSDP shards some parameters"
            )


def test_checkpoint_moves_between_meshes(tmp_path) -> None:
    saved = _fit(
        sharding.make_mesh(data=8, fsdp=1), tmp_path, callbacks=[ModelCheckpoint(every_n_steps=2)]
    )
    want = _host(saved.state)
    for mesh in (sharding.make_mesh(data=2, fsdp=4), None):
        model = tiny_model()
        trainer = Trainer(
            RolloutStrategy(model),
            optimizer=OPTIM,
            mesh=mesh,
            min_shard_size=SMALL,
            max_steps=2,
            workdir=tmp_path,
            callbacks=[ModelCheckpoint(every_n_steps=2)],
        )
        state = trainer.load(_data(model))
        assert trainer.global_step == 2
        for a, b in zip(want, _host(state), strict=True):
            np.testing.assert_array_equal(a, b)
        if mesh is not None:
            assert any(
                x.sharding.spec != jax.sharding.PartitionSpec()
                for x in jax.tree_util.tree_leaves(state.params)
            )


def test_batch_must_split_over_the_mesh() -> None:
    model = tiny_model()
    inputs = random_batch(model, batch=3, h=8, w=16)
    target = random_batch(model, batch=3, history=1, h=8, w=16)
    from trainers.trainer import _to_device_batch

    with pytest.raises(ValueError, match="multiple of 8"):
        sharding.batch_shardings(_to_device_batch((inputs, [target])), sharding.make_mesh())
