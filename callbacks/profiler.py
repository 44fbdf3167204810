"""`Profiler`: a `jax.profiler` trace of chosen training steps, for TensorBoard's profile tab.

The trace (`<directory>/plugins/profile/<run>/<host>.xplane.pb`, what TensorBoard's profile plugin
reads; `tensorboard --logdir <workdir>` finds it) covers every host and device op of the traced
steps, each step marked with `jax.profiler.StepTraceAnnotation` so that the plugin's step view
splits them. Tracing starts and stops through `clu.profiler`. The first steps compile; trace later
ones (`start_step`) to see the steady state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
from clu import profiler

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["Profiler"]

log = logging.getLogger(__name__)


class Profiler(Callback):
    """Trace optimiser steps `start_step + 1` to `start_step + num_steps` of fit.

    The trace ends once the last traced step has finished on the device (the callback waits for
    it, once), and at the end of fit or on an exception if training stops earlier. A run resumed
    past `start_step` traces nothing.

    Args:
        start_step: the number of optimiser steps done before tracing starts.
        num_steps: how many optimiser steps to trace.
        directory: where the trace goes; default `<trainer.workdir>/profile`.
    """

    def __init__(
        self, start_step: int = 5, num_steps: int = 3, directory: str | Path | None = None
    ):
        if start_step < 0 or num_steps < 1:
            raise ValueError(
                f"Need start_step >= 0 and num_steps >= 1, got {start_step} and {num_steps}."
            )
        self.start_step = int(start_step)
        self.num_steps = int(num_steps)
        self.directory = Path(directory) if directory is not None else None
        self.tracing = False
        self._step_annotation: Any = None

    def _logdir(self, trainer: Trainer) -> Path:
        return self.directory or Path(trainer.workdir or ".") / "profile"

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.tracing and step == self.start_step:
            logdir = self._logdir(trainer)
            logdir.mkdir(parents=True, exist_ok=True)
            profiler.start(str(logdir))
            self.tracing = True
            log.info("Profiling steps %d to %d into %s", step + 1, step + self.num_steps, logdir)
        if self.tracing and self._step_annotation is None:  # micro-batches share their step's
            self._step_annotation = jax.profiler.StepTraceAnnotation("train", step_num=step + 1)
            self._step_annotation.__enter__()

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.tracing:
            return
        self._end_step_annotation()
        if trainer.global_step >= self.start_step + self.num_steps:
            jax.block_until_ready(trainer.state)  # the traced steps' device work, in full
            self._stop()

    def _end_step_annotation(self) -> None:
        if self._step_annotation is not None:
            self._step_annotation.__exit__(None, None, None)
            self._step_annotation = None

    def _stop(self) -> None:
        self._end_step_annotation()
        if self.tracing:
            profiler.stop()
            self.tracing = False

    def on_train_end(self, trainer: Trainer) -> None:
        self._stop()

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer: Trainer, stage: str) -> None:
        self._stop()
