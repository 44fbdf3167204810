"""Stop training when a wall-clock budget is spent.

Why: clusters hand out jobs with a time limit. Stopping a little before it, through
`trainer.should_stop`, lets the trainer end cleanly (final checkpoint, flushed writers) instead of
being killed mid-write. The elapsed time is saved in checkpoints, so a run resumed in a new job
counts on from where it stopped: the budget is for the whole run, not per job. (Time after the
last checkpoint of an interrupted job is lost, so it is not counted.)
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from callbacks.base import Callback, Outputs

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["Timer", "parse_duration"]

log = logging.getLogger(__name__)

Duration = str | int | float | datetime.timedelta | Mapping[str, float]


def parse_duration(duration: Duration) -> float:
    """A time budget in seconds.

    Args:
        duration: "DD:HH:MM:SS" (shorter forms "HH:MM:SS", "MM:SS", "SS" allowed), a number of
            seconds, a `timedelta`, or a dict of `timedelta` keywords such as {"hours": 1}.

    Returns:
        The duration in seconds (positive; anything else raises ValueError).
    """
    if isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, Mapping):
        seconds = datetime.timedelta(**duration).total_seconds()
    elif isinstance(duration, str):
        fields = duration.strip().split(":")
        if not 1 <= len(fields) <= 4:
            raise ValueError(f"duration {duration!r} is not DD:HH:MM:SS")
        try:
            values = [float(f) for f in fields]
        except ValueError:
            raise ValueError(f"duration {duration!r} is not DD:HH:MM:SS") from None
        units = (86400.0, 3600.0, 60.0, 1.0)[-len(values) :]
        seconds = sum(v * u for v, u in zip(values, units, strict=True))
    else:
        seconds = float(duration)
    if seconds <= 0:
        raise ValueError(f"duration must be positive, got {duration!r}")
    return seconds


class Timer(Callback):
    """Sets `trainer.should_stop` once training has run for `duration`.

    Time counts from `on_train_start` to `on_train_end` (validation during fit included, start-up
    and compilation before training excluded), plus what earlier runs of the same training spent
    (restored from the checkpoint). Checked after every optimiser step (`interval="step"`) or
    epoch (`interval="epoch"`), and after each validation during fit. With several processes the
    trainer must agree `should_stop` across them: clocks differ slightly.

    Args:
      duration: budget; "DD:HH:MM:SS", seconds, `timedelta` or dict (see :func:`parse_duration`).
      interval: "step" or "epoch".
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(
        self,
        duration: Duration = "00:01:00:00",
        interval: str = "step",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval not in ("step", "epoch"):
            raise ValueError(f"interval must be 'step' or 'epoch', got {interval!r}")
        self.duration = parse_duration(duration)
        self.interval = interval
        self._clock = clock
        self._offset = 0.0  # seconds spent by earlier runs (from the checkpoint)
        self._start: float | None = None  # clock value when this run's training started
        self._stopped = False

    # --- queries ----------------------------------------------------------------------------------
    def time_elapsed(self) -> float:
        """Training seconds so far, earlier runs included."""
        running = self._clock() - self._start if self._start is not None else 0.0
        return self._offset + running

    def time_remaining(self) -> float:
        """Seconds of the budget left (0 once it is spent)."""
        return max(self.duration - self.time_elapsed(), 0.0)

    def _check(self, trainer: Trainer) -> None:
        if self._start is None or self._stopped:
            return
        elapsed = self.time_elapsed()
        if elapsed >= self.duration:
            self._stopped = True
            trainer.should_stop = True
            log.info(
                "Timer: %.0f s of training reached the %.0f s budget at step %d; stopping",
                elapsed,
                self.duration,
                trainer.global_step,
            )

    # --- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self._start = self._clock()
        self._stopped = False
        self._check(trainer)  # a resumed run may already be over budget

    def on_train_end(self, trainer: Trainer) -> None:
        self._freeze()

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._freeze()

    def _freeze(self) -> None:
        """Folds the running time into the offset and stops the clock."""
        if self._start is not None:
            self._offset = self.time_elapsed()
            self._start = None

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Outputs, batch: Any, batch_idx: int
    ) -> None:
        if self.interval == "step":
            self._check(trainer)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        self._check(trainer)

    def on_validation_end(self, trainer: Trainer) -> None:
        self._check(trainer)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"elapsed_s": self.time_elapsed(), "duration_s": self.duration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the elapsed time; the budget stays the one given now (it may have been
        raised)."""
        elapsed = float(state.get("elapsed_s", 0.0))
        if self._start is not None:  # restored while running: count on from now
            self._start = self._clock()
        self._offset = elapsed
