"""The Trainer: one loop for fit / validate / test / predict, driven by callbacks.

Python control flow lives here, on the host; everything numerical is one pure, jitted strategy
step with the `TrainState` donated. The knobs keep PyTorch Lightning's meaning (see `Trainer`).
The Trainer also owns checkpoints (`trainers.checkpointing`): `save_checkpoint` writes one into
an Orbax manager, and fit / validate / test / predict start from the checkpoint `ckpt_path` names:
by default the latest of the `ModelCheckpoint` callback's directory, so re-running a command
resumes where it stopped.

Callbacks stop training with `trainer.should_stop = True` and log with `trainer.log_metrics`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from clu import metrics

from aurora.batch import Batch
from callbacks.base import MEASUREMENTS, Callback
from trainers import sharding
from trainers.checkpointing import CheckpointConnector
from trainers.data import DataSource, Example, FirstBatches
from trainers.lead_time import check_lead_times, uses_variable_lead_time
from trainers.models import is_stochastic
from trainers.state import TrainState
from trainers.strategies.base import OUTPUTS, Strategy, stack_targets

__all__ = ["Trainer"]

log = logging.getLogger(__name__)

PRECISIONS = ("32", "bf16-mixed", "bf16-true")
GRADIENT_CLIP_ALGORITHMS = ("norm", "value")
CKPT_PATHS = ("last", "best")
"""The named `ckpt_path`s; any other string is the path of one checkpoint."""
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


def _check_time_step(model: Any, example: Example) -> None:
    """Refuse data whose targets are not one model time step apart (e.g. Aurora12h on 6-hourly
    data), which would otherwise train silently against the wrong targets."""
    inputs, targets = example
    timestep = getattr(model, "timestep", None)
    if timestep is None or not len(targets):
        return
    if uses_variable_lead_time(model):  # the last target may be at another lead
        check_lead_times(model, inputs, targets)
        return
    model_minutes = timestep.total_seconds() / 60
    gap = np.asarray(targets[0].metadata.time, np.int64) - np.asarray(
        inputs.metadata.time, np.int64
    )
    data_minutes = {int(m) for m in np.ravel(gap)}
    if data_minutes != {int(model_minutes)}:
        data_hours = ", ".join(f"{m / 60:g}" for m in sorted(data_minutes))
        raise ValueError(
            f"The model steps {model_minutes / 60:g} h ({type(model).__name__}.timestep) but the "
            f"data's first target is {data_hours} h after its input: set the data's step to the "
            f"model's (config: data.step_hours={model_minutes / 60:g}) or use a model with a "
            f"{data_hours} h time step."
        )


def _check_limit(name: str, value: int | float | None) -> None:
    """A `limit_*_batches` / `overfit_batches` value: None, an int >= 0 or a fraction in [0, 1]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be None, a number of batches or a fraction, not {value!r}.")
    if isinstance(value, float) and value > 1:
        raise ValueError(f"{name}={value}: a fraction of the batches must be in [0, 1].")


def _num_batches(name: str, limit: int | float | None, data: Any) -> int | None:
    """The batches `limit` allows from `data`: an int is a count, a float a fraction of
    `len(data)` (rounded down, as Lightning does); None or 1.0: all of them (None)."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return None
    if isinstance(limit, int):
        return limit
    total = _length(name, limit, data)
    batches = int(total * limit)
    if limit > 0 and batches == 0:
        raise ValueError(f"{name}={limit} of {total} batches is none: give at least 1 batch.")
    return batches


def _length(name: str, fraction: float, data: Any) -> int:
    """`len(data)`, which the fraction `name=fraction` is a fraction of."""
    try:
        return len(data)
    except TypeError:
        raise ValueError(
            f"{name}={fraction} is a fraction of the data's batches, but {type(data).__name__} "
            "has no len(): give a number instead."
        ) from None


@jax.jit
def _accumulate(
    averages: dict[str, metrics.Average] | None, outputs: dict[str, jax.Array]
) -> dict[str, metrics.Average]:
    """One evaluation batch's scalar metrics merged into the running `clu.metrics.Average`s (None:
    the first batch), in one device program."""
    batch = {k: metrics.Average.from_model_output(v) for k, v in outputs.items()}
    return batch if averages is None else {k: averages[k].merge(m) for k, m in batch.items()}


class _EvalHooks(NamedTuple):
    """The callback hooks of one evaluation loop (validation or test), named where built."""

    epoch_start: Callable[[Callback], Any]
    batch_start: Callable[[Callback, Any, int], Any]
    batch_end: Callable[[Callback, Any, Any, int], Any]
    epoch_end: Callable[[Callback], Any]


class Trainer:
    """Fit, validate, test and predict with a strategy.

    Args:
        strategy: what one step computes (loss, rollout, LoRA, replay); see `trainers.strategies`.
        optimizer: the optimiser config given to `strategy.make_optimizer`.
        callbacks: `Callback`s, called in this order at every hook.
        writers: metric writers (`callbacks.writers.MetricWriter`); used on process 0 only.
        workdir: the run's directory (default home of checkpoints).
        config: the run's config, saved in checkpoints.
        max_steps: training stops after this many optimiser steps.
        max_epochs: training stops after this many epochs.
        min_steps: a stop asked for earlier (`should_stop`, e.g. by `EarlyStopping`) waits until
            this many optimiser steps are done; a stop every process already agreed on
            (`stop_agreed`: `Preemption`) still takes effect at once.
        min_epochs: likewise, until this many epochs are done.
        val_check_interval: an int: validate every this many optimiser steps, counted across
            epochs (Lightning's int with `check_val_every_n_epoch=None`); a float in (0, 1]: that
            fraction of an epoch's steps (0.25: four times an epoch; needs data with a `len`);
            None: at each epoch's end.
        check_val_every_n_epoch: epoch-end and fractional validation run only in every n-th epoch
            (the int `val_check_interval` ignores it); None only with an int `val_check_interval`.
        limit_train_batches: at most this many batches per epoch: an int, or a float fraction of
            the data's `len` (likewise `limit_val_batches`, `limit_test_batches`,
            `limit_predict_batches`; 0 validation batches: no validation).
        fast_dev_run: True or N: N optimiser steps (N x `accumulate_grad_batches` batches), N
            batches of validation (after step N), test and predict, no sanity check, and nothing
            written: no checkpoint, metric or hparams.
        num_sanity_val_steps: validation batches run before the first training step, to find a
            broken validation before hours of training (-1: all of `limit_val_batches`); their
            metrics are neither logged nor kept, and callbacks see `trainer.sanity_checking`.
            The default is 0, not Lightning's 2: each fit would otherwise compile the evaluation
            step before training starts (minutes at 0.25 degrees) and run two validation batches
            more, and the hook order and step counts that callbacks and tests rely on would change.
        overfit_batches: train on the first N batches (an int, or a fraction of the data's `len`)
            of epoch 0's order in every epoch, and validate on the same N; 0: off. Training and
            validation limits are ignored.
        accumulate_grad_batches: average gradients over this many micro-batches per optimiser
            step (`optax.MultiSteps`).
        gradient_clip_val: clip gradients to this value (None or 0: no clipping).
        gradient_clip_algorithm: `"norm"`, the global norm of the trained gradients, or
            `"value"`, each gradient entry to [-gradient_clip_val, gradient_clip_val].
        precision: `"32"`; `"bf16-mixed"` (backbone in bfloat16, float32 master parameters);
            `"bf16-true"` (parameters and optimiser state stored in bfloat16, half their float32
            memory; the backbone computes in bfloat16 as under "bf16-mixed").
        remat: rematerialisation, one of :data:`REMAT`: `"backbone"` every Swin block and the
            level Perceivers, `"stages"` also whole backbone stages, `"all"` also each rollout
            step.
        log_every_n_steps: how often metrics are fetched from the device and written. A logged
            step's metrics are fetched once the next step is queued, so that in the steady state
            the host waits for the device at most once per `log_every_n_steps` steps (callbacks
            such as `GradStop` and `ProgressBar` read the device at the same cadence).
        seed: the seed of the parameter initialisation and the state's RNG.
        init_params: parameters to start from instead of a random initialisation.
        ckpt_path: the checkpoint fit / validate / test / predict start from (each method may
            name another): `"last"`, the latest of the `ModelCheckpoint` callback's directory
            (none there: `init_params` or a fresh initialisation); `"best"`, the best of its
            `best/` by its `monitor`; the path of one checkpoint (`<directory>/<step>`, e.g.
            `checkpoints/best/400`); None: no checkpoint.
        mesh: a `jax.sharding.Mesh` with axes `data`, `fsdp` (see `trainers.sharding`): the state
            is sharded by FSDP rules (`sharding_rules` overrides, arrays under `min_shard_size`
            values replicated) and the batch along `data`. None: the default device.
    """

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
        min_steps: int | None = None,
        min_epochs: int | None = None,
        val_check_interval: int | float | None = None,
        check_val_every_n_epoch: int | None = 1,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        fast_dev_run: bool | int = False,
        num_sanity_val_steps: int = 0,
        overfit_batches: int | float = 0,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        precision: str = "32",
        remat: str = "none",
        log_every_n_steps: int = 10,
        seed: int = 0,
        init_params: Any = None,
        ckpt_path: str | Path | None = "last",
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
        if gradient_clip_algorithm not in GRADIENT_CLIP_ALGORITHMS:
            raise ValueError(
                f"gradient_clip_algorithm must be one of {GRADIENT_CLIP_ALGORITHMS}, not "
                f"{gradient_clip_algorithm!r}."
            )
        if isinstance(val_check_interval, float) and not 0 < val_check_interval <= 1:
            raise ValueError(
                f"val_check_interval={val_check_interval}: a fraction of an epoch is in (0, 1]."
            )
        if check_val_every_n_epoch is None and not isinstance(val_check_interval, int):
            raise ValueError(
                "check_val_every_n_epoch=None validates only every val_check_interval steps: give "
                "val_check_interval as an int."
            )
        limits = {
            "limit_train_batches": limit_train_batches,
            "limit_val_batches": limit_val_batches,
            "limit_test_batches": limit_test_batches,
            "limit_predict_batches": limit_predict_batches,
            "overfit_batches": overfit_batches,
        }
        for name, value in limits.items():
            _check_limit(name, value)
        fast_dev_run = int(fast_dev_run)
        if fast_dev_run < 0:
            raise ValueError("fast_dev_run must be a bool or a number of steps >= 0.")
        if fast_dev_run:  # Lightning's debugging flags
            max_steps, max_epochs = fast_dev_run, 1
            val_check_interval, check_val_every_n_epoch = fast_dev_run, 1
            limit_train_batches = fast_dev_run * accumulate_grad_batches
            limit_val_batches = limit_test_batches = limit_predict_batches = fast_dev_run
            num_sanity_val_steps = 0
        unknown = {m for cb in callbacks for m in cb.measurements} - set(MEASUREMENTS)
        if unknown:
            raise ValueError(
                f"Unknown in-step measurements {sorted(unknown)}; known: {sorted(MEASUREMENTS)}."
            )

        self.strategy = strategy.with_model_options(precision=precision, remat=remat)
        self.optimizer_config = optimizer
        from callbacks.checkpoint import ModelCheckpoint

        # Checkpoint callbacks run last at every hook, as in Lightning, so that what they save
        # holds the other callbacks' state after the same hook (EarlyStopping's latest check).
        self.callbacks = sorted(callbacks, key=lambda cb: isinstance(cb, ModelCheckpoint))
        self.writers = list(writers)
        self.workdir = Path(workdir) if workdir is not None else None
        self.config = config
        self.fast_dev_run = fast_dev_run
        """The number of fast_dev_run steps; 0 when off."""
        self.max_steps = max_steps
        self.max_epochs = max_epochs
        self.min_steps = min_steps
        self.min_epochs = min_epochs
        self.val_check_interval = val_check_interval
        self.check_val_every_n_epoch = check_val_every_n_epoch
        self.limit_train_batches = limit_train_batches
        self.limit_val_batches = limit_val_batches
        self.limit_test_batches = limit_test_batches
        self.limit_predict_batches = limit_predict_batches
        self.num_sanity_val_steps = num_sanity_val_steps
        self.overfit_batches = overfit_batches
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.precision = precision
        self.log_every_n_steps = log_every_n_steps
        self.seed = seed
        self.init_params = init_params
        self.ckpt_path = None if ckpt_path is None else str(ckpt_path)
        self.mesh = mesh
        self.sharding_rules = tuple(sharding_rules)
        self.min_shard_size = min_shard_size
        self._state_shardings: Any = None

        self.state: TrainState | None = None
        self.stage: str | None = None
        """The running entry point: "fit", "validate", "test", "predict" (None between them);
        "fit" also while `fit` validates (Lightning's `trainer.state.fn`)."""
        self.restored_checkpoint: Path | None = None
        """The checkpoint the state was last restored from, if any."""
        self.controls: dict[str, Any] = self.strategy.default_controls()
        self.global_step = 0
        self.current_epoch = 0
        self.batch_idx = 0
        self.should_stop = False
        self.validates_after_step = False
        """During `on_train_batch_end`: whether the step just taken is validated right after the
        hook (e.g. `ModelCheckpoint` then saves after that validation)."""
        self.sanity_checking = False
        """True while the `num_sanity_val_steps` batches run (Lightning's flag)."""
        self.stop_agreed = False
        """Set with `should_stop` by a callback whose stop every process already agreed on at
        this step (e.g. `Preemption`, after its own all-gather): it takes effect at once."""
        self.callback_metrics: dict[str, float] = {}
        self.is_global_zero = jax.process_index() == 0
        self.estimated_stepping_batches: int | None = self.max_steps
        self._schedule: optax.Schedule | None = None
        self._train_iterator: Any = None
        self._resume: dict[str, Any] | None = None
        self._compiled: dict[str, Any] = {}
        self._checkpoint_connector = CheckpointConnector(self)
        self._flush_writers_at_next_step = False
        self._pending_metrics: tuple[int, dict[str, Any], dict[str, float]] | None = None
        self._train_batches: int | None = None
        self._val_every_steps: int | None = None
        self._stop_deferred_logged = False
        self.logged_step: int | None = None
        """The step of the training metrics in `callback_metrics` (logged steps are fetched from
        the device one step late)."""

    # --- small services for callbacks -------------------------------------------------------------
    def learning_rate(self) -> float:
        """The learning rate the next optimiser step uses (computed on the CPU, so that asking
        never waits for an accelerator's queued steps)."""
        if self._schedule is None:
            return float("nan")
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return float(self._schedule(self.global_step))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Write scalars to every writer (on process 0 only).

        Args:
            metrics: `{tag: value}`, e.g. `{"train/loss": 0.5}`.
            step: the step to log at (default: the global step).
        """
        if not self.is_global_zero or not metrics or self.sanity_checking:
            return
        step = self.global_step if step is None else int(step)
        for writer in self.writers:
            writer.write_scalars(step, metrics)

    def data_state(self) -> dict[str, Any]:
        """Where the training data iterator stands, saved in checkpoints for an exact resume.

        Returns:
            `{"epoch": int, "batch_idx": int, "iterator": the iterator's state or None}`.
        """
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
        """The first `ModelCheckpoint` among the callbacks, or None."""
        from callbacks.checkpoint import ModelCheckpoint

        return next((cb for cb in self.callbacks if isinstance(cb, ModelCheckpoint)), None)

    # --- checkpoints ------------------------------------------------------------------------------
    def save_checkpoint(
        self, manager: Any, *, force: bool = False, metrics: dict[str, float] | None = None
    ) -> bool:
        """Write the current state as checkpoint `global_step` (asynchronously if `manager` is).

        The checkpoint holds what exact resumption needs (see `trainers.checkpointing`); the
        callbacks' `on_save_checkpoint` hooks may add to its `meta`. The metric writers are
        flushed first, and again before the next step, so that every row of the saved steps is on
        disk once the checkpoint exists.

        Args:
            manager: the `orbax.checkpoint.CheckpointManager` to write into (its owner, e.g.
                `ModelCheckpoint`, decides when and how many to keep).
            force: write even if `manager`'s save policy would skip this step.
            metrics: what `manager` ranks by, if it keeps the best, e.g. `{"val/loss": 0.3}`.

        Returns:
            Whether `manager` wrote the checkpoint.
        """
        self._fetch_metrics()
        self._flush_writers()
        self._flush_writers_at_next_step = True
        return self._checkpoint_connector.save(manager, force=force, metrics=metrics)

    def _flush_writers(self) -> None:
        for writer in self.writers:
            try:
                writer.flush()
            except Exception as e:
                log.warning("Could not flush %r: %s", writer, e)

    def _restore_checkpoint(self, fitting: bool, ckpt_path: str | None) -> None:
        """Restore the checkpoint `ckpt_path` names (see the class), if any.

        When `fitting`, the metric writers then forget the steps logged after the restored one (or
        every step, when there is no checkpoint), since the run logs them again.
        """
        if self.fast_dev_run or ckpt_path is None:
            return
        checkpoint = self.checkpoint_callback
        connector = self._checkpoint_connector
        if ckpt_path == "last":
            if checkpoint is None:
                return
            self._resume = connector.restore_latest(checkpoint.open(self))
        elif ckpt_path == "best":
            self._resume = connector.restore_path(self._best_checkpoint())
        else:
            self._resume = connector.restore_path(ckpt_path)
        if fitting and self.is_global_zero:
            step = self.global_step if self._resume is not None else -1
            for writer in self.writers:
                rewind = getattr(writer, "rewind", None)  # a CLU writer has none
                if rewind is not None:
                    rewind(step)

    def _best_checkpoint(self) -> Path:
        """The best checkpoint of the `ModelCheckpoint` callback (`ckpt_path="best"`)."""
        checkpoint = self.checkpoint_callback
        if checkpoint is None or not checkpoint.monitor:
            raise ValueError(
                'ckpt_path="best" needs a ModelCheckpoint callback with a monitor, e.g. '
                'ModelCheckpoint(monitor="val/loss") (config: callbacks.checkpoint.monitor).'
            )
        checkpoint.open(self)
        manager = checkpoint.best_manager
        manager.reload()
        step = manager.best_step()
        if step is None:
            raise FileNotFoundError(
                f'ckpt_path="best": {manager.directory} holds no checkpoint ranked by '
                f"{checkpoint.monitor!r} yet (best checkpoints are written after each validation "
                "during fit)."
            )
        return Path(manager.directory) / str(step)

    def _ckpt_path(self, ckpt_path: str | Path | None) -> str | None:
        return self.ckpt_path if ckpt_path is None else str(ckpt_path)

    @contextlib.contextmanager
    def _stage(self, stage: str) -> Iterator[None]:
        """Run an entry point: `setup` / `teardown` around it, `on_exception` if it raises."""
        self.stage = stage
        for cb in self.callbacks:
            cb.setup(self, stage)
        try:
            yield
        except GeneratorExit:  # a predict loop the caller stopped reading
            raise
        except BaseException as e:
            for cb in self.callbacks:
                cb.on_exception(self, e)
            raise
        finally:
            try:
                for cb in self.callbacks:
                    cb.teardown(self, stage)
            finally:
                self.stage = None

    # --- state and compiled steps -----------------------------------------------------------------
    def _measurements(self) -> tuple[str, ...]:
        return tuple(sorted({m for cb in self.callbacks for m in cb.measurements}))

    def _setup_state(self, example: Example, ckpt_path: str | None, fitting: bool = False) -> None:
        """Build the optimiser and the state, then restore the checkpoint `ckpt_path` names."""
        _check_time_step(self.strategy.model, example)
        tx, self._schedule = self.strategy.make_optimizer(
            self.optimizer_config,
            self.max_steps,
            gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
            accumulate_grad_batches=self.accumulate_grad_batches,
        )
        if self.state is None:
            self.state = self._init_state(_to_device_batch(example)[0], tx)
        self._restore_checkpoint(fitting, ckpt_path)

    def _init_state(self, inputs: Batch, tx: optax.GradientTransformation) -> TrainState:
        """The strategy's first state; on a mesh, created in its shardings (`sharding.jit_init`):
        never whole on one device or one host."""
        rng = jax.random.PRNGKey(self.seed)
        if self.mesh is None:
            return self._with_device_states(
                self._at_precision(self.strategy.init_state(rng, inputs, tx, self.init_params))
            )
        params = self.init_params
        if params is not None:  # given weights go where the state will hold them
            shardings = sharding.state_shardings(
                {"params": params}, self.mesh, self.sharding_rules, self.min_shard_size
            )["params"]
            params = sharding.put_state(params, shardings)
        # Only the batch's shapes matter to the initialisation: zeros made in the program, the
        # same on every process (each holds other rows), no batch embedded as a constant.
        shapes = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), jax.dtypes.canonicalize_dtype(np.result_type(x))
            ),
            inputs,
        )

        def init(params: Any) -> TrainState:
            batch = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            state = self._at_precision(self.strategy.init_state(rng, batch, tx, params))
            return self._with_device_states(state)

        create, self._state_shardings = sharding.jit_init(
            init,
            params,
            mesh=self.mesh,
            rules=self.sharding_rules,
            min_shard_size=self.min_shard_size,
        )
        return create(params)

    def _with_device_states(self, state: TrainState) -> TrainState:
        """`state` with the callbacks' device state (`Callback.init_device_state`) in
        `extras["callbacks"]`: sharded, donated and checkpointed with the rest of the state."""
        owned = {}
        for cb in self.callbacks:
            value = cb.init_device_state(self, state.params)
            if value is not None:
                owned[cb.device_state_key] = value
        return state.replace(extras={**state.extras, "callbacks": owned}) if owned else state

    def _at_precision(self, state: TrainState) -> TrainState:
        """Under "bf16-true", the parameters in bfloat16 and the optimiser state made anew from
        them (so that Adam's moments are bfloat16 too); otherwise `state` as it is."""
        if self.precision != "bf16-true":
            return state
        params = jax.tree_util.tree_map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            state.params,
        )
        return state.replace(params=params, opt_state=state.tx.init(params))

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
                fn = sharding.in_mesh(fn, self.mesh)
            self._compiled[name] = jax.jit(fn, **kwargs)
        return self._compiled[name]

    def _train_step(self, batch: tuple[Batch, Batch]) -> Any:
        step = functools.partial(self.strategy.train_step, measurements=self._measurements())
        return self._jit("train", step, batch, train=True)

    def _eval_step(self, batch: tuple[Batch, Batch]) -> Any:
        """The evaluation step; a stochastic model's noise comes from the trainer's `seed`
        (`Strategy.in_evaluation`), so validation and test losses are reproducible."""
        evaluating = self.strategy.in_evaluation(self.seed)
        return self._jit("eval", evaluating.eval_step, batch, train=False)

    def _agree_to_stop(self, now: bool = False) -> bool:
        """Every process stops at the same step if any callback on any process asked to.

        With several processes they agree (one all-gather) only every `log_every_n_steps` steps,
        at the last step and when `now` (an epoch's end), so that a stop asked for in between
        takes effect at the next of these steps.
        """
        if jax.process_count() == 1 or self.stop_agreed:
            return self.should_stop
        if not (now or self._steps_done() or self.global_step % self.log_every_n_steps == 0):
            return False
        from jax.experimental import multihost_utils

        self.should_stop = bool(
            np.any(multihost_utils.process_allgather(np.asarray(self.should_stop)))
        )
        return self.should_stop

    # --- fit --------------------------------------------------------------------------------------
    def fit(
        self,
        train_data: DataSource,
        val_data: DataSource | None = None,
        ckpt_path: str | Path | None = None,
    ) -> TrainState:
        """Train until `max_steps` / `max_epochs` / `should_stop`.

        Resumes from the checkpoint `ckpt_path` names (default the trainer's: the latest of the
        `ModelCheckpoint` callback's directory), on the same batches an uninterrupted run would
        have seen.

        Args:
            train_data: the training examples.
            val_data: validation examples (run every `val_check_interval` steps or each epoch).
            ckpt_path: `"last"`, `"best"` or a checkpoint's path (see the class); None: the
                trainer's `ckpt_path`.

        Returns:
            The final `TrainState`.
        """
        with self._stage("fit"):
            first = next(iter(train_data.iterator(0)))
            self._setup_state(first, self._ckpt_path(ckpt_path), fitting=True)
            train_data, val_data = self._fit_data(train_data, val_data)
            self._log_hyperparams()
            for cb in self.callbacks:
                cb.on_fit_start(self)
            if val_data is not None:
                self._sanity_check(val_data)
            for cb in self.callbacks:
                cb.on_train_start(self)
            self._fit_loop(train_data, val_data)
            for cb in self.callbacks:
                cb.on_train_end(self)
            for cb in self.callbacks:
                cb.on_fit_end(self)
        return self.state

    def _fit_data(
        self, train_data: DataSource, val_data: DataSource | None
    ) -> tuple[DataSource, DataSource | None]:
        """The data `fit` runs on (`overfit_batches`; no validation under `limit_val_batches=0`),
        with the batches per epoch and the fractional validation interval worked out."""
        self._train_batches = _num_batches(
            "limit_train_batches", self.limit_train_batches, train_data
        )
        if self.overfit_batches:
            n = _num_batches("overfit_batches", self.overfit_batches, train_data)
            if n is None:
                n = _length("overfit_batches", self.overfit_batches, train_data)
            train_data = FirstBatches(train_data, n)
            val_data = None if val_data is None else train_data
            self._train_batches = None
        elif val_data is not None and self._val_batches(val_data) == 0:
            val_data = None
        self._val_every_steps = None
        if isinstance(self.val_check_interval, float):
            batches = self._train_batches
            if batches is None:
                batches = _length("val_check_interval", self.val_check_interval, train_data)
            steps = batches // self.accumulate_grad_batches
            self._val_every_steps = max(1, int(steps * self.val_check_interval))
        return train_data, val_data

    def _val_batches(self, data: DataSource) -> int | None:
        if self.overfit_batches:
            return None
        return _num_batches("limit_val_batches", self.limit_val_batches, data)

    def _log_hyperparams(self) -> None:
        """The run's config to every writer, once per fit (Lightning's `log_hyperparams`); not
        under `fast_dev_run`."""
        if self.config is None or self.fast_dev_run or not self.is_global_zero:
            return
        for writer in self.writers:
            writer.write_hparams(self.config)

    def _sanity_check(self, val_data: DataSource) -> None:
        """Run `num_sanity_val_steps` validation batches; their metrics are not kept."""
        limit = self._val_batches(val_data)
        steps = limit if self.num_sanity_val_steps < 0 else self.num_sanity_val_steps
        if limit is not None and steps is not None:
            steps = min(steps, limit)
        if steps == 0:
            return
        kept = dict(self.callback_metrics)
        self.sanity_checking = True
        try:
            for cb in self.callbacks:
                cb.on_sanity_check_start(self)
            self._validation_loop(val_data, max_batches=steps)
            for cb in self.callbacks:
                cb.on_sanity_check_end(self)
        finally:
            self.sanity_checking = False
            self.callback_metrics = kept

    def _validates_this_epoch(self) -> bool:
        every = self.check_val_every_n_epoch
        return every is not None and (self.current_epoch + 1) % every == 0

    def _validates_at_this_step(self) -> bool:
        """Whether to validate after the optimiser step just taken (see `val_check_interval`)."""
        interval = self.val_check_interval
        if isinstance(interval, float):
            steps_in_epoch = self.batch_idx // self.accumulate_grad_batches
            return self._validates_this_epoch() and steps_in_epoch % self._val_every_steps == 0
        return bool(interval) and self.global_step % interval == 0

    def _may_stop(self) -> bool:
        """Whether a stop asked for may take effect now: at once if every process already agreed
        on it (`stop_agreed`), else once `min_steps` and `min_epochs` are done."""
        if self.stop_agreed:
            return True
        done = (self.min_steps is None or self.global_step >= self.min_steps) and (
            self.min_epochs is None or self.current_epoch >= self.min_epochs
        )
        if not done and not self._stop_deferred_logged:
            self._stop_deferred_logged = True
            log.info(
                "Stop asked for at step %d; training goes on to min_steps=%s / min_epochs=%s.",
                self.global_step,
                self.min_steps,
                self.min_epochs,
            )
        return done

    def _stop_now(self, now: bool = False) -> bool:
        """`_agree_to_stop`, held back until `min_steps` / `min_epochs` are done."""
        return self._agree_to_stop(now) and self._may_stop()

    def _epoch_done(self) -> bool:
        return self.max_epochs is not None and self.current_epoch >= self.max_epochs

    def _steps_done(self) -> bool:
        return self.max_steps is not None and self.global_step >= self.max_steps

    def _fit_loop(self, train_data: DataSource, val_data: DataSource | None) -> None:
        resume = self._resume or {}
        self.current_epoch = int(resume.get("epoch", 0))
        while not (self._stop_now(now=True) or self._steps_done() or self._epoch_done()):
            self._train_iterator = train_data.iterator(self.current_epoch)
            self.batch_idx = 0
            if resume.get("iterator") is not None:  # continue the interrupted epoch exactly
                self._train_iterator.set_state(resume["iterator"])
                self.batch_idx = int(resume.get("batch_idx", 0))
            resume = {}
            for cb in self.callbacks:
                cb.on_train_epoch_start(self)
            if not self._run_train_epoch(train_data, val_data):
                break
            for cb in self.callbacks:
                cb.on_train_epoch_end(self)
            if (
                val_data is not None
                and self.val_check_interval is None
                and self._validates_this_epoch()
            ):
                self._validation_loop(val_data)
            self.current_epoch += 1

    def _run_train_epoch(self, train_data: DataSource, val_data: DataSource | None) -> bool:
        """Train over one epoch; False if training stopped before the epoch's data ran out.

        The strategy chooses the examples (`Strategy.train_examples`) and receives the step's
        host-bound outputs (`Strategy.on_step_outputs`) before any callback sees the step.
        """
        for example in self.strategy.train_examples(self, self._train_iterator, train_data):
            if self._train_batches is not None and self.batch_idx >= self._train_batches:
                break
            if self._flush_writers_at_next_step:  # rows logged after the last checkpoint
                self._flush_writers()
                self._flush_writers_at_next_step = False
            for cb in self.callbacks:
                cb.on_train_batch_start(self, example, self.batch_idx)
            for cb in self.callbacks:
                cb.on_before_optimizer_step(self)
            batch = self._device_batch(example)
            self.state, outputs = self._train_step(batch)(self.state, batch, self.controls)
            self._fetch_metrics()  # the last logged step's, now that this step is queued
            host_outputs = outputs.pop(OUTPUTS, None)
            if host_outputs is not None:
                self.strategy.on_step_outputs(self, host_outputs)
            self.batch_idx += 1
            if self.batch_idx % self.accumulate_grad_batches:
                continue  # a micro-batch: the optimiser steps once per group
            self.global_step += 1
            if self.global_step % self.log_every_n_steps == 0 or self.fast_dev_run:
                self._queue_metrics(outputs)
            self.validates_after_step = val_data is not None and self._validates_at_this_step()
            for cb in self.callbacks:
                cb.on_train_batch_end(self, outputs, example, self.batch_idx - 1)
            if self.validates_after_step:
                self._fetch_metrics()
                self._validation_loop(val_data)
            if self._stop_now() or self._steps_done():
                self._fetch_metrics()
                return False
        self._fetch_metrics()
        return True

    def _queue_metrics(self, outputs: dict[str, Any]) -> None:
        """Start copying a logged step's metrics to the host; `_fetch_metrics` records them once
        the next step is queued (so the device never waits for the host), or now at the last
        step."""
        device_metrics = {f"train/{k}": v for k, v in outputs.items()}
        for value in device_metrics.values():
            copy = getattr(value, "copy_to_host_async", None)
            if copy is not None:
                copy()
        self._pending_metrics = (self.global_step, device_metrics, self.strategy.host_metrics())
        if self._steps_done():
            self._fetch_metrics()

    def _fetch_metrics(self) -> None:
        """Record the queued step's metrics: `callback_metrics`, `logged_step` and the writers."""
        if self._pending_metrics is None:
            return
        step, device_metrics, host_metrics = self._pending_metrics
        self._pending_metrics = None
        host = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
        host |= {f"train/{k}": float(v) for k, v in host_metrics.items()}
        self.callback_metrics.update(host)
        self.logged_step = step
        if not self.fast_dev_run:
            self.log_metrics(host, step=step)

    # --- evaluation -------------------------------------------------------------------------------
    def load(self, data: DataSource, ckpt_path: str | Path | None = None) -> TrainState:
        """The state to evaluate or predict with.

        Args:
            data: a source of examples; its first one sets the shapes of a new state.
            ckpt_path: `"last"`, `"best"` or a checkpoint's path (see the class): restored even
                into an existing state. None: the trainer's `ckpt_path` when there is no state
                yet, else the state as it is.

        Returns:
            The trainer's state: initial (or given) parameters, replaced by the checkpoint
            `ckpt_path` names.
        """
        if self.state is None:
            self._setup_state(next(iter(data.iterator(0))), self._ckpt_path(ckpt_path))
        elif ckpt_path is not None:
            self._restore_checkpoint(False, str(ckpt_path))
        return self.state

    def _evaluate(
        self, data: DataSource, prefix: str, limit: int | None, hooks: _EvalHooks
    ) -> dict[str, float]:
        """Mean metrics over at most `limit` batches (None: all)."""
        averages: dict[str, metrics.Average] | None = None
        for cb in self.callbacks:
            hooks.epoch_start(cb)
        for batch_idx, example in enumerate(data.iterator(0)):
            if limit is not None and batch_idx >= limit:
                break
            for cb in self.callbacks:
                hooks.batch_start(cb, example, batch_idx)
            batch = self._device_batch(example)
            outputs = self._eval_step(batch)(self.state, batch, self.controls)
            averages = _accumulate(averages, outputs)
            for cb in self.callbacks:
                hooks.batch_end(cb, outputs, example, batch_idx)
        means = {
            f"{prefix}/{k}": float(average.compute())
            for k, average in jax.device_get(averages or {}).items()
        }
        self.callback_metrics.update(means)
        if not self.fast_dev_run:
            self.log_metrics(means)
        for cb in self.callbacks:
            hooks.epoch_end(cb)
        return means

    def validate(self, data: DataSource, ckpt_path: str | Path | None = None) -> dict[str, float]:
        """Mean metrics over the validation data, also in `callback_metrics`.

        Args:
            data: the validation examples (at most `limit_val_batches` batches are used).
            ckpt_path: the checkpoint to validate (see `load`).

        Returns:
            `{"val/<metric>": mean}` over the batches.
        """
        with self._stage("validate"):
            self.load(data, ckpt_path)
            return self._validation_loop(data)

    def _validation_loop(
        self, data: DataSource, max_batches: int | None = None
    ) -> dict[str, float]:
        """Validate on `max_batches` batches (default `limit_val_batches`')."""
        hooks = _EvalHooks(
            epoch_start=lambda cb: cb.on_validation_epoch_start(self),
            batch_start=lambda cb, batch, i: cb.on_validation_batch_start(self, batch, i),
            batch_end=lambda cb, out, batch, i: cb.on_validation_batch_end(self, out, batch, i),
            epoch_end=lambda cb: cb.on_validation_epoch_end(self),
        )
        for cb in self.callbacks:
            cb.on_validation_start(self)
        limit = self._val_batches(data) if max_batches is None else max_batches
        metrics = self._evaluate(data, "val", limit, hooks)
        for cb in self.callbacks:
            cb.on_validation_end(self)
        return metrics

    def test(self, data: DataSource, ckpt_path: str | Path | None = None) -> dict[str, float]:
        """Mean metrics over the test data, also in `callback_metrics`.

        Args:
            data: the test examples (at most `limit_test_batches` batches are used).
            ckpt_path: the checkpoint to test (see `load`).

        Returns:
            `{"test/<metric>": mean}` over the batches.
        """
        hooks = _EvalHooks(
            epoch_start=lambda cb: cb.on_test_epoch_start(self),
            batch_start=lambda cb, batch, i: cb.on_test_batch_start(self, batch, i),
            batch_end=lambda cb, out, batch, i: cb.on_test_batch_end(self, out, batch, i),
            epoch_end=lambda cb: cb.on_test_epoch_end(self),
        )
        with self._stage("test"):
            self.load(data, ckpt_path)
            for cb in self.callbacks:
                cb.on_test_start(self)
            limit = _num_batches("limit_test_batches", self.limit_test_batches, data)
            metrics = self._evaluate(data, "test", limit, hooks)
            for cb in self.callbacks:
                cb.on_test_end(self)
        return metrics

    def predict(
        self,
        data: DataSource,
        steps: int = 1,
        ckpt_path: str | Path | None = None,
        members: int = 1,
    ) -> Iterable[list[Batch]] | Iterable[list[list[Batch]]]:
        """Roll out `steps` predictions from every input.

        One compiled model step serves every batch, rollout step and later call. A stochastic
        model's member `m` rolls out with `--mode=predict`'s key (`trainers.evaluation.forecasts.
        member_key`: the trainer's `seed`, `m` and the batch's first init), so the same seed
        gives the same members.

        Args:
            data: the examples to predict from (their targets are not used; at most
                `limit_predict_batches` batches).
            steps: rollout steps per input.
            ckpt_path: the checkpoint to predict with (see `load`).
            members: ensemble members per input (above 1 only for a stochastic model).

        Yields:
            Per batch, the `steps` predictions as host-side (numpy) `Batch`es; with
            `members > 1`, one such list per member.

        Raises:
            ValueError: `members` below 1, or above 1 for a deterministic model.
        """
        from aurora.rollout import ModelStep
        from trainers.evaluation.forecasts import check_members

        check_members(self.strategy.model, members)
        with self._stage("predict"):
            self.load(data, ckpt_path)
            if "predict" not in self._compiled:
                self._compiled["predict"] = ModelStep(self.strategy.model)
            step = self._compiled["predict"]
            for cb in self.callbacks:
                cb.on_predict_start(self)
            for cb in self.callbacks:
                cb.on_predict_epoch_start(self)
            limit = _num_batches("limit_predict_batches", self.limit_predict_batches, data)
            for batch_idx, example in enumerate(data.iterator(0)):
                if limit is not None and batch_idx >= limit:
                    break
                for cb in self.callbacks:
                    cb.on_predict_batch_start(self, example, batch_idx)
                inputs, _ = _to_device_batch(example)
                runs = [self._rollout(step, inputs, steps, member) for member in range(members)]
                preds = runs[0] if members == 1 else runs
                for cb in self.callbacks:
                    cb.on_predict_batch_end(self, preds, example, batch_idx)
                yield preds
            for cb in self.callbacks:
                cb.on_predict_epoch_end(self)
            for cb in self.callbacks:
                cb.on_predict_end(self)

    def _rollout(self, step: Any, inputs: Batch, steps: int, member: int) -> list[Batch]:
        """Member `member`'s `steps` predictions from `inputs`, host-side; a stochastic model's
        with the member's key (`trainers.evaluation.forecasts.member_key`)."""
        from aurora.rollout import rollout
        from trainers.evaluation.forecasts import member_key

        kwargs = {}
        if is_stochastic(step.model):
            init = int(np.ravel(np.asarray(inputs.metadata.time))[0]) * 60  # seconds
            kwargs["rng"] = member_key(self.seed, member, init)
        return [p.to_numpy() for p in rollout(step, self.state.params, inputs, steps, **kwargs)]
