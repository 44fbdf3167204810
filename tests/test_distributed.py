"""Two processes on localhost (`jax.distributed`, gloo collectives on CPU) train like one.

Each process is a real `python` started by this test; it reads only its half of every global
batch, and the Trainer assembles global arrays from the process-local rows. After three steps
the parameters equal those of one process training on the whole batches.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest

from aurora.batch import Batch
from tests.conftest import CACHE
from tests.helpers import random_batch, tiny_model
from trainers import sharding
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


@pytest.mark.slow  # CI time: main.py's two-process test below covers the multi-process path
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


SLURM_STEP = {  # what srun sets for task 1 of a 2-task step
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[01-02]",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
}
CLUSTER_VARS = (
    *SLURM_STEP,
    "OMPI_MCA_orte_hnp_uri",
    "KUBERNETES_SERVICE_HOST",
    "TPU_WORKER_HOSTNAMES",
    "JAX_COORDINATOR_ADDRESS",
)


@pytest.fixture
def starts(monkeypatch) -> list[dict]:
    """No cluster in the environment; `jax.distributed.initialize` records its calls instead."""
    for name in CLUSTER_VARS:
        monkeypatch.delenv(name, raising=False)
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    return calls


def test_a_cluster_jax_detects_starts_jax_distributed(monkeypatch, starts) -> None:
    assert sharding.detect_cluster() is None
    assert not sharding.initialize_distributed() and starts == []

    for name, value in SLURM_STEP.items():
        monkeypatch.setenv(name, value)
    assert sharding.detect_cluster() == ("SlurmCluster", 2)
    assert sharding.initialize_distributed()
    # JAX fills in the coordinator, the process count and this process's id from SLURM
    assert starts == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_one_process_runs_alone_unless_forced(monkeypatch, starts) -> None:
    for name, value in {**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    assert sharding.detect_cluster() == ("SlurmCluster", 1)
    assert not sharding.initialize_distributed()
    assert not sharding.initialize_distributed(mode="never")
    assert starts == []
    assert sharding.initialize_distributed(mode="always") and len(starts) == 1


def test_a_named_coordinator_starts_it_and_never_wins(monkeypatch, starts) -> None:
    assert not sharding.initialize_distributed("host0:1234", 4, 3, mode="never")
    assert sharding.initialize_distributed("host0:1234", 4, 3)
    assert starts == [dict(coordinator_address="host0:1234", num_processes=4, process_id=3)]
    with pytest.raises(ValueError, match="auto, always or never"):
        sharding.initialize_distributed(mode="yes")


def test_a_cluster_that_cannot_say_its_size_runs_alone(monkeypatch, starts) -> None:
    """A pod outside a Job (or without the `kubernetes` package): a warning, one process."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    with pytest.warns(UserWarning, match="kubernetes"):
        assert sharding.detect_cluster() is None
        assert not sharding.initialize_distributed() and starts == []


# The demo job on the bundled sample, made quick: a one-step rollout of a model with one Swin block
# per stage, no validation, a checkpoint every 2 steps; FSDP over the two processes' devices.
MAIN_FLAGS = (
    "--config=configs/demo.py",
    "--config.strategy.steps=1",
    "--config.model.kwargs.encoder_depths=(1, 1)",
    "--config.model.kwargs.decoder_depths=(1, 1)",
    "--config.trainer.val_check_interval=100000",
    "--config.trainer.log_every_n_steps=1",
    "--config.callbacks.checkpoint.every_n_steps=2",
    "--config.mesh.data=1",
    "--config.mesh.min_shard_size=16384",  # 28 of the 117 parameters, 86 % of the bytes
)


def _main(workdir: Path, *flags: str) -> subprocess.Popen:
    """`python main.py` on the demo job, one CPU device, no cluster in its environment."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *CLUSTER_VARS)} | {
        "JAX_PLATFORMS": "cpu",
        "JAX_COMPILATION_CACHE_DIR": str(CACHE),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    }
    return subprocess.Popen(
        [sys.executable, "main.py", f"--workdir={workdir}", *MAIN_FLAGS, *flags],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _summary(output: str) -> dict:
    """The JSON summary `main.py` prints after the run."""
    start = output.rindex('{\n "workdir"')
    return json.JSONDecoder().raw_decode(output[start:])[0]


def _finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-5000:]
    return outputs


def _checkpoints(workdir: Path) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


@pytest.mark.skipif(jax.device_count() != 1, reason="the processes use one CPU device each")
def test_main_on_two_processes_stops_together_and_resumes_on_one(tmp_path) -> None:
    """`main.py` in two processes (jax.distributed on localhost, gloo): the real pipeline, FSDP
    across both, checkpoints written by both; SIGTERM to one stops both at the same step with a
    checkpoint, and one process resumes from it."""
    port = _free_port()
    procs = [
        _main(
            tmp_path,
            "--config.trainer.max_steps=100000",  # only the signal ends it
            "--config.mesh.fsdp=2",
            f"--config.distributed.coordinator_address=localhost:{port}",
            "--config.distributed.num_processes=2",
            f"--config.distributed.process_id={i}",
        )
        for i in range(2)
    ]
    deadline = time.time() + 900
    while not _checkpoints(tmp_path):
        ended = any(p.poll() is not None for p in procs)
        if ended or time.time() > deadline:
            for p in procs:
                p.kill()
            logs = "\n".join(p.communicate()[0][-3000:] for p in procs)
            pytest.fail(f"no checkpoint ({'a process ended' if ended else 'timed out'}):\n{logs}")
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)
    summaries = [_summary(out) for out in _finish(procs)]
    stopped = summaries[0]["global_step"]
    assert summaries[1]["global_step"] == stopped >= 2
    assert _checkpoints(tmp_path)[-1] == stopped, "the stop step is checkpointed"

    resumed_at = time.time()
    [out] = _finish([_main(tmp_path, f"--config.trainer.max_steps={stopped + 2}")])
    assert _summary(out)["global_step"] == stopped + 2
    with open(tmp_path / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["tag"] == "train/loss"]
    assert [int(r["step"]) for r in rows] == list(range(1, stopped + 3))
    # steps up to the checkpoint were logged by the two processes, the last two by the resumed one
    assert all((float(r["wall_time"]) < resumed_at) == (int(r["step"]) <= stopped) for r in rows)
