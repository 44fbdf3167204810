"""Checkpoints with Orbax's `CheckpointManager`: exact resume, best-k, async writes.

A checkpoint holds two items:

* `state`: the whole `TrainState` (params, optimiser state, step, RNG, strategy extras);
* `meta` (JSON): global step, the data iterator's position, every callback's `state_dict()`, the
  strategy's host state (e.g. a replay buffer) and the run's config.

A `Trainer` with a `ModelCheckpoint` resumes from the latest checkpoint in its directory
automatically, so re-running the same command after a crash continues where it stopped, on the
same batches. The state is restored onto the current state's shardings, so a run may resume on a
different mesh.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["ModelCheckpoint", "OnExceptionCheckpoint"]

log = logging.getLogger(__name__)


def _config_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


class ModelCheckpoint(Callback):
    """Save every `every_n_steps` (and at the end of training); keep `max_to_keep`.

    With `monitor` (e.g. `"val/loss"`), the kept checkpoints are the best by that metric
    (`mode="min"` or `"max"`), and checkpoints saved before the metric exists are kept too.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        every_n_steps: int = 100,
        max_to_keep: int | None = 3,
        monitor: str | None = None,
        mode: str = "min",
        async_checkpointing: bool = True,
    ):
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'.")
        self.directory = Path(directory) if directory is not None else None
        self.every_n_steps = every_n_steps
        self.max_to_keep = max_to_keep
        self.monitor = monitor
        self.mode = mode
        self.async_checkpointing = async_checkpointing
        self.manager: ocp.CheckpointManager | None = None
        self.last_saved_step: int | None = None

    # --- manager ------------------------------------------------------------------------------------
    def _open(self, trainer: Trainer) -> ocp.CheckpointManager:
        if self.manager is None:
            directory = self.directory or (Path(trainer.workdir or ".") / "checkpoints")
            self.directory = Path(directory).absolute()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep,
                best_fn=(lambda metrics: metrics[self.monitor]) if self.monitor else None,
                best_mode=self.mode,
                keep_checkpoints_without_metrics=True,
                enable_async_checkpointing=self.async_checkpointing,
                create=True,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        return self.manager

    def setup(self, trainer: Trainer, stage: str) -> None:
        if stage == "fit" and not trainer.fast_dev_run:
            self._open(trainer)

    def teardown(self, trainer: Trainer, stage: str) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None

    # --- saving -------------------------------------------------------------------------------------
    def save(self, trainer: Trainer, *, force: bool = False) -> bool:
        """Write a checkpoint of the trainer's current state (asynchronously unless configured).

        Nothing is written under `fast_dev_run`, as in Lightning."""
        if trainer.fast_dev_run:
            return False
        manager = self._open(trainer)
        step = trainer.global_step
        if step == self.last_saved_step:
            return False
        meta = {
            "global_step": step,
            "data": trainer.data_state(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
            "strategy": trainer.strategy.state_dict(),
            "config": _config_json(trainer.config),
        }
        trainer._call("on_save_checkpoint", meta)
        metrics = None
        if self.monitor and self.monitor in trainer.callback_metrics:
            metrics = {self.monitor: float(trainer.callback_metrics[self.monitor])}
        saved = manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(trainer.state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=force,
        )
        if saved:
            self.last_saved_step = step
        return saved

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, force=True)

    def on_train_end(self, trainer: Trainer) -> None:
        self.save(trainer, force=True)
        if self.manager is not None:
            self.manager.wait_until_finished()

    # --- restoring ----------------------------------------------------------------------------------
    def restore_latest(self, trainer: Trainer) -> dict[str, Any] | None:
        """Restore the latest checkpoint into `trainer`; returns the data position, or None."""
        manager = self._open(trainer)
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, trainer.state)
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        )
        meta = restored["meta"]
        trainer.state = restored["state"]
        trainer.global_step = int(meta["global_step"])
        self.last_saved_step = trainer.global_step
        states = meta.get("callbacks", {})
        for cb in trainer.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
        trainer.strategy.load_state_dict(meta.get("strategy") or {})
        trainer._call("on_load_checkpoint", meta)
        log.info("Resumed from %s at step %d", self.directory / str(step), trainer.global_step)
        return meta["data"]

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}


class OnExceptionCheckpoint(Callback):
    """On an exception (or Ctrl-C), write a checkpoint through the trainer's `ModelCheckpoint`
    so that nothing since the last periodic save is lost; the next run resumes from it."""

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or trainer.state is None or trainer.fast_dev_run:
            return
        leaves = jax.tree_util.tree_leaves(trainer.state)
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            log.warning("Not saving on exception: the state was consumed by a failing step.")
            return
        checkpoint.save(trainer, force=True)
        checkpoint.manager.wait_until_finished()
        log.info("Saved a checkpoint at step %d after %r", trainer.global_step, exception)
