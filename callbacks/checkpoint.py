"""When to write checkpoints and which to keep: `ModelCheckpoint`, `OnExceptionCheckpoint`.

`ModelCheckpoint` owns an Orbax `CheckpointManager` (asynchronous writes, the latest
`max_to_keep`) and, with `monitor`, a second one under `<directory>/best` keeping the `save_top_k`
best by that metric, each ranked by its own step's validation. What a checkpoint holds, and
restoring it (a `Trainer` with a `ModelCheckpoint` resumes from the latest checkpoint of its
directory, or from the one its `ckpt_path` names), belong to the Trainer:
see `Trainer.save_checkpoint` and `trainers.checkpointing`.
"""

from __future__ import annotations

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


class ModelCheckpoint(Callback):
    """Save every `every_n_steps` (and at the end of training); keep the latest `max_to_keep`.

    With `monitor` (e.g. `"val/loss"`), the state at the end of every validation during fit is
    also written to `<directory>/best`, ranked by that validation's value, which keeps the
    `save_top_k` best (`mode="min"` or `"max"`), as Lightning saves its top-k at validation end.
    A scheduled save waits for the same step's validation, and checkpoint callbacks run after
    the others at every hook (as in Lightning), so a checkpoint carries that validation's value and
    the other callbacks' state after it. The latest
    checkpoints stay separate so that resuming always continues from the most recent state, never
    from an older "best" one; `Trainer(ckpt_path="best")` starts from the best one.

    Args:
        directory: where checkpoints go; default `<trainer.workdir>/checkpoints`.
        every_n_steps: save after every this many optimiser steps.
        max_to_keep: how many of the latest checkpoints to keep (None: all).
        monitor: the `trainer.callback_metrics` key that ranks the best checkpoints.
        mode: `"min"` or `"max"`: which values of `monitor` are best.
        save_top_k: how many best checkpoints to keep (default `max_to_keep`).
        async_checkpointing: write in the background while training goes on.
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
        self._due_step: int | None = None

    # --- managers -----------------------------------------------------------------------------
    def _manager(self, directory: Path, **options: Any) -> ocp.CheckpointManager:
        # Imported here so that `import callbacks` does not load the trainer and the model.
        from trainers.checkpointing import ITEMS

        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.async_checkpointing, create=True, **options
        )
        return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

    def open(self, trainer: Trainer) -> ocp.CheckpointManager:
        """The manager of the latest checkpoints, opened on first use.

        Args:
            trainer: gives the default directory (`<workdir>/checkpoints`).

        Returns:
            The `CheckpointManager` of `directory`, which the trainer restores from.
        """
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
            self.open(trainer)

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self.manager, self.best_manager) if m is not None]

    def wait_until_finished(self) -> None:
        """Block until every checkpoint written so far is complete on disk."""
        for manager in self._managers():
            manager.wait_until_finished()

    def teardown(self, trainer: Trainer, stage: str) -> None:
        self.wait_until_finished()

    def close(self) -> None:
        """Finish the writes in flight and release the managers."""
        for manager in self._managers():
            manager.close()
        self.manager = self.best_manager = None

    # --- when to save -------------------------------------------------------------------------
    def save(self, trainer: Trainer, *, force: bool = False) -> bool:
        """Checkpoint the trainer's current step now, unless it is already saved.

        Nothing is written under `fast_dev_run`, as in Lightning. Other callbacks (preemption,
        exceptions) call this to save outside the schedule.

        Args:
            trainer: the trainer to checkpoint (through `Trainer.save_checkpoint`).
            force: write even if the manager's save policy would skip this step.

        Returns:
            Whether a checkpoint was written (asynchronously unless configured otherwise).
        """
        if trainer.fast_dev_run:
            return False
        manager = self.open(trainer)
        step = trainer.global_step
        if step == self.last_saved_step:
            return False
        saved = trainer.save_checkpoint(manager, force=force)
        if saved:
            self.last_saved_step = step
        return saved

    def save_best(self, trainer: Trainer) -> bool:
        """Write the trainer's current step to `<directory>/best`, ranked by the `monitor` value
        of the validation that just ran at this step.

        Args:
            trainer: the trainer, just validated.

        Returns:
            Whether a checkpoint was written (not under `fast_dev_run`, nor twice for a step).

        Raises:
            KeyError: the validation did not produce `monitor`.
        """
        if trainer.fast_dev_run or not self.monitor:
            return False
        self.open(trainer)
        if self.monitor not in trainer.callback_metrics:
            raise KeyError(
                f"ModelCheckpoint(monitor={self.monitor!r}): the validation produced no such "
                f"metric; it has {sorted(trainer.callback_metrics)}."
            )
        if trainer.global_step in self.best_manager.all_steps():
            return False
        metrics = {self.monitor: float(trainer.callback_metrics[self.monitor])}
        return trainer.save_checkpoint(self.best_manager, force=True, metrics=metrics)

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if trainer.validates_after_step:
            self._due_step = trainer.global_step  # saved at the end of that validation
        else:
            self.save(trainer, force=True)

    def _save_due(self, trainer: Trainer) -> None:
        """Write the scheduled checkpoint of a step whose validation has just run.

        Saving after it means the checkpoint holds the other callbacks' state after that
        validation (EarlyStopping's count), so a run resumed from it makes the same decisions as
        one never stopped. Nothing but the validation runs in between (the data iterator has not
        moved on), and an exception or preemption during it saves the same step.
        """
        if self._due_step is not None and self._due_step == trainer.global_step:
            self.save(trainer, force=True)
        self._due_step = None

    def on_validation_end(self, trainer: Trainer) -> None:
        if trainer.stage == "fit" and not trainer.sanity_checking:  # no model is trained yet
            self._save_due(trainer)
            self.save_best(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self._due_step = None
        self.save(trainer, force=True)
        self.wait_until_finished()

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        self.last_saved_step = trainer.global_step  # the restored step is on disk

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}


class OnExceptionCheckpoint(Callback):
    """On an exception (or Ctrl-C) during fit, write a checkpoint through the trainer's
    `ModelCheckpoint` so that nothing since the last periodic save is lost; the next run resumes
    from it. Validate, test and predict change no state, so nothing is written for them."""

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if (
            checkpoint is None
            or trainer.state is None
            or trainer.fast_dev_run
            or trainer.stage != "fit"
        ):
            return
        leaves = jax.tree_util.tree_leaves(trainer.state)
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            log.warning("Not saving on exception: the state was consumed by a failing step.")
            return
        checkpoint.save(trainer, force=True)
        checkpoint.wait_until_finished()
        log.info("Saved a checkpoint at step %d after %r", trainer.global_step, exception)
