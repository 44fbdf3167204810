"""Two processes on localhost (`jax.distributed`, gloo collectives on CPU) train like one.

Each process is a real `python` started by this test; it reads only its half of every global
batch, and the Trainer assembles global arrays from the process-local rows. After three steps
the parameters equal those of one process training on the whole batches.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from aurora.batch import Batch
from tests.helpers import random_batch, tiny_model
from trainers.data import InMemoryData
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.01}
)
ROWS = 4
STEPS = 3


def global_examples() -> list[tuple[Batch, list[Batch]]]:
    model = tiny_model()
    examples = []
    for seed in range(STEPS):
        inputs = random_batch(model, batch=ROWS, h=8, w=16, seed=seed)
        target = random_batch(model, batch=ROWS, history=1, h=8, w=16, seed=seed + 10)
        target = target.replace(
            metadata=target.metadata.replace(
                time=np.asarray(inputs.metadata.time) + 360, rollout_step=1
            )
        )
        examples.append((inputs, [target]))
    return examples


def local_rows(
    example: tuple[Batch, list[Batch]], process: int, processes: int
) -> tuple[Batch, list[Batch]]:
    """Process `process`'s contiguous block of rows (the mesh's device order across processes)."""
    n = ROWS // processes
    rows = slice(process * n, (process + 1) * n)

    def take(batch: Batch) -> Batch:
        return batch.replace(
            surf_vars={k: v[rows] for k, v in batch.surf_vars.items()},
            atmos_vars={k: v[rows] for k, v in batch.atmos_vars.items()},
            metadata=batch.metadata.replace(time=np.asarray(batch.metadata.time)[rows]),
        )

    inputs, targets = example
    return take(inputs), [take(t) for t in targets]


def fit(examples: list, mesh=None) -> Trainer:
    trainer = Trainer(
        RolloutStrategy(tiny_model()),
        optimizer=OPTIM,
        mesh=mesh,
        max_steps=STEPS,
        log_every_n_steps=1,
    )
    trainer.fit(InMemoryData(examples, shuffle=False))
    return trainer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(jax.device_count() != 1, reason="the workers use one CPU device each")
def test_two_processes_train_like_one(tmp_path) -> None:
    port, out = _free_port(), tmp_path / "params.npz"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.workers.distributed_fit",
                str(i),
                "2",
                str(port),
                str(out),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for w in workers:
            logs.append(w.communicate(timeout=600)[0])
    finally:
        for w in workers:
            w.kill()
    assert all(w.returncode == 0 for w in workers), "\n".join(log[-3000:] for log in logs)

    single = fit(global_examples())
    got = np.load(out)
    assert float(got["loss"]) == pytest.approx(single.callback_metrics["train/loss"], rel=1e-5)
    want = [np.asarray(p) for p in jax.tree_util.tree_leaves(single.state.params)]
    assert len(want) == len(got.files) - 1
    for i, w in enumerate(want):
        np.testing.assert_allclose(got[f"arr_{i}"], w, rtol=1e-4, atol=1e-5)
