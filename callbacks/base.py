"""Lightning's callback vocabulary for a JAX trainer.

A callback subclasses :class:`Callback` and overrides the hooks it needs; every hook receives the
`Trainer` (read `trainer.state`, `trainer.global_step`, `trainer.config`, set
`trainer.should_stop`) and, for batch hooks, the batch and the step's `outputs`: a dict of scalar
metrics as device arrays. Fetching them (`float(x)`) synchronises with the device, so a callback
should do it only when it acts (e.g. every N steps), not on every step.

In-step measurements: a callback that needs quantities only the jitted step can compute cheaply
(gradient or update norms, ...) lists their names in :attr:`Callback.measurements`; the trainer
computes the union inside the step and returns them in `outputs`. Known names are in
:data:`MEASUREMENTS`.

State: `state_dict()` returns JSON-serialisable data saved in every checkpoint and given back
through `load_state_dict()` on resume (e.g. EarlyStopping's best score and patience counter),
under the callback's `state_key`: its class name plus the arguments it was built with, so that two
callbacks of one class keep separate states (as Lightning's `Callback.state_key`).
"""

from __future__ import annotations

import inspect
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["MEASUREMENTS", "Callback", "Outputs"]

Outputs = dict[str, Any]

MEASUREMENTS = {
    "grad_norm": "global L2 norm of the gradient (before clipping)",
    "update_norm": "global L2 norm of the optimiser update",
    "param_norm": "global L2 norm of the parameters after the update",
    "grads_finite": "1.0 if every gradient entry is finite, else 0.0 (the update was skipped)",
}


class Callback:
    """Base class: every hook is a no-op. Names and order follow PyTorch Lightning."""

    measurements: tuple[str, ...] = ()
    """In-step measurements this callback needs (keys of :data:`MEASUREMENTS`)."""

    _init_args: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})

    def __new__(cls, *args: Any, **kwargs: Any) -> Callback:
        # The constructor's arguments, kept for `state_key` (no subclass has to pass them on).
        instance = super().__new__(cls)
        instance._init_args = (args, kwargs)
        return instance

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints: the class name, followed by the arguments
        given to the constructor when there are any, e.g. `Timer{'duration': '00:01:00'}`.

        Arguments that are not plain data (str, numbers, None and lists, tuples or dicts of them)
        appear as their type's name, so that the key is the same in every run. Override it (with
        :meth:`_generate_state_key`) to keep only the arguments that tell instances apart.
        """
        args, kwargs = self._init_args
        try:
            bound = inspect.signature(type(self).__init__).bind(self, *args, **kwargs)
            named = dict(list(bound.arguments.items())[1:])
        except TypeError:  # a signature `bind` cannot follow: positions as names
            named = {**{str(i): a for i, a in enumerate(args)}, **kwargs}
        return self._generate_state_key(**named)

    def _generate_state_key(self, **kwargs: Any) -> str:
        """`ClassName{repr(kwargs)}`, or the bare class name without kwargs (Lightning's form)."""
        if not kwargs:
            return type(self).__qualname__
        return f"{type(self).__qualname__}{_plain_repr(kwargs)}"

    # --- lifecycle ---
    def setup(self, trainer: Trainer, stage: str) -> None:
        """Called at the start of fit / validate / test / predict (`stage`)."""

    def teardown(self, trainer: Trainer, stage: str) -> None:
        """Called at the end of fit / validate / test / predict, also after an exception."""

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        """Called when the loop raises (including KeyboardInterrupt)."""

    # --- fit ---
    def on_fit_start(self, trainer: Trainer) -> None: ...
    def on_fit_end(self, trainer: Trainer) -> None: ...
    def on_sanity_check_start(self, trainer: Trainer) -> None:
        """Before the validation batches `num_sanity_val_steps` runs ahead of training; the
        validation hooks follow with `trainer.sanity_checking` True."""

    def on_sanity_check_end(self, trainer: Trainer) -> None: ...
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def on_train_epoch_start(self, trainer: Trainer) -> None: ...
    def on_train_epoch_end(self, trainer: Trainer) -> None: ...
    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None: ...
    def on_train_batch_end(
        self, trainer: Trainer, outputs: Outputs, batch: Any, batch_idx: int
    ) -> None: ...
    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """Host-side hook before each jitted step (the update itself happens inside jit)."""

    # --- validation / test / predict ---
    def on_validation_start(self, trainer: Trainer) -> None: ...
    def on_validation_end(self, trainer: Trainer) -> None: ...
    def on_validation_epoch_start(self, trainer: Trainer) -> None: ...
    def on_validation_epoch_end(self, trainer: Trainer) -> None: ...
    def on_validation_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None: ...
    def on_validation_batch_end(
        self, trainer: Trainer, outputs: Outputs, batch: Any, batch_idx: int
    ) -> None: ...
    def on_test_start(self, trainer: Trainer) -> None: ...
    def on_test_end(self, trainer: Trainer) -> None: ...
    def on_test_epoch_start(self, trainer: Trainer) -> None: ...
    def on_test_epoch_end(self, trainer: Trainer) -> None: ...
    def on_test_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None: ...
    def on_test_batch_end(
        self, trainer: Trainer, outputs: Outputs, batch: Any, batch_idx: int
    ) -> None: ...
    def on_predict_start(self, trainer: Trainer) -> None: ...
    def on_predict_end(self, trainer: Trainer) -> None: ...
    def on_predict_epoch_start(self, trainer: Trainer) -> None: ...
    def on_predict_epoch_end(self, trainer: Trainer) -> None: ...
    def on_predict_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None: ...
    def on_predict_batch_end(
        self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
    ) -> None: ...

    # --- checkpoints ---
    def on_save_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """Called before a checkpoint is written; may add JSON-serialisable entries."""

    def on_load_checkpoint(self, trainer: Trainer, checkpoint: dict[str, Any]) -> None:
        """Called after a checkpoint was restored, before training resumes."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved in checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    # --- device state: arrays kept in `trainer.state.extras["callbacks"]` ---
    def init_device_state(self, trainer: Trainer, params: Any) -> Any:
        """Arrays this callback keeps on the accelerators (e.g. `EMA`'s average), or None.

        The trainer calls this while it builds the `TrainState` (inside `jax.jit` on a mesh) and
        keeps the result in `state.extras["callbacks"]`, so that it is sharded like the state,
        donated with it and saved in and restored from every checkpoint. Build new arrays from
        `params` with `jax.numpy` (the state is donated: never return `params`' own buffers).
        """
        return None

    @property
    def device_state_key(self) -> str:
        """This callback's key in `extras["callbacks"]`: `state_key` in letters, digits and `_`
        (it names arrays in checkpoints)."""
        return "".join(c if c.isalnum() else "_" for c in self.state_key)

    def device_state(self, trainer: Trainer) -> Any:
        """The arrays `init_device_state` made, as the trainer's state holds them now."""
        return trainer.state.extras["callbacks"][self.device_state_key]

    def set_device_state(self, trainer: Trainer, value: Any) -> None:
        """Replace this callback's arrays in the trainer's state (same structure and shapes)."""
        extras = trainer.state.extras
        owned = {**extras["callbacks"], self.device_state_key: value}
        trainer.state = trainer.state.replace(extras={**extras, "callbacks": owned})


def _plain_repr(value: Any) -> str:
    """`repr` of plain data; anything else (a function, an object) as `<TypeName>`, whose repr
    would differ from run to run."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    if isinstance(value, (list, tuple)):
        items = ", ".join(_plain_repr(v) for v in value)
        return (
            f"[{items}]"
            if isinstance(value, list)
            else f"({items}{',' if len(value) == 1 else ''})"
        )
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_plain_repr(v)}" for k, v in value.items()) + "}"
    return f"<{type(value).__name__}>"
