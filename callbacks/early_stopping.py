"""Stop training when a monitored metric stops improving.

Semantics follow Lightning's `EarlyStopping`: a value improves on the best when it is better by
more than `min_delta`; after `patience` checks in a row without improvement the callback sets
`trainer.should_stop`. A non-finite value stops at once (a diverged run will not recover). The
best score and the wait count are saved in checkpoints, so a resumed run keeps its patience
instead of starting over.

Checks happen only while fitting: a stand-alone `trainer.validate()` does not count against the
patience. The trainer must agree `should_stop` across processes; the monitored metrics are already
reduced over all devices, so every process decides the same.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["EarlyStopping"]

log = logging.getLogger(__name__)

_CHECK_ON = ("validation_end", "train_epoch_end")


class EarlyStopping(Callback):
    """Sets `trainer.should_stop` once `monitor` has not improved for `patience` checks.

    Args:
      monitor: key in `trainer.callback_metrics`, e.g. "val/loss" or "val/rmse_2t".
      mode: "min" (lower is better) or "max".
      patience: checks without improvement tolerated before stopping.
      min_delta: smallest change that counts as an improvement (absolute, >= 0).
      check_on: "validation_end" (after each validation) or "train_epoch_end".
      strict: raise if the metric is missing at a check (a typo would otherwise never stop
        anything); with False the check is skipped with a warning.
      check_finite: stop as soon as the metric is NaN or infinite.
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_on: str = "validation_end",
        strict: bool = True,
        check_finite: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if check_on not in _CHECK_ON:
            raise ValueError(f"check_on must be one of {_CHECK_ON}, got {check_on!r}")
        if patience < 0 or min_delta < 0:
            raise ValueError("patience and min_delta must be >= 0")
        self.monitor = monitor
        self.mode = mode
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.check_on = check_on
        self.strict = strict
        self.check_finite = check_finite
        self.best_score: float | None = None
        self.wait_count = 0
        self.stopped_step: int | None = None
        self._fitting = False

    @property
    def state_key(self) -> str:
        """Includes monitor and mode, so two EarlyStopping callbacks keep separate states."""
        return f"EarlyStopping{{monitor={self.monitor}, mode={self.mode}}}"

    # --- decision ---------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        if self.best_score is None:
            return True
        if self.mode == "min":
            return value < self.best_score - self.min_delta
        return value > self.best_score + self.min_delta

    def check(self, value: float) -> tuple[bool, str]:
        """Update the best score and the wait count with one new value of the monitored metric.

        Args:
            value: the metric's latest value.

        Returns:
            `(should_stop, reason)`; `reason` is empty when training goes on.
        """
        if self.check_finite and not math.isfinite(value):
            return True, f"{self.monitor} = {value} is not finite"
        if self._improved(value):
            self.best_score, self.wait_count = value, 0
            return False, ""
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (
                f"{self.monitor} did not improve by more than {self.min_delta} in "
                f"{self.wait_count} checks; best {self.best_score:.6g}"
            )
        return False, ""

    def _run_check(self, trainer: Trainer) -> None:
        if not self._fitting or trainer.should_stop:
            return
        if self.monitor not in trainer.callback_metrics:
            available = sorted(trainer.callback_metrics)
            message = f"EarlyStopping: {self.monitor!r} not in callback_metrics {available}"
            if self.strict:
                raise RuntimeError(message)
            log.warning(message)
            return
        stop, reason = self.check(float(trainer.callback_metrics[self.monitor]))
        if stop:
            trainer.should_stop = True
            self.stopped_step = int(trainer.global_step)
            log.info("EarlyStopping at step %d: %s", trainer.global_step, reason)

    # --- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, stage: str) -> None:
        self._fitting = stage == "fit"

    def teardown(self, trainer: Trainer, stage: str) -> None:
        if stage == "fit":
            self._fitting = False

    def on_sanity_check_start(self, trainer: Trainer) -> None:
        self._fitting = False  # the sanity check's validation is no check of training

    def on_sanity_check_end(self, trainer: Trainer) -> None:
        self._fitting = True

    def on_validation_end(self, trainer: Trainer) -> None:
        if self.check_on == "validation_end":
            self._run_check(trainer)

    def on_train_epoch_end(self, trainer: Trainer) -> None:
        if self.check_on == "train_epoch_end":
            self._run_check(trainer)

    # --- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best_score": self.best_score,
            "wait_count": self.wait_count,
            "stopped_step": self.stopped_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            state.get("monitor", self.monitor) != self.monitor
            or state.get("mode", self.mode) != self.mode
        ):
            log.warning(
                "EarlyStopping: checkpoint state is for %s/%s; starting afresh",
                state.get("monitor"),
                state.get("mode"),
            )
            return
        best = state.get("best_score")
        self.best_score = None if best is None else float(best)
        self.wait_count = int(state.get("wait_count", 0))
        stopped = state.get("stopped_step")
        self.stopped_step = None if stopped is None else int(stopped)
