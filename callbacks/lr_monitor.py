"""Log the learning rate the optimiser actually used, next to the loss it produced.

The schedule lives inside the optax optimiser, out of sight of the writers; without this callback
a warm-up or cosine decay is invisible in TensorBoard and a wrong schedule goes unnoticed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from callbacks.base import Callback, Outputs

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["LearningRateMonitor"]


class LearningRateMonitor(Callback):
    """Writes `name` (default "lr") through `trainer.log_metrics` every N optimiser steps.

    The value written at step s is the learning rate of the update that made step s, the same
    update whose `train/loss` the trainer writes at step s: it is read from
    `trainer.learning_rate()` (the rate the *next* update uses) before the update runs and written
    after it. With gradient accumulation the batch-start hook runs once per micro-batch but the
    global step does not move, so the value is the same.

    Args:
      logging_interval_steps: every N optimiser steps (default: `trainer.log_every_n_steps`, so
        the learning rate lines up with the logged losses).
      name: the metric's tag.
    """

    def __init__(self, logging_interval_steps: int | None = None, name: str = "lr") -> None:
        if logging_interval_steps is not None and logging_interval_steps < 1:
            raise ValueError("logging_interval_steps must be >= 1")
        self.logging_interval_steps = logging_interval_steps
        self.name = name
        self._pending: tuple[int, float] | None = None  # (step the update will reach, its lr)

    def _interval(self, trainer: Trainer) -> int:
        if self.logging_interval_steps is not None:
            return self.logging_interval_steps
        return max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        upcoming = trainer.global_step + 1
        due = upcoming % self._interval(trainer) == 0
        if due and (self._pending is None or self._pending[0] != upcoming):
            self._pending = (upcoming, float(trainer.learning_rate()))

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Outputs, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None and self._pending[0] == trainer.global_step:
            step, lr = self._pending
            self._pending = None
            trainer.log_metrics({self.name: lr}, step=step)
