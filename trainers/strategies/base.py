"""The strategy protocol and the optimisation step every strategy shares.

A strategy decides what one optimisation step is: how targets are formed (`loss_fn`), which
parameters train (`make_optimizer`), and whether host-side state exists (`state_dict`). Everything
else — gradients, the non-finite guard, the update, in-step measurements — is this module's
`train_step`, written once. The Trainer jits `train_step` with the state donated.

Batches are `(inputs, targets)`: `inputs` an `aurora.Batch` with history, `targets` one `Batch`
per lead step (history 1) stacked on a leading axis of length K (see `stack_targets`).

Host hooks let a strategy own more than the jitted step without the Trainer knowing what it is:
`train_examples` chooses what each step trains on (a replay buffer draws from its buffer and pulls
from the data only now and then), `loss_fn` may return arrays the host needs under
`metrics[OUTPUTS]` (e.g. predictions to push back into the buffer), which the Trainer hands to
`on_step_outputs`; `state_dict` / `array_state` are checkpointed (JSON and Orbax arrays).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from trainers.loss import LossConfig, aurora_loss
from trainers.optim import make_optimizer
from trainers.state import TrainState

if TYPE_CHECKING:  # pragma: no cover
    from trainers.data import Example

__all__ = ["OUTPUTS", "Strategy", "global_norm", "stack_targets"]

Metrics = dict[str, jax.Array]

OUTPUTS = "outputs"
"""Key under which `loss_fn` returns host-bound arrays; never averaged, measured or logged."""


def stack_targets(targets: Sequence[Batch]) -> Batch:
    """K target batches -> one Batch whose leaves have a leading K axis (scan-ready)."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *targets)


def global_norm(tree: Any) -> jax.Array:
    return optax.tree.norm(tree).astype(jnp.float32)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


class Strategy:
    """Base strategy: one-step prediction of the first target. Subclasses override `loss_fn`."""

    def __init__(
        self,
        model: Aurora,
        loss: LossConfig | None = None,
        stats: dict[str, tuple[float, float]] | None = None,
    ):
        self.model = model
        self.loss_config = loss or LossConfig()
        self.stats = (
            stats if stats is not None else (dict(model.surf_stats) if model.surf_stats else None)
        )

    # --- host side --------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array, inputs: Batch) -> Any:
        return jax.jit(self.model.init)(rng, inputs)["params"]

    def make_optimizer(
        self, optim_config: Any, total_steps: int | None, **kwargs: Any
    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """Which parameters train and how. The base strategy trains everything."""
        return make_optimizer(optim_config, total_steps, **kwargs)

    def init_state(
        self, rng: jax.Array, inputs: Batch, tx: optax.GradientTransformation, params: Any = None
    ) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = self.init_params(init_rng, inputs)
        return TrainState.create(params, tx, state_rng)

    def default_controls(self) -> dict[str, Any]:
        """Traced per-step inputs set from the host (e.g. the gradient window); changing them does
        not recompile."""
        return {}

    def train_examples(
        self, trainer: Any, iterator: Iterable[Example], data: Any
    ) -> Iterator[Example]:
        """What the training steps of one epoch consume; the epoch ends when this is exhausted.

        Default: the data iterator's examples as they come. `data` is the training `DataSource`
        (for strategies that need random access to it) and `trainer` gives the global step.
        """
        return iter(iterator)

    def on_step_outputs(self, trainer: Any, outputs: Any) -> None:
        """Receives `metrics[OUTPUTS]` of each training step (device arrays), if any."""

    def host_metrics(self) -> dict[str, float]:
        """Host-side scalars logged with the training metrics (e.g. the replay buffer's size)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Host-side strategy state to checkpoint, JSON-serialisable (e.g. a replay buffer's index
        and RNG)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def array_state(self) -> dict[str, Any]:
        """Host-side arrays to checkpoint (a nested dict of numpy arrays; e.g. replay entries)."""
        return {}

    def load_array_state(self, arrays: dict[str, Any]) -> None:
        pass

    # --- pure, jitted by the trainer ---------------------------------------------------------------
    def crop(self, batch: tuple[Batch, Batch]) -> tuple[Batch, Batch]:
        """Drop a surplus latitude row (721 -> 720) from inputs and targets alike, as the model does."""
        inputs, targets = batch
        return inputs.crop(self.model.patch_size), targets.crop(self.model.patch_size)

    def predict(self, params: Any, batch: Batch) -> Batch:
        return self.model.apply({"params": params}, batch)

    def loss_fn(
        self, params: Any, inputs: Batch, targets: Batch, controls: dict[str, Any]
    ) -> tuple[jax.Array, Metrics]:
        """Scalar loss and metrics. Default: one step against the first target."""
        first = jax.tree_util.tree_map(lambda x: x[0], targets)
        loss, terms = aurora_loss(self.predict(params, inputs), first, self.loss_config, self.stats)
        return loss, terms

    def train_step(
        self,
        state: TrainState,
        batch: tuple[Batch, Batch],
        controls: dict[str, Any],
        measurements: tuple[str, ...] = (),
    ) -> tuple[TrainState, Metrics]:
        """Gradients, a guarded update (a non-finite gradient leaves the state unchanged but for the
        step counter, so the update is skipped), and the requested measurements. `metrics[OUTPUTS]`
        from `loss_fn` passes through untouched."""
        inputs, targets = self.crop(batch)
        (loss, metrics), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
            state.params, inputs, targets, controls
        )
        finite = _all_finite(grads)
        # A conditional, not an elementwise select between the new and the old state: selecting
        # over every parameter and optimiser leaf made XLA's CPU compile of the step ~8x slower.
        new_state, updates = jax.lax.cond(
            finite,
            lambda: state.apply_gradients(grads),
            lambda: (state, jax.tree_util.tree_map(jnp.zeros_like, state.params)),
        )
        new_state = new_state.replace(step=state.step + 1)

        metrics = {"loss": loss, **metrics}
        if "grad_norm" in measurements:
            metrics["grad_norm"] = global_norm(grads)
        if "update_norm" in measurements:
            metrics["update_norm"] = global_norm(updates)
        if "param_norm" in measurements:
            metrics["param_norm"] = global_norm(new_state.params)
        metrics["grads_finite"] = finite.astype(jnp.float32)
        return new_state, metrics

    def eval_step(
        self, state: TrainState, batch: tuple[Batch, Batch], controls: dict[str, Any]
    ) -> Metrics:
        inputs, targets = self.crop(batch)
        loss, metrics = self.loss_fn(state.params, inputs, targets, controls)
        metrics = {k: v for k, v in metrics.items() if k != OUTPUTS}
        return {"loss": loss, **metrics}
