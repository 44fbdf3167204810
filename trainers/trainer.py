"""The Trainer: one loop for fit / validate / test / predict, driven by callbacks.

Python control flow lives here, on the host; everything numerical is one pure, jitted strategy
step with the `TrainState` donated. Lightning's knobs keep Lightning's meaning:

* `max_steps` / `max_epochs` bound training (steps are optimiser steps); `val_check_interval`
  (steps) runs validation during an epoch, otherwise it runs at each epoch end;
  `limit_{train,val,test}_batches` cap batches per epoch; `fast_dev_run` runs one train and one
  validation batch and writes nothing;
* `accumulate_grad_batches` averages gradients over micro-batches (`optax.MultiSteps`);
  `gradient_clip_val` clips by global norm;
* `precision="bf16-mixed"` runs the backbone in bfloat16 with float32 master parameters;
  `remat` rematerialises: `"backbone"` every Swin block and the level Perceivers (the memory
  microsoft-aurora's activation checkpointing saves), `"stages"` also whole backbone stages (one
  more backbone forward pass per step), `"all"` also each rollout step;
* `log_every_n_steps` sets how often metrics are fetched from the device and written;
* `mesh` (a `jax.sharding.Mesh` with axes `data`, `fsdp`; see `trainers.sharding`) shards the
  state (FSDP rules, `sharding_rules` overrides) and the batch; the steps are jitted with those
  in/out shardings. Without a mesh everything runs on the default device.

Callbacks stop training with `trainer.should_stop = True` and log with `trainer.log_metrics`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aurora.batch import Batch
from callbacks.base import MEASUREMENTS, Callback
from trainers import sharding
from trainers.data import DataSource, Example
from trainers.state import TrainState
from trainers.strategies.base import OUTPUTS, Strategy, stack_targets

__all__ = ["Trainer"]

log = logging.getLogger(__name__)

PRECISIONS = ("32", "bf16-mixed")
REMAT = ("none", "backbone", "stages", "all")


def _to_device_batch(example: Example) -> tuple[Batch, Batch]:
    """Host example -> `(inputs, stacked targets)` with int32 time and rollout_step leaves."""
    inputs, targets = example

    def fix(batch: Batch) -> Batch:
        meta = batch.metadata
        return batch.replace(
            metadata=meta.replace(
                time=np.asarray(meta.time, np.int32),
                rollout_step=np.asarray(meta.rollout_step, np.int32),
            )
        )

    return fix(inputs), stack_targets([fix(t) for t in targets])


class Trainer:
    """Fit, validate, test and predict with a strategy; see the module docstring for the knobs."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        optimizer: Any,
        callbacks: Sequence[Callback] = (),
        writers: Sequence[Any] = (),
        workdir: str | Path | None = None,
        config: Any = None,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        val_check_interval: int | None = None,
        limit_train_batches: int | None = None,
        limit_val_batches: int | None = None,
        limit_test_batches: int | None = None,
        fast_dev_run: bool = False,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        precision: str = "32",
        remat: str = "none",
        log_every_n_steps: int = 10,
        seed: int = 0,
        init_params: Any = None,
        mesh: Any = None,
        sharding_rules: Sequence[tuple[str, Sequence[str | None]]] = (),
        min_shard_size: int = 2**18,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}.")
        if remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, not {remat!r}.")
        if max_steps is None and max_epochs is None and not fast_dev_run:
            raise ValueError("Set max_steps or max_epochs.")
        unknown = {m for cb in callbacks for m in cb.measurements} - set(MEASUREMENTS)
        if unknown:
            raise ValueError(
                f"Unknown in-step measurements {sorted(unknown)}; known: {sorted(MEASUREMENTS)}."
            )

        self.strategy = strategy.with_model_options(precision=precision, remat=remat)
        self.optimizer_config = optimizer
        self.callbacks = list(callbacks)
        self.writers = list(writers)
        self.workdir = Path(workdir) if workdir is not None else None
        self.config = config
        self.fast_dev_run = fast_dev_run
        self.max_steps = 1 if fast_dev_run else max_steps
        self.max_epochs = max_epochs
        self.val_check_interval = 1 if fast_dev_run else val_check_interval
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = 1 if fast_dev_run else limit_val_batches
        self.limit_test_batches = limit_test_batches
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.log_every_n_steps = log_every_n_steps
        self.seed = seed
        self.init_params = init_params
        self.mesh = mesh
        self.sharding_rules = tuple(sharding_rules)
        self.min_shard_size = min_shard_size
        self._state_shardings: Any = None

        self.state: TrainState | None = None
        self.controls: dict[str, Any] = strategy.default_controls()
        self.global_step = 0
        self.current_epoch = 0
        self.batch_idx = 0
        self.should_stop = False
        self.callback_metrics: dict[str, float] = {}
        self.is_global_zero = jax.process_index() == 0
        self.estimated_stepping_batches: int | None = self.max_steps
        self._schedule: optax.Schedule | None = None
        self._train_iterator: Any = None
        self._resume: dict[str, Any] | None = None
        self._compiled: dict[str, Any] = {}

    # --- small services for callbacks -------------------------------------------------------------
    def learning_rate(self) -> float:
        """The learning rate the next optimiser step uses."""
        return (
            float(self._schedule(self.global_step)) if self._schedule is not None else float("nan")
        )

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Write scalars to every writer (process 0 only) at `step` (default: the global step)."""
        if not self.is_global_zero or not metrics:
            return
        step = self.global_step if step is None else int(step)
        for writer in self.writers:
            writer.write_scalars(step, metrics)

    def data_state(self) -> dict[str, Any]:
        """Where the training data iterator stands (saved in checkpoints)."""
        iterator_state = (
            self._train_iterator.get_state() if self._train_iterator is not None else None
        )
        return {
            "epoch": self.current_epoch,
            "batch_idx": self.batch_idx,
            "iterator": iterator_state,
        }

    @property
    def checkpoint_callback(self) -> Any:
        from callbacks.checkpoint import ModelCheckpoint

        return next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    # --- state and compiled steps -----------------------------------------------------------------
    def _measurements(self) -> tuple[str, ...]:
        return tuple(sorted({m for cb in self.callbacks for m in cb.measurements}))

    def _setup_state(self, example: Example) -> None:
        """Build the optimiser and the state (or restore the latest checkpoint)."""
        tx, self._schedule = self.strategy.make_optimizer(
            self.optimizer_config,
            self.max_steps,
            gradient_clip_val=self.gradient_clip_val,
            accumulate_grad_batches=self.accumulate_grad_batches,
        )
        if self.state is None:
            inputs, _ = _to_device_batch(example)
            state = self.strategy.init_state(
                jax.random.PRNGKey(self.seed), inputs, tx, self.init_params
            )
            if self.mesh is not None:
                self._state_shardings = sharding.state_shardings(
                    state, self.mesh, self.sharding_rules, self.min_shard_size
                )
                state = sharding.put_state(state, self._state_shardings)
            self.state = state
        checkpoint = self.checkpoint_callback
        if checkpoint is not None and not self.fast_dev_run:
            self._resume = checkpoint.restore_latest(self)

    def _device_batch(self, example: Example) -> tuple[Batch, Batch]:
        """Host example -> the step's batch: on the mesh (this process's rows of the global batch)
        or on the default device."""
        batch = _to_device_batch(example)
        return sharding.shard_batch(batch, self.mesh) if self.mesh is not None else batch

    def _jit(self, name: str, fn: Any, batch: tuple[Batch, Batch], train: bool) -> Any:
        """`fn(state, batch, controls)` jitted once, with the mesh's in/out shardings if any."""
        if name not in self._compiled:
            kwargs: dict[str, Any] = {"donate_argnums": (0,)} if train else {}
            if self.mesh is not None:
                replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
                batch_shardings = jax.tree_util.tree_map(lambda x: x.sharding, batch)
                kwargs["in_shardings"] = (self._state_shardings, batch_shardings, replicated)
                kwargs["out_shardings"] = (
                    (self._state_shardings, replicated) if train else replicated
                )
            self._compiled[name] = jax.jit(fn, **kwargs)
        return self._compiled[name]

    def _train_step(self, batch: tuple[Batch, Batch]) -> Any:
        step = functools.partial(self.strategy.train_step, measurements=self._measurements())
        return self._jit("train", step, batch, train=True)

    def _eval_step(self, batch: tuple[Batch, Batch]) -> Any:
        return self._jit("eval", self.strategy.eval_step, batch, train=False)

    def _agree_to_stop(self) -> bool:
        """Every process stops at the same step if any callback on any process asked to."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            self.should_stop = bool(
                np.any(multihost_utils.process_allgather(np.asarray(self.should_stop)))
            )
        return self.should_stop

    # --- fit --------------------------------------------------------------------------------------
    def fit(self, train_data: DataSource, val_data: DataSource | None = None) -> TrainState:
        """Train until `max_steps` / `max_epochs` / `should_stop`; resumes from the workdir's latest
        checkpoint when a `ModelCheckpoint` callback has one."""
        self._call("setup", "fit")
        try:
            first = next(iter(train_data.iterator(0)))
            self._setup_state(first)
            self._call("on_fit_start")
            self._call("on_train_start")
            self._fit_loop(train_data, val_data)
            self._call("on_train_end")
            self._call("on_fit_end")
        except BaseException as e:
            self._call("on_exception", e)
            raise
        finally:
            self._call("teardown", "fit")
        return self.state

    def _epoch_done(self) -> bool:
        return self.max_epochs is not None and self.current_epoch >= self.max_epochs

    def _steps_done(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _fit_loop(self, train_data: DataSource, val_data: DataSource | None) -> None:
        resume = self._resume or {}
        self.current_epoch = int(resume.get("epoch", 0))
        while not (self.should_stop or self._steps_done() or self._epoch_done()):
            self._train_iterator = train_data.iterator(self.current_epoch)
            self.batch_idx = 0
            if resume.get("iterator") is not None:  # continue the interrupted epoch exactly
                self._train_iterator.set_state(resume["iterator"])
                self.batch_idx = int(resume.get("batch_idx", 0))
            resume = {}
            self._call("on_train_epoch_start")
            if not self._run_train_epoch(train_data, val_data):
                break
            self._call("on_train_epoch_end")
            if val_data is not None and self.val_check_interval is None:
                self.validate(val_data)
            self.current_epoch += 1

    def _run_train_epoch(self, train_data: DataSource, val_data: DataSource | None) -> bool:
        """Train over one epoch; False if training stopped before the epoch's data ran out.

        The strategy chooses the examples (`Strategy.train_examples`) and receives the step's
        host-bound outputs (`Strategy.on_step_outputs`) before any callback sees the step.
        """
        for example in self.strategy.train_examples(self, self._train_iterator, train_data):
            if self.limit_train_batches is not None and self.batch_idx >= self.limit_train_batches:
                break
            self._call("on_train_batch_start", example, self.batch_idx)
            self._call("on_before_optimizer_step")
            batch = self._device_batch(example)
            self.state, outputs = self._train_step(batch)(self.state, batch, self.controls)
            host_outputs = outputs.pop(OUTPUTS, None)
            if host_outputs is not None:
                self.strategy.on_step_outputs(self, host_outputs)
            self.batch_idx += 1
            if self.batch_idx % self.accumulate_grad_batches:
                continue  # a micro-batch: the optimiser steps once per group
            self.global_step += 1
            if self.global_step % self.log_every_n_steps == 0 or self.fast_dev_run:
                self._record(
                    {f"train/{k}": v for k, v in outputs.items()}, self.strategy.host_metrics()
                )
            self._call("on_train_batch_end", outputs, example, self.batch_idx - 1)
            if (
                val_data is not None
                and self.val_check_interval
                and self.global_step % self.val_check_interval == 0
            ):
                self.validate(val_data)
            if self._agree_to_stop() or self._steps_done():
                return False
        return True

    def _record(
        self, device_metrics: dict[str, Any], host_metrics: dict[str, float] | None = None
    ) -> None:
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        host |= {f"train/{k}": float(v) for k, v in (host_metrics or {}).items()}
        self.callback_metrics.update(host)
        if not self.fast_dev_run:
            self.log_metrics(host)

    # --- evaluation -------------------------------------------------------------------------------
    def load(self, data: DataSource) -> TrainState:
        """The state to evaluate or predict with: initial (or given) parameters, replaced by the
        workdir's latest checkpoint when a `ModelCheckpoint` callback has one."""
        if self.state is None:
            self._setup_state(next(iter(data.iterator(0))))
        return self.state

    def _evaluate(self, data: DataSource, stage: str, limit: int | None) -> dict[str, float]:
        self.load(data)
        totals: dict[str, Any] = {}
        count = 0
        self._call(f"on_{stage}_epoch_start")
        for batch_idx, example in enumerate(data.iterator(0)):
            if limit is not None and batch_idx >= limit:
                break
            self._call(f"on_{stage}_batch_start", example, batch_idx)
            batch = self._device_batch(example)
            outputs = self._eval_step(batch)(self.state, batch, self.controls)
            totals = outputs if not totals else jax.tree_util.tree_map(jnp.add, totals, outputs)
            count += 1
            self._call(f"on_{stage}_batch_end", outputs, example, batch_idx)
        prefix = {"validation": "val", "test": "test"}[stage]
        means = (
            {f"{prefix}/{k}": float(v) / count for k, v in jax.device_get(totals).items()}
            if count
            else {}
        )
        self.callback_metrics.update(means)
        if not self.fast_dev_run:
            self.log_metrics(means)
        self._call(f"on_{stage}_epoch_end")
        return means

    def validate(self, data: DataSource) -> dict[str, float]:
        """Mean metrics over the validation data (`val/...`), also in `callback_metrics`."""
        self._call("on_validation_start")
        metrics = self._evaluate(data, "validation", self.limit_val_batches)
        self._call("on_validation_end")
        return metrics

    def test(self, data: DataSource) -> dict[str, float]:
        """Mean metrics over the test data (`test/...`)."""
        self._call("setup", "test")
        try:
            self._call("on_test_start")
            metrics = self._evaluate(data, "test", self.limit_test_batches)
            self._call("on_test_end")
        finally:
            self._call("teardown", "test")
        return metrics

    def predict(self, data: DataSource, steps: int = 1) -> Iterable[list[Batch]]:
        """Roll out `steps` predictions from every input; yields host-side predictions per batch."""
        from aurora.rollout import ModelStep, rollout

        self._call("setup", "predict")
        try:
            self.load(data)
            step = ModelStep(self.strategy.model)  # compiled once, not once per batch
            self._call("on_predict_start")
            for batch_idx, example in enumerate(data.iterator(0)):
                self._call("on_predict_batch_start", example, batch_idx)
                inputs, _ = _to_device_batch(example)
                preds = [p.to_numpy() for p in rollout(step, self.state.params, inputs, steps)]
                self._call("on_predict_batch_end", preds, example, batch_idx)
                yield preds
            self._call("on_predict_end")
        finally:
            self._call("teardown", "predict")
