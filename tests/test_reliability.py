"""Reliability: kills, preemption, damaged checkpoints and numerical faults.

* `main.py` runs in a subprocess that is SIGKILLed between checkpoints (or SIGTERMed), then run
  again in the same workdir: the result is bit-identical to an uninterrupted run and metrics.csv
  logs every step exactly once;
* damaged checkpoints (truncated or missing array files, corrupted or missing meta) fall back to
  the previous step with a warning naming the path; a checkpoint of another model is refused;
* NaN inputs skip the update or stop training, and the last good checkpoint stays restorable.

The subprocess runs use a smaller model than configs/demo.py (one Swin stage, one rollout step), so
that each start costs seconds with the persistent compilation cache. A test-only callback
(:class:`Pacer`) reports each finished step in `<workdir>/progress` and can hold the run at a step,
so that the kill lands exactly where the test wants it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint
from callbacks.grad_stop import GradStop
from callbacks.preemption import Preemption
from tests.conftest import CACHE
from tests.helpers import random_batch, tiny_model
from trainers.checkpointing import ITEMS
from trainers.data import InMemoryData
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 240  # seconds until the first step (a cold compilation cache on a busy machine)


# --------------------------------------------------------------------------------------------------
# main.py in a subprocess
# --------------------------------------------------------------------------------------------------


class Pacer(Callback):
    """Test-only callback: after each step, flush the metric writers (so that rows logged after the
    last checkpoint are on disk when the process is killed: the resumed run must drop them), append
    the step to `<workdir>/progress`, then sleep `sleep` seconds, or hold forever at `hold_at`."""

    def __init__(self, sleep: float = 0.0, hold_at: int = 0):
        self.sleep = sleep
        self.hold_at = hold_at

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        for writer in trainer.writers:
            writer.flush()
        with open(Path(trainer.workdir) / "progress", "a") as f:
            f.write(f"{trainer.global_step}\n")
        if trainer.global_step == self.hold_at:
            while True:  # until the test kills the process
                time.sleep(0.05)
        if self.sleep:
            time.sleep(self.sleep)


CONFIG = """
from configs import demo


def get_config():
    config = demo.get_config()
    config.model.kwargs.encoder_depths = [1]
    config.model.kwargs.encoder_num_heads = [4]
    config.model.kwargs.decoder_depths = [1]
    config.model.kwargs.decoder_num_heads = [4]
    config.strategy.steps = 1
    config.data.builder_config.data_dir = {data_dir!r}
    config.trainer.max_steps = 8
    config.trainer.val_check_interval = 1000
    config.trainer.log_every_n_steps = 1
    config.callbacks.checkpoint.every_n_steps = 3
    config.callbacks.pacer = {{"type": "tests.test_reliability:Pacer", "sleep": 0.0, "hold_at": 0}}
    config.writers = {{
        "tensorboard": {{"type": "tensorboard"}},
        "csv": {{"type": "csv"}},
        "jsonl": {{"type": "jsonl"}},
    }}
    return config
"""


class Job:
    """One `main.py` process in `workdir`; stdout/stderr go to files next to the workdir."""

    def __init__(self, config: Path, workdir: Path, *overrides: str):
        self.workdir = workdir
        self.out = workdir.with_name(workdir.name + ".out")
        self.err = workdir.with_name(workdir.name + ".err")
        env = dict(
            os.environ,
            JAX_COMPILATION_CACHE_DIR=str(CACHE),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
            JAX_PLATFORMS="cpu",
            PYTHONUNBUFFERED="1",
        )
        command = [
            sys.executable,
            "main.py",
            f"--config={config}",
            f"--workdir={workdir}",
            *overrides,
        ]
        with open(self.out, "a") as out, open(self.err, "a") as err:
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err)

    def tail(self) -> str:
        return self.err.read_text()[-3000:] if self.err.exists() else ""

    def progress(self) -> int:
        path = self.workdir / "progress"
        lines = path.read_text().split() if path.exists() else []
        return int(lines[-1]) if lines else 0

    def wait_for(self, condition, timeout: float = STARTUP_TIMEOUT, poll: float = 0.02) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"main.py ended ({self.process.returncode}) early:\n{self.tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"timed out waiting in {self.workdir}:\n{self.tail()}")
            time.sleep(poll)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def finish(self, timeout: float = STARTUP_TIMEOUT + 120) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"main.py did not finish in {timeout} s:\n{self.tail()}") from None

    def summary(self) -> dict[str, Any]:
        text = self.out.read_text()
        return json.loads(text[text.rindex('{\n "workdir"') :])


def _steps(workdir: Path) -> list[int]:
    directory = workdir / "checkpoints"
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if directory.exists()
        else []
    )


def _read_checkpoint(
    workdir: Path, step: int | None = None
) -> tuple[int, Any, dict[str, Any], Any]:
    """(step, state as numpy arrays, meta, strategy arrays or None) of a step (default: latest)."""
    step = max(_steps(workdir)) if step is None else step
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(
        workdir / "checkpoints", options=options, item_names=ITEMS
    ) as manager:
        items = {"state": ocp.args.StandardRestore(), "meta": ocp.args.JsonRestore()}
        if (workdir / "checkpoints" / str(step) / "strategy").exists():
            items["strategy"] = ocp.args.PyTreeRestore()
        restored = manager.restore(step, args=ocp.args.Composite(**items))
    state = jax.tree_util.tree_map(np.asarray, restored["state"])
    strategy = (
        jax.tree_util.tree_map(np.asarray, restored["strategy"]) if "strategy" in items else None
    )
    return step, state, restored["meta"], strategy


def _flat(tree: Any) -> dict[str, np.ndarray]:
    """Leaves by path, with attributes, keys and indices alike: a `TrainState` and the nested dicts
    and lists that a checkpoint restores without a target compare equal."""

    def name(entry: Any) -> str:
        for field in ("name", "key", "idx"):
            if hasattr(entry, field):
                return str(getattr(entry, field))
        return str(entry)

    return {
        "/".join(map(name, path)): np.asarray(x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _assert_same_tree(a: Any, b: Any) -> None:
    flat_a, flat_b = _flat(a), _flat(b)
    assert sorted(flat_a) == sorted(flat_b)
    for path, x in flat_a.items():
        np.testing.assert_array_equal(x, flat_b[path], err_msg=path)


def _assert_same_result(run: Path, reference: Path) -> None:
    """Same final step, parameters, optimiser state, RNG and data position, and the same metrics."""
    step, state, meta, strategy = _read_checkpoint(run)
    ref_step, ref_state, ref_meta, ref_strategy = _read_checkpoint(reference)
    assert step == ref_step and meta["global_step"] == ref_meta["global_step"] == step
    _assert_same_tree(state, ref_state)
    assert meta["data"] == ref_meta["data"] and meta["strategy"] == ref_meta["strategy"]
    if ref_strategy is not None:
        _assert_same_tree(strategy, ref_strategy)
    losses, ref_losses = _losses(run / "metrics.csv"), _losses(reference / "metrics.csv")
    assert [s for s, _ in losses] == list(range(1, step + 1)), (
        "train/loss: no duplicated or missing steps"
    )
    assert losses == ref_losses, "the same loss, bit for bit, at every step"
    with open(run / "metrics.jsonl") as f:
        jsonl_steps = [r["step"] for r in map(json.loads, f) if "train/loss" in r]
    assert jsonl_steps == list(range(1, step + 1)), "metrics.jsonl: no duplicated or missing steps"


def _losses(path: Path) -> list[tuple[int, str]]:
    with open(path) as f:
        return [(int(r["step"]), r["value"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """A config file for the small model and the uninterrupted reference run (8 steps)."""
    root = tmp_path_factory.mktemp("reliability")
    config = root / "reliability_config.py"
    config.write_text(CONFIG.format(data_dir=str(root / "datasets")))
    reference = Job(config, root / "reference")
    assert reference.finish() == 0, reference.tail()
    assert _steps(root / "reference") == [3, 6, 8]
    return config, root


@pytest.mark.slow  # CI time: heavy, and its neighbours cover the same code in CI
def test_sigkill_between_checkpoints_then_rerun_matches_an_uninterrupted_run(jobs) -> None:
    config, root = jobs
    workdir = root / "killed"
    job = Job(config, workdir, "--config.callbacks.pacer.hold_at=5")
    job.wait_for(lambda: job.progress() == 5 and _steps(workdir) == [3])
    job.kill()
    assert job.finish() == -signal.SIGKILL
    assert _steps(workdir) == [3]
    # rows are recorded a step late (the Trainer fetches metrics once the next step is queued),
    # so step 4's row is on disk while step 5 holds: a row past the checkpoint, to be dropped
    assert max(s for s, _ in _losses(workdir / "metrics.csv")) == 4, (
        "rows after the checkpoint are on disk"
    )

    rerun = Job(config, workdir)
    assert rerun.finish() == 0, rerun.tail()
    assert rerun.summary()["global_step"] == 8
    _assert_same_result(workdir, root / "reference")


def test_sigterm_checkpoints_the_current_step_exits_cleanly_and_resumes(jobs) -> None:
    config, root = jobs
    workdir = root / "terminated"
    job = Job(config, workdir, "--config.callbacks.pacer.sleep=0.5")
    job.wait_for(lambda: job.progress() >= 4)
    job.kill(signal.SIGTERM)
    assert job.finish() == 0, job.tail()
    stopped = job.summary()["global_step"]
    assert 4 <= stopped < 8
    assert stopped in _steps(workdir), "a checkpoint of the step at which it stopped"
    assert f"Received SIGTERM: saved a checkpoint of step {stopped}" in job.tail()

    rerun = Job(config, workdir)
    assert rerun.finish() == 0, rerun.tail()
    _assert_same_result(workdir, root / "reference")


@pytest.mark.slow
def test_several_kills_at_random_points_including_during_a_checkpoint_write(jobs) -> None:
    config, root = jobs
    workdir = root / "random_kills"
    overrides = ("--config.trainer.max_steps=12", "--config.callbacks.checkpoint.every_n_steps=2")
    reference = Job(config, root / "reference12", *overrides)
    assert reference.finish() == 0, reference.tail()

    rng = random.Random(0)
    tmp = f"*{ocp.utils.TMP_DIR_SUFFIX}*"

    def writes() -> set[tuple[str, int]]:
        """Unfinished checkpoint writes, by name and inode (a rewrite of a step reuses the name)."""
        return {(p.name, p.stat().st_ino) for p in (workdir / "checkpoints").glob(tmp)}

    during_write = False
    for attempt in range(6):
        done = max(_steps(workdir), default=0)
        if done >= 10:
            break
        (workdir / "progress").unlink(missing_ok=True)
        left_over = writes() if (workdir / "checkpoints").exists() else set()
        job = Job(config, workdir, *overrides, "--config.callbacks.pacer.sleep=0.3")
        if attempt % 2 == 0:  # kill as soon as an asynchronous checkpoint write is in progress
            job.wait_for(
                lambda left_over=left_over: (
                    (workdir / "checkpoints").exists() and bool(writes() - left_over)
                ),
                poll=0.001,
            )
            job.kill()
            during_write |= bool(writes() - left_over)
        else:  # kill at a random time after the first step
            job.wait_for(lambda job=job: job.progress() > 0)
            time.sleep(rng.uniform(0.0, 1.5))
            job.kill()
        assert job.finish() in (-signal.SIGKILL, 0)
    assert during_write, "at least one kill hit an unfinished checkpoint write"

    rerun = Job(config, workdir, *overrides)
    assert rerun.finish() == 0, rerun.tail()
    assert rerun.summary()["global_step"] == 12
    _assert_same_result(workdir, root / "reference12")


REPLAY_CONFIG = """
from configs import replay


def get_config():
    config = replay.get_config()
    config.model.kwargs.encoder_depths = [1]
    config.model.kwargs.encoder_num_heads = [4]
    config.model.kwargs.decoder_depths = [1]
    config.model.kwargs.decoder_num_heads = [4]
    config.data.builder_config.data_dir = {data_dir!r}
    config.trainer.max_steps = 10
    config.trainer.val_check_interval = 1000
    config.trainer.log_every_n_steps = 1
    config.callbacks.checkpoint.every_n_steps = 3
    config.callbacks.pacer = {{"type": "tests.test_reliability:Pacer", "sleep": 0.0, "hold_at": 0}}
    config.writers = {{"csv": {{"type": "csv"}}, "jsonl": {{"type": "jsonl"}}}}
    return config
"""


@pytest.mark.slow
def test_replay_buffer_survives_a_kill(tmp_path) -> None:
    """LoRA + replay: the buffer (the process's index and states under `checkpoints/replay/`)
    resumes exactly."""
    config = tmp_path / "replay_config.py"
    config.write_text(REPLAY_CONFIG.format(data_dir=str(tmp_path / "datasets")))
    reference = Job(config, tmp_path / "reference")
    assert reference.finish() == 0, reference.tail()
    workdir = tmp_path / "killed"
    job = Job(config, workdir, "--config.callbacks.pacer.hold_at=8")
    job.wait_for(lambda: job.progress() == 8 and _steps(workdir) == [3, 6])
    job.kill()
    assert job.finish() == -signal.SIGKILL
    step, _, meta, _ = _read_checkpoint(workdir)
    store = workdir / "checkpoints" / "replay" / "process_0"
    index = json.loads((store / "index" / f"{step}.json").read_text())
    assert meta["strategy"]["replay_processes"] == 1 and index["entries"], "the buffer is saved"
    assert all(
        (store / "states" / f"{n}.npz").exists() for e in index["entries"] for n in e["states"]
    )
    rerun = Job(config, workdir)
    assert rerun.finish() == 0, rerun.tail()
    _assert_same_result(workdir, tmp_path / "reference")


# --------------------------------------------------------------------------------------------------
# In-process: a tiny model, the Trainer and its callbacks
# --------------------------------------------------------------------------------------------------

OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-3, "warmup_steps": 2, "schedule": "constant", "weight_decay": 0.01}
)
ONE_STAGE = {
    "encoder_depths": (1,),
    "encoder_num_heads": (2,),
    "decoder_depths": (1,),
    "decoder_num_heads": (2,),
}


def _model(**overrides: Any):
    """tests.helpers.tiny_model with one Swin stage: the same code paths, faster to compile."""
    return tiny_model(**{**ONE_STAGE, **overrides})


def _example(model, seed: int, time: str = "2020-06-01T12:00"):
    """(inputs, [target]): history 2 and one target 6 h later."""
    series = random_batch(model, history=3, seed=seed, time=time)
    inputs = series.replace(
        surf_vars={n: v[:, :2] for n, v in series.surf_vars.items()},
        atmos_vars={n: v[:, :2] for n, v in series.atmos_vars.items()},
    )
    target = series.replace(
        surf_vars={n: v[:, 2:] for n, v in series.surf_vars.items()},
        atmos_vars={n: v[:, 2:] for n, v in series.atmos_vars.items()},
    )
    target = target.replace(
        metadata=target.metadata.replace(time=np.asarray(target.metadata.time) + 360)
    )
    return inputs, [target]


def _trainer(model, workdir, *, max_steps, callbacks=(), **kwargs) -> Trainer:
    strategy = RolloutStrategy(model, steps=1, backprop="all")
    return Trainer(
        strategy,
        optimizer=OPTIM,
        callbacks=list(callbacks),
        workdir=workdir,
        max_steps=max_steps,
        log_every_n_steps=1,
        **kwargs,
    )


def _data(model, n: int = 3) -> InMemoryData:
    return InMemoryData([_example(model, seed) for seed in range(n)], seed=3)


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: np.array(x, copy=True), tree)


class _SignalAt(Callback):
    def __init__(self, step: int, sig: int = signal.SIGTERM):
        self.step, self.sig = step, sig

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


def test_preemption_callback_saves_stops_and_restores_the_handlers(tmp_path) -> None:
    """In-process: SIGTERM during step 4 -> a checkpoint of step 4 (not a periodic one), then stop.
    (Resuming from it bit-identically: the SIGTERM test on main.py above.)"""
    model = _model()
    before = signal.getsignal(signal.SIGTERM)
    preemption = Preemption()
    trainer = _trainer(
        model,
        tmp_path,
        max_steps=6,
        callbacks=[ModelCheckpoint(every_n_steps=3), _SignalAt(4), preemption],
    )
    trainer.fit(_data(model))
    assert (
        trainer.global_step == 4 and preemption.received == "SIGTERM" and preemption.stopped_at == 4
    )
    assert _steps(tmp_path) == [3, 4]
    step, state, meta, _ = _read_checkpoint(tmp_path)
    assert step == meta["global_step"] == 4
    _assert_same_tree(state, _numpy(trainer.state))
    assert signal.getsignal(signal.SIGTERM) is before, "the previous handler is back after fit"

    with pytest.raises(ValueError, match="Unknown signal"):
        Preemption(signals=("SIGNOPE",))


def test_a_second_signal_does_what_it_would_have_done(tmp_path) -> None:
    """Ctrl-C twice still interrupts: the second SIGINT goes to the previous handler."""
    from types import SimpleNamespace

    preemption = Preemption(signals=("SIGINT",))
    before = signal.getsignal(signal.SIGINT)
    preemption.setup(SimpleNamespace(), "fit")
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert preemption.received == "SIGINT"
        if before is signal.default_int_handler:
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        preemption.teardown(SimpleNamespace(), "fit")
    assert signal.getsignal(signal.SIGINT) is before


def test_preemption_waits_for_every_process(monkeypatch) -> None:
    """Multi-host: a process that was not signalled stops with the others (an all-gather of
    flags)."""
    from types import SimpleNamespace

    from jax.experimental import multihost_utils

    gathered = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(
        multihost_utils,
        "process_allgather",
        lambda x: gathered.append(int(x)) or np.array([int(x), 1]),
    )
    trainer = SimpleNamespace(
        global_step=7, checkpoint_callback=None, fast_dev_run=False, should_stop=False
    )
    preemption = Preemption(sync_every_n_steps=1)
    preemption.on_train_batch_end(trainer, {}, None, 0)
    assert gathered == [0] and trainer.should_stop and preemption.stopped_at == 7

    quiet = SimpleNamespace(
        global_step=7, checkpoint_callback=None, fast_dev_run=False, should_stop=False
    )
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.array([0, 0]))
    Preemption(sync_every_n_steps=2).on_train_batch_end(quiet, {}, None, 0)  # step 7: no sync point
    Preemption().on_train_batch_end(quiet, {}, None, 0)
    assert not quiet.should_stop


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run with checkpoints at steps 2 and 4 (copy the folder before damaging it)."""
    model = _model()
    workdir = tmp_path_factory.mktemp("two_checkpoints")
    trainer = _trainer(
        model,
        workdir,
        max_steps=4,
        callbacks=[ModelCheckpoint(every_n_steps=2, async_checkpointing=False)],
    )
    trainer.fit(_data(model))
    trainer.checkpoint_callback.close()
    assert _steps(workdir) == [2, 4]
    return model, workdir


def _copy(workdir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def _restore(model, workdir: Path, callbacks=()) -> Trainer:
    """A fresh trainer that loads the latest checkpoint of `workdir` (no training)."""
    checkpoint = ModelCheckpoint(every_n_steps=2)
    trainer = _trainer(model, workdir, max_steps=4, callbacks=[checkpoint, *callbacks])
    try:
        trainer.load(_data(model))
    finally:
        checkpoint.close()
    return trainer


def _largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate_array_file(step_dir: Path) -> str:
    path = _largest_file(step_dir / "state")
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return str(path)


def _delete_array_files(step_dir: Path) -> str:
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.unlink()
    return "state/**/d/*"


def _corrupt_meta(step_dir: Path) -> str:
    path = step_dir / "meta" / "metadata"
    path.write_text(path.read_text()[:40])  # a JSON document cut short
    return str(path)


def _delete_meta(step_dir: Path) -> str:
    shutil.rmtree(step_dir / "meta")
    return "meta"


@pytest.mark.parametrize(
    "damage", [_truncate_array_file, _delete_array_files, _corrupt_meta, _delete_meta]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step(
    two_checkpoints, tmp_path, caplog, damage
) -> None:
    model, original = two_checkpoints
    workdir = _copy(original, tmp_path)
    expected = _read_checkpoint(workdir, 2)[1]
    damage(workdir / "checkpoints" / "4")

    with caplog.at_level(logging.WARNING, logger="trainers.checkpointing"):
        trainer = _restore(model, workdir)
    assert trainer.global_step == 2
    _assert_same_tree(_numpy(trainer.state), expected)
    damaged = str(workdir / "checkpoints" / "4")
    assert any(
        damaged in r.getMessage() and "Cannot restore" in r.getMessage() for r in caplog.records
    ), caplog.text
    # Nothing deleted: the damaged step is kept aside, and step 4 can be written again.
    assert (workdir / "checkpoints" / "damaged" / "4").is_dir() and _steps(workdir) == [2]
    if damage is not _truncate_array_file:
        return
    resumed = _trainer(model, workdir, max_steps=4, callbacks=[ModelCheckpoint(every_n_steps=2)])
    resumed.fit(_data(model))
    assert _steps(workdir) == [2, 4]
    _assert_same_tree(_read_checkpoint(workdir)[1], _read_checkpoint(original)[1])


def test_an_unfinished_write_is_ignored(two_checkpoints, tmp_path, caplog) -> None:
    """A write killed before Orbax's commit (its rename) leaves `<step>.orbax-checkpoint-tmp`."""
    model, original = two_checkpoints
    workdir = _copy(original, tmp_path)
    checkpoints = workdir / "checkpoints"
    (checkpoints / "4").rename(checkpoints / f"4{ocp.utils.TMP_DIR_SUFFIX}")
    (checkpoints / f"4{ocp.utils.TMP_DIR_SUFFIX}" / "commit_success.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="trainers.checkpointing"):
        assert _restore(model, workdir).global_step == 2
    assert (
        f"Ignoring incomplete checkpoint writes in {checkpoints}: 4{ocp.utils.TMP_DIR_SUFFIX}"
        in caplog.text
    )


def test_no_restorable_checkpoint_is_a_clear_error(two_checkpoints, tmp_path) -> None:
    model, original = two_checkpoints
    workdir = _copy(original, tmp_path)
    for step in (2, 4):
        _corrupt_meta(workdir / "checkpoints" / str(step))
    with pytest.raises(
        RuntimeError, match="No checkpoint in .*checkpoints could be restored"
    ) as error:
        _restore(model, workdir)
    assert "/checkpoints/2" in str(error.value) and "/checkpoints/4" in str(error.value)
    assert _steps(workdir) == [2, 4], "nothing moved or deleted"


def test_a_checkpoint_of_another_model_is_refused(two_checkpoints, tmp_path) -> None:
    _, original = two_checkpoints
    workdir = _copy(original, tmp_path)
    other = _model(atmos_vars=("z", "u", "v"))
    with pytest.raises(
        ValueError, match=r"atmos_vars \('z', 'u', 'v', 't', 'q'\) vs \('z', 'u', 'v'\)"
    ):
        _restore(other, workdir)
    with pytest.raises(ValueError, match=r"embed_dim 32 vs 64"):
        _restore(_model(embed_dim=64), workdir)
    assert _steps(workdir) == [2, 4], "a different model is no reason to fall back or move anything"


def test_checkpoints_without_a_model_signature_still_restore(two_checkpoints, tmp_path) -> None:
    model, original = two_checkpoints
    workdir = _copy(original, tmp_path)
    path = workdir / "checkpoints" / "4" / "meta" / "metadata"
    meta = json.loads(path.read_text())
    assert (
        meta["model"]["atmos_vars"] == ["z", "u", "v", "t", "q"]
        and meta["model"]["params"]["digest"]
    )
    del meta["model"]
    path.write_text(json.dumps(meta))
    assert _restore(model, workdir).global_step == 4


def test_rewind_drops_rows_after_the_restored_step(tmp_path) -> None:
    from callbacks.writers import CsvWriter, JsonlWriter, MultiWriter

    csv_writer, jsonl_writer = CsvWriter(tmp_path / "m.csv"), JsonlWriter(tmp_path / "m.jsonl")
    jsonl_writer.write_hparams({"lr": 1.0})
    for step in range(1, 6):
        csv_writer.write_scalars(step, {"train/loss": float(step)})
        jsonl_writer.write_scalars(step, {"train/loss": float(step)})
    csv_writer.flush()
    with open(tmp_path / "m.csv", "a") as f:
        f.write("6,train/lo")  # killed mid-row
    MultiWriter([csv_writer, jsonl_writer]).rewind(3)
    csv_writer.write_scalars(4, {"train/loss": 4.5})
    jsonl_writer.write_scalars(4, {"train/loss": 4.5})
    csv_writer.close()
    jsonl_writer.close()
    assert _losses(tmp_path / "m.csv") == [(1, "1.0"), (2, "2.0"), (3, "3.0"), (4, "4.5")]
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert "hparams" in records[0] and [r["step"] for r in records[1:]] == [1, 2, 3, 4]
    # Nothing is lost: the rows taken out are kept next to the file.
    dropped = (tmp_path / "m.csv.dropped").read_text().splitlines()
    assert [line.split(",")[0] for line in dropped] == ["4", "5", "6"]
    # A run that restarts from scratch (no checkpoint yet) takes out every step.
    JsonlWriter(tmp_path / "m.jsonl").rewind(-1)
    assert list(json.loads((tmp_path / "m.jsonl").read_text())) == ["hparams", "wall_time"]


# --------------------------------------------------------------------------------------------------
# Numerical faults
# --------------------------------------------------------------------------------------------------


def _with_nan(example, variable: str = "u"):
    inputs, targets = example
    values = np.array(inputs.atmos_vars[variable], copy=True)
    values[0, -1, 1, 3, 5] = np.nan
    return inputs.replace(atmos_vars={**inputs.atmos_vars, variable: values}), targets


class _RecordParams(Callback):
    def __init__(self):
        self.params: dict[int, Any] = {}

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.params[trainer.global_step] = _numpy(trainer.state.params)


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nan_input_skips_the_update_or_stops_and_the_last_checkpoint_stays_good(
    tmp_path, caplog, policy
) -> None:
    model = _model()
    good = [_example(model, seed, time="2020-06-01T12:00") for seed in range(3)]
    bad = _with_nan(_example(model, 7, time="2021-03-04T18:00"))
    data = InMemoryData(
        [good[0], good[1], bad, good[2]], shuffle=False
    )  # the NaN is in step 3's input
    record = _RecordParams()
    callbacks = [ModelCheckpoint(every_n_steps=2), GradStop(on_nonfinite=policy), record]
    trainer = _trainer(model, tmp_path, max_steps=4, callbacks=callbacks)
    with caplog.at_level(logging.WARNING, logger="callbacks.grad_stop"):
        trainer.fit(data)

    message = next(
        r.getMessage() for r in caplog.records if "Non-finite gradient" in r.getMessage()
    )
    assert "at step 3" in message and "input u" in message and "2021-03-04" in message, message
    _assert_same_tree(record.params[3], record.params[2])  # the update was skipped
    for leaf in jax.tree_util.tree_leaves(record.params[3]):
        assert np.all(np.isfinite(leaf))
    if policy == "skip":
        assert trainer.global_step == 4 and not trainer.should_stop
        assert any(
            np.any(a != b)
            for a, b in zip(
                jax.tree_util.tree_leaves(record.params[4]),
                jax.tree_util.tree_leaves(record.params[3]),
            )
        )
        assert _steps(tmp_path) == [2, 4]
    else:
        assert trainer.global_step == 3 and trainer.should_stop
        assert "Stopping training" in message
        # The last good checkpoint is intact; the one written on stopping holds the same weights.
        assert _steps(tmp_path) == [2, 3]
        state2 = _read_checkpoint(tmp_path, 2)[1]
        _assert_same_tree(state2["params"], record.params[2])
        _, state3, meta3, _ = _read_checkpoint(tmp_path, 3)
        _assert_same_tree(state3["params"], record.params[2])
        grad_stop = meta3["callbacks"][callbacks[1].state_key]
        assert grad_stop["events"][0]["culprits"] == ["input u"]
        resumed = _restore(model, tmp_path)
        assert resumed.global_step == 3
        _assert_same_tree(_numpy(resumed.state.params), record.params[2])
