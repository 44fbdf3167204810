"""Checkpoints with Orbax's `CheckpointManager`: exact resume, best-k, async writes.

A checkpoint holds two or three items:

* `state`: the whole `TrainState` (params, optimiser state, step, RNG, strategy extras);
* `meta` (JSON): global step, the data iterator's position, every callback's `state_dict()`, the
  strategy's host state (e.g. a replay buffer's index and RNG) and the run's config;
* `strategy` (only when the strategy has any): the strategy's host arrays (`array_state()`, e.g.
  the replay buffer's fields), as numpy arrays.

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

ITEMS = ("state", "meta", "strategy")


def _config_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


class ModelCheckpoint(Callback):
    """Save every `every_n_steps` (and at the end of training); keep the latest `max_to_keep`.

    With `monitor` (e.g. `"val/loss"`), each save that has the metric is also written to
    `<directory>/best`, which keeps the `save_top_k` best by that metric (`mode="min"` or
    `"max"`). The latest checkpoints stay separate so that resuming always continues from the
    most recent state, never from an older "best" one.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        every_n_steps: int = 100,
        max_to_keep: int | None = 3,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int | None = None,
        async_checkpointing: bool = True,
    ):
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'.")
        self.directory = Path(directory) if directory is not None else None
        self.every_n_steps = every_n_steps
        self.max_to_keep = max_to_keep
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k if save_top_k is not None else max_to_keep
        self.async_checkpointing = async_checkpointing
        self.manager: ocp.CheckpointManager | None = None
        self.best_manager: ocp.CheckpointManager | None = None
        self.last_saved_step: int | None = None

    # --- manager ------------------------------------------------------------------------------------
    def _manager(self, directory: Path, **options: Any) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(enable_async_checkpointing=self.async_checkpointing, create=True, **options)
        return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

    def _open(self, trainer: Trainer) -> ocp.CheckpointManager:
        if self.manager is None:
            directory = self.directory or (Path(trainer.workdir or ".") / "checkpoints")
            self.directory = Path(directory).absolute()
            self.manager = self._manager(self.directory, max_to_keep=self.max_to_keep)
            if self.monitor:
                self.best_manager = self._manager(
                    self.directory / "best",
                    max_to_keep=self.save_top_k,
                    best_fn=lambda metrics: metrics[self.monitor],
                    best_mode=self.mode,
                    keep_checkpoints_without_metrics=False,
                )
        return self.manager

    def setup(self, trainer: Trainer, stage: str) -> None:
        if stage == "fit" and not trainer.fast_dev_run:
            self._open(trainer)

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self.manager, self.best_manager) if m is not None]

    def teardown(self, trainer: Trainer, stage: str) -> None:
        for manager in self._managers():
            manager.wait_until_finished()

    def close(self) -> None:
        for manager in self._managers():
            manager.close()
        self.manager = self.best_manager = None

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
        items = {"state": ocp.args.StandardSave(trainer.state), "meta": ocp.args.JsonSave(meta)}
        arrays = trainer.strategy.array_state()
        if arrays:
            items["strategy"] = ocp.args.PyTreeSave(arrays)
        args = ocp.args.Composite(**items)
        saved = manager.save(step, args=args, force=force)
        if self.best_manager is not None and self.monitor in trainer.callback_metrics:
            metrics = {self.monitor: float(trainer.callback_metrics[self.monitor])}
            self.best_manager.save(step, args=args, metrics=metrics, force=True)
        if saved:
            self.last_saved_step = step
        return saved

    def on_train_batch_end(self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, force=True)

    def on_train_end(self, trainer: Trainer) -> None:
        self.save(trainer, force=True)
        for manager in self._managers():
            manager.wait_until_finished()

    # --- restoring ----------------------------------------------------------------------------------
    def restore_latest(self, trainer: Trainer) -> dict[str, Any] | None:
        """Restore the latest checkpoint into `trainer`; returns the data position, or None."""
        manager = self._open(trainer)
        step = manager.latest_step()
        if step is None:
            return None
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, trainer.state)
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if (self.directory / str(step) / "strategy").exists():
            items["strategy"] = ocp.args.PyTreeRestore()  # numpy arrays, as saved
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        meta = restored["meta"]
        trainer.state = restored["state"]
        trainer.global_step = int(meta["global_step"])
        self.last_saved_step = trainer.global_step
        states = meta.get("callbacks", {})
        for cb in trainer.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
        trainer.strategy.load_state_dict(meta.get("strategy") or {})
        trainer.strategy.load_array_state(restored["strategy"] if "strategy" in items else {})
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
