"""GradStop: the rollout's stop-gradient window over training, and the non-finite gradient guard.

The window (how many final rollout steps pass gradients, see `RolloutStrategy`) is a traced input
of the jitted step, so a curriculum — e.g. GraphCast-style, backprop through the last step for
1000 steps, then through two — changes it without recompiling.

Non-finite gradients: the jitted step never applies a non-finite update (it reports
`grads_finite`). This callback reads that flag and either counts the skipped update
(`on_nonfinite="skip"`) or stops training (`"stop"`), with the step, the batch's time and the
input variables that hold NaN/Inf in the message. The last good checkpoint stays as it was.

The flags are read from the device once every `log_every_n_steps` steps (and at the last step),
all at once, so that the host does not wait for the device at every step; a stop then takes
effect at that step. The batch is named only for a failure at the step read (set
`log_every_n_steps=1` to name every one); the others are reported by step.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["GradStop"]

log = logging.getLogger(__name__)


def _nonfinite_inputs(example: Any) -> list[str]:
    inputs, targets = example
    names = []
    for role, batch in [
        ("input", inputs),
        *((f"target {i + 1}", t) for i, t in enumerate(targets)),
    ]:
        for group in ("surf_vars", "static_vars", "atmos_vars"):
            for name, value in getattr(batch, group).items():
                if not np.all(np.isfinite(np.asarray(value))):
                    names.append(f"{role} {name}")
    return names


class GradStop(Callback):
    """Owns the gradient window schedule and the policy for non-finite gradients.

    Args:
        schedule: `(from_step, window)` pairs, e.g. `[(0, 1), (1000, 2)]`; empty keeps the
            strategy's default window.
        on_nonfinite: `"skip"` (count and continue) or `"stop"` (stop training).
        max_skipped: with `"skip"`, stop anyway after this many skipped updates.
    """

    def __init__(
        self,
        schedule: Sequence[tuple[int, int]] = (),
        on_nonfinite: str = "skip",
        max_skipped: int | None = None,
    ):
        if on_nonfinite not in ("skip", "stop"):
            raise ValueError("on_nonfinite must be 'skip' or 'stop'.")
        self.schedule = sorted((int(s), int(w)) for s, w in schedule)
        self.on_nonfinite = on_nonfinite
        self.max_skipped = max_skipped
        self.skipped = 0
        self.events: list[dict[str, Any]] = []
        self._unread: list[tuple[int, Any]] = []  # (step, grads_finite on the device)

    def window_at(self, step: int) -> int | None:
        """The gradient window the schedule sets at a step.

        Args:
            step: a global step.

        Returns:
            The window of the last schedule entry starting at or before `step`; None before the
            first entry.
        """
        window = None
        for start, w in self.schedule:
            if step >= start:
                window = w
        return window

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        window = self.window_at(trainer.global_step)
        if window is not None and "grad_window" not in trainer.controls:
            raise ValueError(
                "GradStop has a gradient-window schedule but the strategy has no traced window: "
                "use RolloutStrategy(curriculum=True) (config: strategy.curriculum=True)."
            )
        if window is not None:
            import jax.numpy as jnp

            trainer.controls["grad_window"] = jnp.int32(window)

    def on_train_batch_end(
        self, trainer: Trainer, outputs: dict[str, Any], batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._unread.append((step, outputs["grads_finite"]))
        interval = max(int(getattr(trainer, "log_every_n_steps", 1) or 1), 1)
        if step % interval and step != getattr(trainer, "max_steps", None):
            return
        self._read(trainer, batch)

    def on_train_end(self, trainer: Trainer) -> None:
        self._read(trainer, None)

    def _read(self, trainer: Trainer, batch: Any) -> None:
        """Fetch the unread flags (one transfer) and act on the non-finite ones; `batch` is the
        current step's."""
        if not self._unread:
            return
        steps = [s for s, _ in self._unread]
        flags = jax.device_get([f for _, f in self._unread])
        self._unread = []
        for step, flag in zip(steps, flags, strict=True):
            if float(flag) != 1.0:
                self._report(trainer, step, batch if step == trainer.global_step else None)

    def _report(self, trainer: Trainer, step: int, batch: Any) -> None:
        if batch is not None:
            inputs = batch[0]
            times = ", ".join(str(t) for t in inputs.metadata.datetimes())
            culprits = _nonfinite_inputs(batch) or [
                "no input field (the loss or the model produced it)"
            ]
        else:
            times = "not kept"
            culprits = ["not checked (an earlier step's batch; log_every_n_steps=1 names them)"]
        message = (
            f"Non-finite gradient at step {step} (batch time {times}); "
            f"NaN/Inf in: {', '.join(culprits)}. The update was skipped."
        )
        self.skipped += 1
        self.events.append({"step": step, "times": times, "culprits": culprits})
        if self.on_nonfinite == "stop" or (
            self.max_skipped is not None and self.skipped > self.max_skipped
        ):
            log.error("%s Stopping training.", message)
            trainer.should_stop = True
        else:
            log.warning(message)
        trainer.log_metrics({"train/skipped_updates": float(self.skipped)}, step=step)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "events": self.events[-100:]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.events = list(state.get("events", []))
