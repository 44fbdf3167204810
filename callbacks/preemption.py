"""Preemption: stop gracefully on SIGTERM, with a checkpoint of the step just finished.

Schedulers (Slurm, Kubernetes, spot VMs) send SIGTERM and kill the job a little later. During
`fit` this callback's handler only records the signal; at the end of the current step it saves
through the trainer's `ModelCheckpoint` (hence `Trainer.save_checkpoint`), waits for the write and
stops training, so the job exits with status 0 and re-running the same command resumes from that
step. The previous handlers are put back when `fit` ends; a second signal of the same kind goes
to them (for SIGINT: KeyboardInterrupt; for SIGTERM by default: the process ends at once).

Multi-host: every process must save the same step and stop together, so with several processes
they agree every `sync_every_n_steps` steps (an all-gather of their flags) and stop if any was
signalled.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["Preemption"]

log = logging.getLogger(__name__)


class Preemption(Callback):
    """Checkpoint and stop at the end of the step during which a signal arrived.

    Args:
        signals: signal names to handle, e.g. `("SIGTERM",)` (the default) or
            `("SIGTERM", "SIGINT", "SIGUSR1")`.
        sync_every_n_steps: with several processes, how often they agree on a stop (an all-gather
            of one integer); a pending signal waits at most this many steps.
    """

    def __init__(self, signals: Sequence[str] = ("SIGTERM",), sync_every_n_steps: int = 1):
        if isinstance(signals, str):
            signals = (signals,)
        self.signals = tuple(signals)
        for name in self.signals:
            if name not in signal.Signals.__members__:
                raise ValueError(
                    f"Unknown signal {name!r}; use names such as 'SIGTERM' or 'SIGINT'."
                )
        if sync_every_n_steps < 1:
            raise ValueError("sync_every_n_steps must be at least 1.")
        self.sync_every_n_steps = sync_every_n_steps
        self.received: str | None = None
        """Name of the signal received during this fit, if any."""
        self.stopped_at: int | None = None
        """The step at which this callback stopped training (and saved), if it did."""
        self._previous: dict[int, Any] = {}

    # --- handlers ---------------------------------------------------------------------------------
    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received == name:  # a second one: do what would have happened without us
            previous = self._previous.get(signum) or signal.SIG_DFL
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signum)
            return
        self.received = name  # only a flag: the loop acts on it between steps

    def setup(self, trainer: Trainer, stage: str) -> None:
        if stage != "fit":
            return
        self.received = None
        self.stopped_at = None
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "Preemption: fit runs outside the main thread; signals cannot be handled here."
            )
            return
        for name in self.signals:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def teardown(self, trainer: Trainer, stage: str) -> None:
        if stage != "fit":
            return
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    # --- acting between steps ---------------------------------------------------------------------
    def _agreed(self, trainer: Trainer) -> bool:
        """Whether any process was signalled (every process returns the same answer)."""
        if jax.process_count() == 1:
            return self.received is not None
        if trainer.global_step % self.sync_every_n_steps:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.int32(self.received is not None))
        return bool(np.any(flags))

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.stopped_at is not None or not self._agreed(trainer):
            return
        reason = self.received or "a signal to another process"
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or trainer.fast_dev_run:
            log.warning(
                "Received %s: stopping at step %d without a checkpoint (no ModelCheckpoint "
                "callback).",
                reason,
                trainer.global_step,
            )
        else:
            checkpoint.save(trainer, force=True)  # nothing new if this step was just saved
            checkpoint.wait_until_finished()
            log.warning(
                "Received %s: saved a checkpoint of step %d in %s; stopping. Run the same command "
                "to resume.",
                reason,
                trainer.global_step,
                checkpoint.directory,
            )
        self.stopped_at = trainer.global_step
        trainer.should_stop = trainer.stop_agreed = True  # every process decided the same
