"""Step-based progress reporting: step/total, steps/s, ETA and the latest loss.

Step-based, not epoch-based, because Aurora runs are planned in optimiser steps (`max_steps`) and
epochs over reanalysis data are long and uneven. When stdout is a terminal the line is redrawn in
place (`\\r`); otherwise (CI, `nohup`, cluster logs) one plain line is printed every N steps, so a
log file gets readable lines instead of thousands of carriage returns.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from callbacks.base import Callback, Outputs

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["ProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """A duration for progress lines, rounded to whole seconds (precise enough for an ETA).

    Args:
        seconds: the duration; negative values show as 0.

    Returns:
        `H:MM:SS`, with days when needed (`1 day, 2:03:04`).
    """
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def _format_value(value: float) -> str:
    return f"{value:.5g}"


def _metrics_line(header: str, metrics: Mapping[str, float], prefix: str) -> str:
    parts = [f"{k} {_format_value(v)}" for k, v in sorted(metrics.items()) if k.startswith(prefix)]
    return " | ".join([header, *parts]) if parts else f"{header} | (no {prefix} metrics)"


class ProgressBar(Callback):
    """Prints training progress every `refresh_every_n_steps` optimiser steps (process 0 only).

    The loss is fetched from the step's outputs only when a line is printed; defaulting N to the
    trainer's `log_every_n_steps` means that fetch costs no extra device synchronisation. Steps/s
    is measured over the last window, less any validation inside it (it reports training
    throughput); the ETA uses the average since the first step finished, which leaves out the
    train step's compilation and includes the periodic validations that will recur.

    Args:
      refresh_every_n_steps: print every N optimiser steps (default: `trainer.log_every_n_steps`).
      stream: where to write (default: `sys.stdout` at the time training starts).
      tty: force in-place (`True`) or line (`False`) output; default: `stream.isatty()`.
      clock: seconds, monotonic (injectable for tests).
    """

    def __init__(
        self,
        refresh_every_n_steps: int | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_every_n_steps is not None and refresh_every_n_steps < 1:
            raise ValueError("refresh_every_n_steps must be >= 1")
        self.refresh_every_n_steps = refresh_every_n_steps
        self._stream_arg = stream
        self._tty_arg = tty
        self._clock = clock
        self._reset()

    def _reset(self) -> None:
        self._stream: TextIO | None = None
        self._tty = False
        self._first: tuple[int, float] | None = None  # (step, time) when the first step finished
        self._window: tuple[int, float] | None = None  # (step, time) of the last printed line
        self._validation_start: float | None = None
        self._inline_len = 0  # length of the line being redrawn in place; 0 if none

    # --- output -----------------------------------------------------------------------------------
    def _out(self) -> TextIO:
        if self._stream is None:
            self._stream = self._stream_arg if self._stream_arg is not None else sys.stdout
            isatty = getattr(self._stream, "isatty", lambda: False)
            self._tty = bool(isatty()) if self._tty_arg is None else self._tty_arg
        return self._stream

    def _write_inline(self, line: str) -> None:
        """Redraws the current terminal line, padding to erase a longer previous one."""
        out = self._out()
        out.write("\r" + line + " " * max(self._inline_len - len(line), 0))
        out.flush()
        self._inline_len = len(line)

    def _write_line(self, line: str) -> None:
        """A full line; in TTY mode it first ends the line being redrawn, so nothing is
        overwritten."""
        out = self._out()
        if self._inline_len:
            out.write("\n")
            self._inline_len = 0
        out.write(line + "\n")
        out.flush()

    def _emit(self, line: str) -> None:
        self._out()
        if self._tty:
            self._write_inline(line)
        else:
            self._write_line(line)

    # --- formatting -------------------------------------------------------------------------------
    @staticmethod
    def _total(trainer: Trainer) -> int | None:
        total = getattr(trainer, "estimated_stepping_batches", None) or getattr(
            trainer, "max_steps", None
        )
        return int(total) if total else None

    def _interval(self, trainer: Trainer) -> int:
        if self.refresh_every_n_steps is not None:
            return self.refresh_every_n_steps
        return max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)

    @staticmethod
    def _loss(trainer: Trainer, outputs: Outputs | None) -> tuple[float | None, int | None]:
        """The latest training loss on the host and its step (None: this step's).

        A trainer that fetches logged metrics itself (`logged_step`, a step late) is not made
        to wait for the device: its latest fetched loss is shown, with its step.
        """
        logged_step = getattr(trainer, "logged_step", None)
        if logged_step is None and outputs and "loss" in outputs:
            return float(outputs["loss"]), None  # synchronises: only called when printing
        value = trainer.callback_metrics.get("train/loss")
        return (None if value is None else float(value)), logged_step

    def _train_line(
        self,
        trainer: Trainer,
        step: int,
        now: float,
        loss: float | None,
        loss_step: int | None = None,
    ) -> str:
        total = self._total(trainer)
        parts = [f"epoch {trainer.current_epoch}"]
        parts.append(
            f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        )
        rate = None
        if self._window is not None and step > self._window[0] and now > self._window[1]:
            rate = (step - self._window[0]) / (now - self._window[1])
        parts.append(f"{rate:.3g} steps/s" if rate is not None else "- steps/s")
        if total and self._first is not None and step > self._first[0] and now > self._first[1]:
            mean_rate = (step - self._first[0]) / (now - self._first[1])
            parts.append(f"ETA {format_duration((total - step) / mean_rate)}")
        if loss is not None:
            at = f" (step {loss_step})" if loss_step is not None and loss_step != step else ""
            parts.append(f"loss {_format_value(loss)}{at}")
        return " | ".join(parts)

    # --- hooks ------------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer) -> None:
        self._reset()
        if trainer.is_global_zero:
            self._out()

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Outputs, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        step, now = trainer.global_step, self._clock()
        if self._first is None:
            self._first = self._window = (step, now)  # after compilation: the clock starts here
        total = self._total(trainer)
        if step % self._interval(trainer) and step != total:
            return
        loss, loss_step = self._loss(trainer, outputs)
        now = self._clock()  # after any fetch, so the window covers the device work
        self._emit(self._train_line(trainer, step, now, loss, loss_step))
        self._window = (step, now)

    def on_train_end(self, trainer: Trainer) -> None:
        if not trainer.is_global_zero:
            return
        if self._inline_len:
            self._out().write("\n")
            self._out().flush()
            self._inline_len = 0

    def on_validation_start(self, trainer: Trainer) -> None:
        self._validation_start = self._clock()

    def on_validation_end(self, trainer: Trainer) -> None:
        if self._window is not None and self._validation_start is not None:
            # leave the validation out of the next steps/s window
            step, start = self._window
            self._window = (step, start + self._clock() - self._validation_start)
        self._validation_start = None
        if trainer.is_global_zero:
            header = f"validation @ step {trainer.global_step}"
            self._write_line(_metrics_line(header, trainer.callback_metrics, "val/"))

    def on_test_end(self, trainer: Trainer) -> None:
        if trainer.is_global_zero:
            header = f"test @ step {trainer.global_step}"
            self._write_line(_metrics_line(header, trainer.callback_metrics, "test/"))

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self.on_train_end(trainer)  # leave the terminal on a fresh line for the traceback
