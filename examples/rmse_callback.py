"""A user-written callback: log the RMSE of one variable at one level every N steps.

Add it through the config, no library code changes::

    config.callbacks.z500_rmse = {"type": "examples.rmse_callback:RmseCallback",
                                  "variable": "z", "level": 500, "every_n_steps": 10}

or on the command line with `--config.callbacks.z500_rmse.every_n_steps=...` once it is in the
config file.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from callbacks.base import Callback


class RmseCallback(Callback):
    """Every `every_n_steps`, predict one step from the current batch and log the RMSE (physical
    units) of `variable` (at `level` for atmospheric variables) against the first target."""

    def __init__(self, variable: str = "2t", level: float | None = None, every_n_steps: int = 10):
        self.variable, self.level, self.every_n_steps = variable, level, every_n_steps
        self._predict = None

    def on_train_batch_end(self, trainer: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        if self._predict is None:
            # A stochastic model's noise from the run's seed, as in validation.
            self._predict = jax.jit(trainer.strategy.in_evaluation(trainer.seed).predict)
        inputs, targets = batch
        pred = self._predict(trainer.state.params, inputs)
        if self.level is None:
            got, want = pred.surf_vars[self.variable], targets[0].surf_vars[self.variable]
            tag = f"train/rmse_{self.variable}"
        else:
            i = pred.metadata.atmos_levels.index(float(self.level))
            got, want = (
                pred.atmos_vars[self.variable][:, :, i],
                targets[0].atmos_vars[self.variable][:, :, i],
            )
            tag = f"train/rmse_{self.variable}{int(self.level)}"
        h = got.shape[-2]  # the model crops a surplus latitude row
        rmse = float(np.sqrt(np.mean((np.asarray(got) - np.asarray(want)[..., :h, :]) ** 2)))
        trainer.callback_metrics[tag] = rmse
        trainer.log_metrics({tag: rmse})
