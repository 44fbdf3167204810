"""`EMA`: an exponential moving average of the parameters, evaluated instead of them.

An average of the weights over the last ~1/(1 - decay) steps often scores better than the last
weights (Polyak averaging; timm's `ModelEmaV3`, Lightning's `EMAWeightAveraging`). The average is
device state of the callback (`Callback.init_device_state`): it lives in the `TrainState`, so it
is sharded like the parameters, donated with the state and saved in and restored from every
checkpoint (a resumed run continues the same average). Only the parameters that train are
averaged; a frozen one (a LoRA base) is its own average and costs no memory.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["EMA"]

log = logging.getLogger(__name__)

STAGES = ("validate", "test", "predict")
"""What the average can be used for, instead of the trained parameters."""


def _average_dtype(x: Any) -> Any:
    """float32 for low-precision floating parameters (a bfloat16 average would round away the
    small steps `(1 - decay) * (p - ema)`), else the parameter's own dtype."""
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.float32
    return dtype


@functools.partial(jax.jit, donate_argnums=0)
def _moved(average: Any, params: Any, decay: jax.Array) -> Any:
    """`average + (1 - decay) * (params - average)` for every leaf of `average` (a subtree of
    `params`' nested dict)."""
    flat = traverse_util.flatten_dict(params)
    moved = {
        path: a + (1 - decay) * (flat[path].astype(a.dtype) - a)
        for path, a in traverse_util.flatten_dict(average).items()
    }
    return traverse_util.unflatten_dict(moved)


class EMA(Callback):
    """Keep `ema = decay * ema + (1 - decay) * params` after every `every_n_steps`-th optimiser
    step, and evaluate with `ema` instead of the parameters.

    The average starts at the initial parameters. Its parameters replace the trained ones in the
    trainer's state from the start to the end of each evaluation epoch of the `evaluate` stages
    (as Lightning's `WeightAveraging` swaps them), so the evaluation step, its metrics and the
    batch hooks of other callbacks see the average; checkpoints, written outside those epochs,
    always hold the trained parameters and the average apart. The average is part of the state's
    structure: a run's checkpoints restore only into a run with the same `EMA`s (adding, removing
    or changing the arguments of one, which are in its `state_key`, makes them fail to restore),
    so add it from the start; `config.init.orbax_checkpoint` still starts a new run from such a
    checkpoint's parameters.

    Args:
        decay: the weight of the old average, e.g. 0.999 (an average over ~1000 steps).
        warmup_power: None: `decay` from the first update. A number (timm: 2/3 for runs of a
            million steps and more, 3/4 for ~100k): the n-th update uses
            `min(decay, 1 - (1 + (n - 1) / warmup_gamma) ** -warmup_power)`, so that the first
            update copies the parameters and early, poor weights fade quickly.
        warmup_gamma: the warm-up's time scale in updates.
        every_n_steps: update after every this many optimiser steps.
        evaluate: where the average replaces the parameters: any of "validate" (also validation
            during fit), "test", "predict".
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        warmup_power: float | None = None,
        warmup_gamma: float = 1.0,
        every_n_steps: int = 1,
        evaluate: Sequence[str] = ("validate",),
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], not {decay}.")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, not {every_n_steps}.")
        unknown = set(evaluate) - set(STAGES)
        if unknown:
            raise ValueError(f"evaluate: unknown stages {sorted(unknown)}; known: {STAGES}.")
        self.decay = float(decay)
        self.warmup_power = warmup_power
        self.warmup_gamma = float(warmup_gamma)
        self.every_n_steps = int(every_n_steps)
        self.evaluate = tuple(evaluate)
        self._trained: Any = None  # the trained parameters while the average stands in for them
        self._updated_step: int | None = None  # the step the average includes

    def decay_at(self, update: int) -> float:
        """The decay of the `update`-th update (1 for the first)."""
        if self.warmup_power is None:
            return self.decay
        warm = 1.0 - (1.0 + (update - 1) / self.warmup_gamma) ** -self.warmup_power
        return min(self.decay, warm)

    # --- the average ------------------------------------------------------------------------------
    def init_device_state(self, trainer: Trainer, params: Any) -> Any:
        from trainers.strategies.trainable import FROZEN

        trainable = getattr(trainer.strategy, "trainable", None)
        flat = traverse_util.flatten_dict(dict(params))
        kept = {
            path: jnp.array(x, dtype=_average_dtype(x), copy=True)
            for path, x in flat.items()
            if trainable is None or trainable.label(path) != FROZEN
        }
        return {"params": traverse_util.unflatten_dict(kept)}

    def average(self, trainer: Trainer) -> Any:
        """The averaged parameters (the trainable ones only), as a nested dict of arrays."""
        return self.device_state(trainer)["params"]

    def averaged_params(self, trainer: Trainer) -> Any:
        """The trainer's parameters with the averaged ones in place of the trained ones (in the
        parameters' dtypes and shardings)."""
        # Imported here so that `import callbacks` does not load the trainer and the model.
        from trainers.strategies.trainable import key_names

        params = self._trained if self._trained is not None else trainer.state.params
        average = traverse_util.flatten_dict(self.average(trainer))

        def averaged(path: Any, p: Any) -> Any:
            a = average.get(key_names(path))
            if a is None:  # frozen
                return p
            a = a.astype(p.dtype) if a.dtype != p.dtype else a
            sharding = getattr(p, "sharding", None)
            return jax.device_put(a, sharding) if sharding is not None else a

        # Mapped over the parameters' own structure, which keeps empty modules (a model without
        # surface variables has `surf_heads: {}`) that a flattened dict would drop.
        return jax.tree_util.tree_map_with_path(averaged, params)

    def _update(self, trainer: Trainer) -> None:
        """Move the average towards the parameters of the current step, once per step."""
        step = trainer.global_step
        if step == 0 or step % self.every_n_steps or step == self._updated_step:
            return
        decay = np.float32(self.decay_at(step // self.every_n_steps))
        average = _moved(self.average(trainer), trainer.state.params, decay)
        self.set_device_state(trainer, {"params": average})
        self._updated_step = step

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._update(trainer)

    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        # A callback listed before this one may save the step before this one's
        # `on_train_batch_end` ran: the checkpoint must hold the step's average all the same.
        self._update(trainer)

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        self._updated_step = trainer.global_step  # the restored average includes that step

    # --- evaluating with it -----------------------------------------------------------------------
    def _swap_in(self, trainer: Trainer, stage: str) -> None:
        if stage in self.evaluate and self._trained is None and trainer.state is not None:
            averaged = self.averaged_params(trainer)
            self._trained = trainer.state.params
            trainer.state = trainer.state.replace(params=averaged)

    def _swap_out(self, trainer: Trainer) -> None:
        if self._trained is not None:
            trainer.state = trainer.state.replace(params=self._trained)
            self._trained = None

    def on_validation_epoch_start(self, trainer: Trainer) -> None:
        self._swap_in(trainer, "validate")

    def on_validation_epoch_end(self, trainer: Trainer) -> None:
        self._swap_out(trainer)

    def on_test_epoch_start(self, trainer: Trainer) -> None:
        self._swap_in(trainer, "test")

    def on_test_epoch_end(self, trainer: Trainer) -> None:
        self._swap_out(trainer)

    def on_predict_epoch_start(self, trainer: Trainer) -> None:
        self._swap_in(trainer, "predict")

    def on_predict_epoch_end(self, trainer: Trainer) -> None:
        self._swap_out(trainer)

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        self._swap_out(trainer)

    def teardown(self, trainer: Trainer, stage: str) -> None:
        self._swap_out(trainer)  # a predict loop its caller stopped reading ends here
