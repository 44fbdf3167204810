"""The strategy protocol and the optimisation step every strategy shares.

A strategy decides what one optimisation step is: how targets are formed (`loss_fn`), which
parameters train (its `trainable`, a `Trainable`), and whether host-side state exists. The rest
(gradients, the non-finite guard, the update, in-step measurements) is `train_step`, written once;
the Trainer jits it with the state donated and runs it on a configured copy of the strategy
(`with_model_options`), never on the strategy it was given.

Batches are `(inputs, targets)`: `inputs` an `aurora.Batch` with history, `targets` one `Batch`
per lead step (history 1) stacked on a leading axis of length K (see `stack_targets`). Host hooks
(`train_examples`, `on_step_outputs`, `state_dict`, `array_state`) let a strategy own more than
the jitted step, e.g. a replay buffer, without the Trainer knowing what it is.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from aurora.batch import Batch
from trainers.lead_time import lead_hours, uses_variable_lead_time
from trainers.loss import Loss, LossConfig, LossFn
from trainers.models import (
    DROPOUT_RNG,
    NOISE_RNG,
    configure_model,
    is_stochastic,
    patch_size,
    rng_streams,
)
from trainers.state import TrainState
from trainers.strategies.trainable import Trainable, TrainableSpec, is_lora_path

if TYPE_CHECKING:  # pragma: no cover
    from trainers.data import Example

__all__ = ["OUTPUTS", "Strategy", "global_norm", "stack_targets"]

Metrics = dict[str, jax.Array]

log = logging.getLogger(__name__)

OUTPUTS = "outputs"
"""Key under which `loss_fn` returns host-bound arrays; never averaged, measured or logged."""


def stack_targets(targets: Sequence[Batch]) -> Batch:
    """Stack K target batches for `lax.scan`.

    Args:
        targets: K batches of one time step each, fields `(b, 1, ...)`.

    Returns:
        One Batch whose leaves have a leading K axis, fields `(K, b, 1, ...)`.
    """
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *targets)


def global_norm(tree: Any) -> jax.Array:
    """The L2 norm over every leaf of `tree`, a float32 scalar."""
    return optax.tree.norm(tree).astype(jnp.float32)


def _all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _has_adapters(params: Any) -> bool:
    return any(is_lora_path(k) for k in traverse_util.flatten_dict(dict(params)))


def _warn_if_blocks_are_silent(params: Any) -> None:
    """Warn if every AdaLN modulation (`ln_modulation*`) is zero, as at Aurora's initialisation.

    The modulation scales each Swin block's branch (AdaLN-Zero, as in microsoft-aurora), so with it
    zero the attention, and the LoRA adapters inside it, have no effect on the output. The test is
    part of the computation (a `jax.debug.callback`), so it also holds when the state is created
    inside `jit`, sharded, as the Trainer does on a mesh.
    """
    flat = traverse_util.flatten_dict(dict(params))
    modulation = [v for k, v in flat.items() if any(part.startswith("ln_modulation") for part in k)]
    if modulation:
        silent = jnp.logical_not(jnp.any(jnp.stack([jnp.any(v != 0) for v in modulation])))
        jax.debug.callback(_warn_silent, silent)


def _warn_silent(silent: Any) -> None:
    if bool(silent):
        log.warning(
            "Only the LoRA adapters train, but the base looks freshly initialised (every AdaLN "
            "modulation is zero, so every Swin block's output and every LoRA gradient is "
            "exactly zero): the adapters cannot learn. Start from pretrained weights "
            "(config.init) or train the base too (train_base=True)."
        )


class Strategy:
    """Base strategy: one-step prediction of the first target. Subclasses override `loss_fn`.

    Args:
        model: the model: Aurora, or any Flax module with its `Batch -> Batch` interface (see
            `trainers.models`).
        loss: the loss: a `trainers.loss.Loss`, a loss function, or Aurora's loss weights
            (`LossConfig`); default Aurora's loss with the paper's weights.
        stats: normalisation statistics beyond Aurora's table (default the model's `surf_stats`).
        trainable: which parameters train: "all" (default), "lora" (the adapters only), a
            predicate over parameter paths, or a `Trainable` (e.g. `Trainable.lora(1e-4,
            train_base=True)`); see `trainers.strategies.trainable`.
    """

    model_key: jax.Array | None = None
    """The key this copy's model calls draw from, set by `in_training` (drop-out and noise) and
    `in_evaluation` (noise); None: the model is called without randomness."""

    training: bool = False
    """Whether this copy's model calls train (drop-out on), as `in_training` makes it."""

    def __init__(
        self,
        model: Any,
        loss: Loss | LossConfig | LossFn | None = None,
        stats: dict[str, tuple[float, float]] | None = None,
        trainable: TrainableSpec = "all",
    ):
        self.model = model
        self.loss = Loss.of(loss)
        model_stats = getattr(model, "surf_stats", None)
        self.stats = stats if stats is not None else (dict(model_stats) if model_stats else None)
        self.trainable = self._checked_trainable(trainable)

    # --- configured copies ------------------------------------------------------------------------
    def _checked_trainable(self, trainable: TrainableSpec) -> Trainable:
        trainable = Trainable.of(trainable)
        if trainable.uses_adapters and not getattr(self.model, "use_lora", False):
            raise ValueError(
                "Training LoRA adapters needs a model with them: build it with use_lora=True "
                "(config: model.kwargs.use_lora=True); this model has use_lora=False."
            )
        return trainable

    def _replace(self, **changes: Any) -> Self:
        """A copy with `changes` set; host state is copied too, the model is shared."""
        new = copy.deepcopy(self, {id(self.model): self.model})
        for name, value in changes.items():
            setattr(new, name, value)
        return new

    def with_trainable(self, trainable: TrainableSpec) -> Self:
        """This strategy, copied, with other trainable parameters (see the class's `trainable`)."""
        return self._replace(trainable=self._checked_trainable(trainable))

    def with_model_options(self, *, precision: str = "32", remat: str = "none") -> Self:
        """A copy whose model runs at `precision` and rematerialises per `remat`.

        Args:
            precision: "32", or "bf16-mixed" (the backbone computes in bfloat16).
            remat: "none"; "backbone" (Swin blocks and level Perceivers); "stages" (also whole
                backbone stages); "all" (also each rollout step, for strategies that roll out).

        Returns:
            A strategy of the same class; this one is left unchanged.

        Raises:
            ValueError: the model cannot take what was asked (`trainers.models.configure_model`).
        """
        return self._replace(model=configure_model(self.model, precision=precision, remat=remat))

    # --- host side --------------------------------------------------------------------------------
    def init_params(self, rng: jax.Array, inputs: Batch) -> Any:
        """Fresh parameters of the model for batches like `inputs`."""
        return jax.jit(self.model.init)(rng, inputs)["params"]

    def make_optimizer(
        self, optim_config: Any, total_steps: int | None, **options: Any
    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """The optimiser of the trainable parameters: `Trainable.make_optimizer`, which documents
        the arguments (`gradient_clip_val`, `accumulate_grad_batches`) and the result."""
        return self.trainable.make_optimizer(optim_config, total_steps, **options)

    def init_state(
        self, rng: jax.Array, inputs: Batch, tx: optax.GradientTransformation, params: Any = None
    ) -> TrainState:
        """The first training state: `params` (default fresh ones), `tx`'s state and an RNG.

        Pretrained `params` without LoRA adapters, for a model with them, get fresh adapters;
        these start at `B = 0`, so the model initially predicts exactly as the base did.
        """
        init_rng, state_rng = jax.random.split(rng)
        if params is None:
            params = self.init_params(init_rng, inputs)
        elif getattr(self.model, "use_lora", False) and not _has_adapters(params):
            fresh = traverse_util.flatten_dict(
                dict(self.init_params(jax.random.fold_in(rng, 1), inputs))
            )
            flat = traverse_util.flatten_dict(dict(params))
            flat |= {k: v for k, v in fresh.items() if is_lora_path(k)}
            params = traverse_util.unflatten_dict(flat)
        if self.trainable.adapters_only:
            _warn_if_blocks_are_silent(params)
        return TrainState.create(params, tx, state_rng)

    def default_controls(self) -> dict[str, Any]:
        """Traced per-step inputs set from the host (e.g. the gradient window); changing them does
        not recompile."""
        return {}

    def train_examples(
        self, trainer: Any, iterator: Iterable[Example], data: Any
    ) -> Iterator[Example]:
        """What the training steps of one epoch consume; the epoch ends when this is exhausted.

        Args:
            trainer: the Trainer (for the global step).
            iterator: the training data's examples for this epoch.
            data: the training `DataSource` (for strategies that need random access to it).

        Returns:
            Examples `(inputs, targets)`; by default the iterator's, as they come.
        """
        return iter(iterator)

    def on_step_outputs(self, trainer: Any, outputs: Any) -> None:
        """Receives `metrics[OUTPUTS]` of each training step (device arrays), if any.

        Args:
            trainer: the Trainer (for the global step).
            outputs: the arrays `loss_fn` returned under `OUTPUTS`.
        """

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

    def save_process_state(self, directory: Path, step: int) -> None:
        """Write this process's own host state for checkpoint `step` of the checkpoint folder
        `directory`, before the checkpoint itself is written; every process calls it (e.g. one
        replay buffer per process, where `state_dict` and `array_state` hold process 0's only)."""

    def prune_process_state(self, directory: Path, steps: Iterable[int]) -> None:
        """Forget what `save_process_state` wrote into `directory` for steps other than `steps`
        (the checkpoints it still holds)."""

    def load_process_state(self, directory: Path, step: int, shared: dict[str, Any]) -> None:
        """Read this process's host state of checkpoint `step` of `directory` (`shared`: the
        checkpoint's `state_dict()`); raising makes the restore fall back to an older
        checkpoint."""

    # --- pure, jitted by the trainer --------------------------------------------------------------
    def crop(self, batch: tuple[Batch, Batch]) -> tuple[Batch, Batch]:
        """Drop a surplus latitude row (721 -> 720) from inputs and targets, as the model does."""
        inputs, targets = batch
        size = patch_size(self.model)
        return inputs.crop(size), targets.crop(size)

    def predict(self, params: Any, batch: Batch, lead_times: jax.Array | None = None) -> Batch:
        """One model step from `batch` (fields `(b, 2, ...)`): the next state, `(b, 1, ...)`;
        `lead_times` (hours, `(b,)`) only for a model with `variable_lead_time`."""
        lead = () if lead_times is None else (lead_times,)
        return self.apply_model(params, batch, *lead)

    def apply_model(self, params: Any, batch: Batch, *args: Any) -> Batch:
        """`model.apply` on `batch` (and `args`), drawing from `model_key` if this copy has one.

        The key is folded with the batch's rollout step and first valid time, so every step of a
        rollout and every replayed row draws its own masks and noise; the call's key is then
        split into the "dropout" key (in training, a model with drop-out) and the "noise" key (a
        stochastic model), the two streams `rng_streams` names.
        """
        streams = rng_streams(self.model, self.training)
        if self.model_key is None or not streams:
            return self.model.apply({"params": params}, batch, *args)
        meta = batch.metadata
        key = jax.random.fold_in(self.model_key, jnp.ravel(jnp.asarray(meta.rollout_step))[0])
        key = jax.random.fold_in(key, jnp.ravel(jnp.asarray(meta.time))[0])
        dropout, noise = jax.random.split(key)
        keys = {DROPOUT_RNG: dropout, NOISE_RNG: noise}
        rngs = {name: keys[name] for name in streams}
        train = {"deterministic": False} if DROPOUT_RNG in rngs else {}
        return self.model.apply({"params": params}, batch, *args, rngs=rngs, **train)

    def in_training(self, state: TrainState) -> Self:
        """This strategy, or for a model with drop-out (`trainers.models.uses_dropout`) or noise
        (`trainers.models.is_stochastic`) a shallow copy whose `apply_model` trains with a key of
        this step: `fold_in(state.rng, state.step)`, so a resumed run draws the same masks and
        noise. Evaluation and prediction use the strategy itself (or `in_evaluation`'s copy):
        without drop-out."""
        if not rng_streams(self.model, training=True):
            return self
        training = copy.copy(self)
        training.model_key = jax.random.fold_in(state.rng, state.step)
        training.training = True
        return training

    def in_evaluation(self, seed: int) -> Self:
        """This strategy, or for a stochastic model a shallow copy whose `apply_model` draws its
        noise from `seed`: a validation or test loss is then reproducible, the same on a re-run
        and after a resume, and the same checkpoint always meets the same noise.

        The key is member 0's of the ensemble forecasts' rule
        (`trainers.evaluation.forecasts.member_key`: the seed's key with the member index folded
        in), to which each model call folds its rollout step and valid time (`apply_model`).
        """
        if not is_stochastic(self.model):
            return self
        evaluating = copy.copy(self)
        evaluating.model_key = jax.random.fold_in(jax.random.key(seed), 0)
        evaluating.training = False
        return evaluating

    def predict_to(self, params: Any, batch: Batch, target: Batch) -> Batch:
        """One model step from `batch` to `target`'s valid time: a model with
        `variable_lead_time` gets the lead between them as data (`trainers.lead_time`), any
        other steps its own time step."""
        if not uses_variable_lead_time(self.model):
            return self.predict(params, batch)
        return self.predict(params, batch, lead_hours(batch, target))

    def step_loss(self, pred: Batch, target: Batch) -> tuple[jax.Array, Metrics]:
        """One step's loss and metrics, on the variables as the model normalises them.

        The model's `_pre_norm_hook`, if any, goes over prediction and target first: Aurora 1.5
        log-transforms its `scaled_*` variables there (precipitation, snowfall, snow depth), and
        their normalisation statistics are those of the transformed values.
        """
        to_normalised_space = getattr(self.model, "_pre_norm_hook", None)
        if to_normalised_space is not None:
            pred, target = to_normalised_space(pred), to_normalised_space(target)
        return self.loss(pred, target, self.stats)

    def loss_fn(
        self, params: Any, inputs: Batch, targets: Batch, controls: dict[str, Any]
    ) -> tuple[jax.Array, Metrics]:
        """Scalar loss and metrics. Default: one step against the first target.

        Args:
            params: the model parameters.
            inputs: the input batch, fields `(b, history, ...)`.
            targets: the targets stacked on a leading axis, fields `(K, b, 1, ...)`.
            controls: traced per-step inputs.

        Returns:
            The loss (a scalar) and named metrics (scalars; host-bound arrays under `OUTPUTS`).
        """
        first = jax.tree_util.tree_map(lambda x: x[0], targets)
        loss, terms = self.step_loss(self.predict_to(params, inputs, first), first)
        return self.loss.over_leads(loss[None]), terms

    def train_step(
        self,
        state: TrainState,
        batch: tuple[Batch, Batch],
        controls: dict[str, Any],
        measurements: tuple[str, ...] = (),
    ) -> tuple[TrainState, Metrics]:
        """One optimisation step: gradients, a guarded update and the requested measurements.

        A non-finite gradient leaves the state unchanged but for the step counter (the update is
        skipped). Frozen parameters reach `loss_fn` behind `stop_gradient` (`Trainable.freeze`).

        Args:
            state: the training state (donated by the Trainer).
            batch: `(inputs, targets)`, targets stacked on a leading K axis.
            controls: traced per-step inputs (`default_controls`, changed by callbacks).
            measurements: extra scalars to compute: "grad_norm", "update_norm", "param_norm".

        Returns:
            The new state and scalar metrics (`loss`, `loss_fn`'s terms, the measurements,
            `grads_finite`); `metrics[OUTPUTS]` from `loss_fn` passes through untouched.
        """
        inputs, targets = self.crop(batch)
        training = self.in_training(state)
        frozen_loss = lambda params, *args: training.loss_fn(self.trainable.freeze(params), *args)
        (loss, metrics), grads = jax.value_and_grad(frozen_loss, has_aux=True)(
            state.params, inputs, targets, controls
        )
        finite = _all_finite(grads)
        # A conditional, not an elementwise select between the new and the old state: selecting
        # over every parameter and optimiser leaf makes XLA's compile of the step much slower.
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
        """`loss` and `loss_fn`'s scalar terms on `batch`, without gradients or host outputs."""
        inputs, targets = self.crop(batch)
        loss, metrics = self.loss_fn(state.params, inputs, targets, controls)
        metrics = {k: v for k, v in metrics.items() if k != OUTPUTS}
        return {"loss": loss, **metrics}
