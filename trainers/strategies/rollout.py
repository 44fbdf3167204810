"""Multi-step rollout training: each prediction becomes the next input, as in inference.

Time and `rollout_step` advance as in `aurora.rollout` (the same `advance_batch`), so LoRA adapters
and time encodings see what they will see at inference. The K steps run in a rematerialised
`lax.scan`: one traced model call whatever K, one step's activations in memory.

Gradient window `w` (`backprop`: "all" w = K, "last_k" w = k, "pushforward" w = 1, Brandstetter
et al. 2022): the inputs of steps 1 .. K - w are detached, so each of those steps trains only its
own call, and the last w steps back-propagate through every call from step K - w on. A static
window runs the leading steps in a scan of their own, without gradients when only the last loss
counts (`average_loss=False`). With `curriculum=True` the window is a traced control that
`GradStop` changes without recompiling, so the step always pays for the full backward pass.
"""

from __future__ import annotations

from typing import Any, Literal, Self

import jax
import jax.numpy as jnp

from aurora.batch import Batch
from aurora.rollout import advance_batch
from trainers.loss import Loss, LossConfig, LossFn
from trainers.strategies.base import Metrics, Strategy
from trainers.strategies.trainable import TrainableSpec

__all__ = ["Backprop", "RolloutStrategy"]

Backprop = Literal["all", "last_k", "pushforward"]


def _detach_fields(batch: Batch, detach: jax.Array) -> Batch:
    """Stop gradients through the fields (not the metadata) where `detach` is true."""
    cut = lambda x: jnp.where(detach, jax.lax.stop_gradient(x), x)
    return batch.replace(
        surf_vars={k: cut(v) for k, v in batch.surf_vars.items()},
        atmos_vars={k: cut(v) for k, v in batch.atmos_vars.items()},
    )


class RolloutStrategy(Strategy):
    """Train on K-step rollouts against K targets; see the module docstring.

    Args:
        model: the model (Aurora, or any Flax module with its `Batch -> Batch` interface).
        steps: K, the rollout's model calls (the batch must hold at least K targets).
        backprop: the gradient window: "all" (K), "last_k" (`k`) or "pushforward" (1).
        k: the window for `backprop="last_k"`.
        average_loss: average the K step losses, weighted by the loss's `lead_weights` if it has
            them (else only the last one counts).
        loss: the loss (a `Loss`, a loss function or Aurora's weights, see `Strategy`).
        stats: normalisation statistics beyond Aurora's table.
        remat: rematerialise each rollout step (activations of one step in memory).
        curriculum: make the window a traced control (`GradStop` changes it without recompiling).
        trainable: which parameters train ("all", "lora", a path predicate or a `Trainable`).
    """

    def __init__(
        self,
        model: Any,
        steps: int = 1,
        backprop: Backprop = "all",
        k: int = 1,
        average_loss: bool = True,
        loss: Loss | LossConfig | LossFn | None = None,
        stats: dict[str, tuple[float, float]] | None = None,
        remat: bool = True,
        curriculum: bool = False,
        trainable: TrainableSpec = "all",
    ):
        super().__init__(model, loss, stats, trainable)
        if backprop not in ("all", "last_k", "pushforward"):
            raise ValueError(
                f"backprop must be 'all', 'last_k' or 'pushforward', not {backprop!r}."
            )
        if steps < 1 or not 1 <= k <= steps:
            raise ValueError(f"Need steps >= 1 and 1 <= k <= steps (steps={steps}, k={k}).")
        self.loss.check_steps(steps)
        if self.loss.lead_weights and not average_loss:
            raise ValueError(
                "loss.lead_weights weigh the steps' losses, average_loss=False keeps only the "
                "last one: use lead_weights (0, ..., 0, 1) instead."
            )
        self.steps = steps
        self.backprop = backprop
        self.k = k
        self.average_loss = average_loss
        self.remat = remat
        self.curriculum = curriculum

    @property
    def window(self) -> int:
        """The configured gradient window (`GradStop` may change it when `curriculum=True`)."""
        return {"all": self.steps, "last_k": self.k, "pushforward": 1}[self.backprop]

    def default_controls(self) -> dict[str, Any]:
        """`{"grad_window": w}` with `curriculum=True`, else nothing."""
        return {"grad_window": jnp.int32(self.window)} if self.curriculum else {}

    def with_model_options(self, *, precision: str = "32", remat: str = "none") -> Self:
        """As `Strategy.with_model_options`; `remat="all"` also rematerialises each rollout step."""
        new = super().with_model_options(precision=precision, remat=remat)
        new.remat = remat == "all" or self.remat
        return new

    def _scan(
        self, params: Any, batch: Batch, targets: Batch, steps: jax.Array, detach: Any
    ) -> tuple[Batch, tuple[jax.Array, Metrics]]:
        """Steps `steps` of the rollout from `batch`; `detach(i, .)` cuts step i's output."""

        def step(
            batch: Batch, xs: tuple[jax.Array, Batch]
        ) -> tuple[Batch, tuple[jax.Array, Metrics]]:
            i, target = xs
            pred = self.predict_to(params, batch, target)
            loss, terms = self.step_loss(pred, target)
            return detach(i, advance_batch(batch, pred)), (loss, terms)

        body = jax.checkpoint(step) if self.remat else step
        return jax.lax.scan(body, batch, (steps, targets))

    def rollout_losses(
        self, params: Any, inputs: Batch, targets: Batch, window: jax.Array | int
    ) -> tuple[jax.Array, Metrics]:
        """The loss of every rollout step.

        A traced `window` detaches by `jnp.where` inside one scan; a Python int splits the rollout
        into a detached leading scan (gradient-free when only the last loss counts) and the rest.

        Args:
            params: the model parameters.
            inputs: the first input batch, fields `(b, history, ...)`.
            targets: at least K targets stacked on a leading axis, fields `(>=K, b, 1, ...)`.
            window: the gradient window, a Python int or a traced int32 scalar.

        Returns:
            Per-step losses `(K,)` and per-step metrics `{name: (K,)}`.
        """
        K = self.steps
        n_targets = jax.tree_util.tree_leaves(targets)[0].shape[0]
        if n_targets < K:
            raise ValueError(f"The rollout has {K} steps but the batch holds {n_targets} targets.")
        take = lambda lo, hi: jax.tree_util.tree_map(lambda x: x[lo:hi], targets)
        if not isinstance(window, int):
            where = lambda i, b: _detach_fields(b, (i + 1) <= K - window)
            _, (losses, terms) = self._scan(params, inputs, take(0, K), jnp.arange(K), where)
            return losses, terms

        lead = K - min(max(window, 1), K)
        cut = lambda i, b: _detach_fields(b, jnp.bool_(True))
        keep = lambda i, b: b
        parts = []
        batch = inputs
        if lead:
            lead_params = params if self.average_loss else jax.lax.stop_gradient(params)
            batch, part = self._scan(lead_params, batch, take(0, lead), jnp.arange(lead), cut)
            parts.append(part)
        _, part = self._scan(params, batch, take(lead, K), jnp.arange(lead, K), keep)
        parts.append(part)
        losses, terms = jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs), *parts)
        return losses, terms

    def loss_fn(
        self, params: Any, inputs: Batch, targets: Batch, controls: dict[str, Any]
    ) -> tuple[jax.Array, Metrics]:
        """The (`lead_weights`-) mean or the last step loss, metrics averaged over steps and
        `loss/step<i>` per step."""
        window = controls.get("grad_window", self.window)
        losses, terms = self.rollout_losses(params, inputs, targets, window)
        loss = self.loss.over_leads(losses) if self.average_loss else losses[-1]
        metrics = {name: jnp.mean(values) for name, values in terms.items()}
        metrics |= (
            {f"loss/step{i + 1}": losses[i] for i in range(self.steps)} if self.steps > 1 else {}
        )
        return loss, metrics
