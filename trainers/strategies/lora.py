"""LoRA fine-tuning: train only the adapters of a model, forming targets like any other strategy.

`LoRAStrategy` wraps a strategy (usually a `RolloutStrategy`) instead of copying it: targets, loss,
cropping, prediction, controls and host state all come from the wrapped strategy, so LoRA rollout
fine-tuning sees exactly the rollouts, time stepping and gradient window of plain rollout training
(Bodnar et al. 2025, Suppl. D.4). What the wrapper changes is which parameters train:

* the LoRA leaves (`lora_A`, `lora_B`) train with AdamW at their own learning rate and schedule;
* every other leaf is frozen with `optax.set_to_zero()` inside `optax.multi_transform`, so the
  optimiser holds no state for it (Adam's `mu`/`nu` exist for the adapters only), and the loss
  sees it through `stop_gradient`, so the backward pass never forms its weight gradients;
* `train_base=True` trains the base too, with AdamW at a separate learning rate.

The LoRA modes (`single` / `from_second` / `all`), rank, alpha and `lora_steps` are the model's
(`Aurora(use_lora=True, lora_mode=..., lora_r=..., lora_alpha=..., lora_steps=...)`), because they
decide the architecture; the strategy only needs `model.use_lora`.

`merge` folds a trained adapter into the `qkv` / `proj` kernels (`W' = W + (B A)ᵀ · alpha / r`) and
returns parameters of the same model with `use_lora=False`; `export` writes them as an Orbax
checkpoint and a microsoft-aurora state dict (`.npz`).

Optimiser fields (on the optimiser config, next to `trainers.optim.make_optimizer`'s): any field of
that function prefixed `lora_` (e.g. `lora_learning_rate`, `lora_warmup_steps`, `lora_schedule`,
`lora_weight_decay`) applies to the adapters only, any prefixed `base_` to the base only; the
constructor's `lora_learning_rate` / `base_learning_rate` take precedence over the config.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from trainers.optim import make_optimizer
from trainers.state import TrainState
from trainers.strategies.base import Metrics, Strategy

__all__ = [
    "LORA_LEAVES",
    "LoRAStrategy",
    "is_lora_path",
    "lora_counts",
    "parameter_counts",
    "parameter_labels",
]

LORA_LEAVES = ("lora_A", "lora_B")
"""Names of the adapter parameters (`aurora.model.lora.LoRARollout`)."""

_GROUP_PREFIXES = ("lora_", "base_")

log = logging.getLogger(__name__)

Params = Any
KeyPath = tuple[str, ...]


def _key_names(path: tuple[Any, ...]) -> KeyPath:
    """A `jax.tree_util` key path -> plain names (dict keys / attribute names)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def is_lora_path(path: KeyPath) -> bool:
    """Whether a parameter path names an adapter leaf (`.../lora_qkv/lora_A` and the like)."""
    return bool(path) and path[-1] in LORA_LEAVES


def parameter_labels(params: Params, train_base: bool = False) -> Params:
    """Optimiser group per leaf: "lora" for adapters, "base" (trained) or "frozen" for the rest.

    Works on any tree with the parameters' structure (arrays, shape structs, masked trees).
    """
    base = "base" if train_base else "frozen"
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "lora" if is_lora_path(_key_names(p)) else base, params
    )


def parameter_counts(params: Params) -> dict[str, int]:
    """`{"lora": n, "total": n}` element counts; works on `jax.eval_shape` output (no allocation)."""
    flat = traverse_util.flatten_dict(dict(params))
    lora = sum(int(np.prod(v.shape)) for k, v in flat.items() if is_lora_path(k))
    return {"lora": lora, "total": sum(int(np.prod(v.shape)) for v in flat.values())}


def _blocks_are_silent(params: Params) -> bool:
    """Whether every AdaLN modulation (`ln_modulation*`) is zero, as at Aurora's initialisation.

    The modulation scales each Swin block's branch (AdaLN-Zero, as in microsoft-aurora), so with it
    zero the attention, and the LoRA adapters inside it, have no effect on the output.
    """
    flat = traverse_util.flatten_dict(dict(params))
    modulation = [v for k, v in flat.items() if any(part.startswith("ln_modulation") for part in k)]
    return bool(modulation) and not any(
        bool(np.any(np.asarray(jax.device_get(v)))) for v in modulation
    )


def _group_config(
    config: Any, prefix: str, learning_rate: float | None
) -> ml_collections.ConfigDict:
    """The optimiser config one parameter group sees: `<prefix>_<field>` overrides `<field>`.

    Lets `trainers.optim.make_optimizer` build each group's AdamW and schedule unchanged.
    """
    items = dict(config.items())
    group = {k: v for k, v in items.items() if not k.startswith(_GROUP_PREFIXES)}
    group |= {k[len(prefix) :]: v for k, v in items.items() if k.startswith(prefix)}
    if learning_rate is not None:
        group["learning_rate"] = float(learning_rate)
    return ml_collections.ConfigDict(group)


class LoRAStrategy(Strategy):
    """Train the LoRA adapters of `inner.model` (optionally the base too); see the module docstring.

    Args:
        inner: the strategy whose targets and loss to use, e.g. `RolloutStrategy(model, steps=4)`.
            Its model must have `use_lora=True`.
        lora_learning_rate: the adapters' peak learning rate; default the optimiser config's
            `lora_learning_rate`, else its `learning_rate`.
        train_base: also train the base parameters (AdamW at `base_learning_rate`).
        base_learning_rate: the base's peak learning rate; default the optimiser config's
            `base_learning_rate`, else its `learning_rate`.
    """

    def __init__(
        self,
        inner: Strategy,
        *,
        lora_learning_rate: float | None = None,
        train_base: bool = False,
        base_learning_rate: float | None = None,
    ):
        # Deliberately no `Strategy.__init__`: model, loss and statistics live in `inner` only.
        if not getattr(inner.model, "use_lora", False):
            raise ValueError(
                "LoRAStrategy needs a model with LoRA adapters: build it with use_lora=True "
                "(config: model.kwargs.use_lora=True); this model has use_lora=False."
            )
        self.inner = inner
        self.lora_learning_rate = lora_learning_rate
        self.train_base = train_base
        self.base_learning_rate = base_learning_rate

    @classmethod
    def wrapping(
        cls,
        inner: Callable[..., Strategy],
        model: Aurora,
        *,
        lora_learning_rate: float | None = None,
        train_base: bool = False,
        base_learning_rate: float | None = None,
        **inner_kwargs: Any,
    ) -> LoRAStrategy:
        """Build `inner(model, **inner_kwargs)` and wrap it: the config-driven constructor.

        `trainers.run.build_strategy` passes the strategy config's fields; those that are not the
        wrapper's own go to the inner strategy (`steps`, `backprop`, `loss`, ...).
        """
        return cls(
            inner(model, **inner_kwargs),
            lora_learning_rate=lora_learning_rate,
            train_base=train_base,
            base_learning_rate=base_learning_rate,
        )

    # --- the wrapped strategy's model and attributes ------------------------------------------------
    @property
    def model(self) -> Aurora:
        """The inner strategy's model; assignments (the Trainer's precision/remat clone) go there."""
        return self.inner.model

    @model.setter
    def model(self, model: Aurora) -> None:
        self.inner.model = model

    @property
    def remat(self) -> bool:
        """The inner strategy's `remat` (AttributeError if it has none, so `hasattr` is honest)."""
        return self.inner.remat

    @remat.setter
    def remat(self, value: bool) -> None:
        self.inner.remat = value

    def __getattr__(self, name: str) -> Any:
        """Anything else a caller reads (`steps`, `loss_config`, `stats`, ...) is the inner one's."""
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    # --- which parameters train ----------------------------------------------------------------------
    def trainable(self, params: Params) -> Params:
        """A boolean tree: which leaves the optimiser updates."""
        return jax.tree_util.tree_map(
            lambda label: label != "frozen", parameter_labels(params, self.train_base)
        )

    def make_optimizer(
        self,
        optim_config: Any,
        total_steps: int | None,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """AdamW per trained group, `set_to_zero` for frozen leaves; returns the adapters' schedule.

        Frozen leaves are split off first, so clipping (global norm over the trained leaves only,
        as Lightning clips the optimiser's parameters) and `MultiSteps` accumulation (buffers for
        the trained leaves only) run inside the trained branch, and nothing is allocated for the
        frozen base.
        """
        lora_tx, lora_schedule = make_optimizer(
            _group_config(optim_config, "lora_", self.lora_learning_rate), total_steps
        )
        groups: optax.GradientTransformation = lora_tx
        if self.train_base:
            base_tx, _ = make_optimizer(
                _group_config(optim_config, "base_", self.base_learning_rate), total_steps
            )
            groups = optax.multi_transform(
                {"lora": lora_tx, "base": base_tx}, lambda p: parameter_labels(p, train_base=True)
            )
        trained = groups
        if gradient_clip_val:
            trained = optax.chain(optax.clip_by_global_norm(float(gradient_clip_val)), trained)
        if accumulate_grad_batches > 1:
            trained = optax.MultiSteps(
                trained, every_k_schedule=accumulate_grad_batches
            ).gradient_transformation()
        tx = optax.multi_transform(
            {"trained": trained, "frozen": optax.set_to_zero()},
            lambda params: jax.tree_util.tree_map(
                lambda t: "trained" if t else "frozen", self.trainable(params)
            ),
        )
        return tx, lora_schedule

    def _freeze(self, params: Params) -> Params:
        """`stop_gradient` on frozen leaves: their gradient is a symbolic zero, never computed."""
        return jax.tree_util.tree_map(
            lambda p, t: p if t else jax.lax.stop_gradient(p), params, self.trainable(params)
        )

    # --- delegated to the inner strategy -------------------------------------------------------------
    def init_params(self, rng: jax.Array, inputs: Batch) -> Params:
        return self.inner.init_params(rng, inputs)

    def init_state(
        self, rng: jax.Array, inputs: Batch, tx: optax.GradientTransformation, params: Params = None
    ) -> TrainState:
        """The inner strategy's state; `params` without adapters (pretrained weights) get fresh ones.

        Fresh adapters start at `B = 0`, so the model initially predicts exactly as the base did.
        """
        if params is not None and not any(
            is_lora_path(k) for k in traverse_util.flatten_dict(dict(params))
        ):
            fresh = traverse_util.flatten_dict(
                dict(self.init_params(jax.random.fold_in(rng, 1), inputs))
            )
            flat = traverse_util.flatten_dict(dict(params))
            flat |= {k: v for k, v in fresh.items() if is_lora_path(k)}
            params = traverse_util.unflatten_dict(flat)
        state = self.inner.init_state(rng, inputs, tx, params)
        if not self.train_base and _blocks_are_silent(state.params):
            log.warning(
                "LoRAStrategy: the base looks freshly initialised (every AdaLN modulation is zero, so "
                "every Swin block's output and every LoRA gradient is exactly zero): the adapters "
                "cannot learn. Start from pretrained weights (config.init) or set train_base=True."
            )
        return state

    def default_controls(self) -> dict[str, Any]:
        return self.inner.default_controls()

    def train_examples(self, trainer: Any, iterator: Any, data: Any) -> Any:
        return self.inner.train_examples(trainer, iterator, data)

    def on_step_outputs(self, trainer: Any, outputs: Any) -> None:
        self.inner.on_step_outputs(trainer, outputs)

    def host_metrics(self) -> dict[str, float]:
        return self.inner.host_metrics()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)

    def array_state(self) -> dict[str, Any]:
        return self.inner.array_state()

    def load_array_state(self, arrays: dict[str, Any]) -> None:
        self.inner.load_array_state(arrays)

    def crop(self, batch: tuple[Batch, Batch]) -> tuple[Batch, Batch]:
        return self.inner.crop(batch)

    def predict(self, params: Params, batch: Batch) -> Batch:
        return self.inner.predict(params, batch)

    def loss_fn(
        self, params: Params, inputs: Batch, targets: Batch, controls: dict[str, Any]
    ) -> tuple[jax.Array, Metrics]:
        """The inner loss, with frozen leaves behind `stop_gradient`."""
        return self.inner.loss_fn(self._freeze(params), inputs, targets, controls)

    # --- merge and export ----------------------------------------------------------------------------
    def adapter_index(self, step: int | None) -> int | None:
        """Which adapter the model applies at rollout `step` (None: no adapter there).

        Merging is exact only where one adapter is fixed: in mode "single" the same adapter runs at
        every step `< lora_steps`, so `step` may be omitted. In "from_second" step 0 runs without
        the adapter and in "all" every step has its own, so a merged model can match one rollout
        step (or, for "from_second", steps 1 .. lora_steps - 1) only: `step` is required.
        """
        mode, n = self.model.lora_mode, self.model.lora_steps
        if step is None:
            if mode != "single":
                raise ValueError(
                    f"LoRA mode {mode!r} applies different adapters at different rollout steps, so no "
                    "single merged model is exact at every step; pass step= to merge the adapter of "
                    "one rollout step (the merged model is then exact at that step only)."
                )
            step = 0
        if step < 0 or step >= n or (mode == "from_second" and step == 0):
            return None
        return step if mode == "all" else 0

    def merged_model(self) -> Aurora:
        """The architecture `merge`'s parameters belong to: this model without LoRA."""
        return self.model.clone(use_lora=False)

    def merge(self, params: Params, step: int | None = None) -> Params:
        """Fold the adapter of rollout `step` into the base kernels and drop the LoRA leaves.

        LoRA adds `x Aᵀ Bᵀ · alpha / r` to a Dense layer `x W + b`, with Flax's kernel `W` laid out
        `(in, out)` and LoRA's `A (r, in)`, `B (out, r)`, so `W' = W + (B A)ᵀ · alpha / r`. Computed
        in float64 on the host and cast back to the kernel's dtype. In mode "single" the result
        equals the LoRA model at every rollout step `< lora_steps` (beyond that the LoRA model runs
        without adapters); see `adapter_index` for the other modes.
        """
        index = self.adapter_index(step)
        scale = self.model.lora_alpha / self.model.lora_r
        flat = traverse_util.flatten_dict(dict(params))
        merged = {k: v for k, v in flat.items() if not is_lora_path(k)}
        for path in [k for k in flat if k[-1] == "lora_A"]:
            module, name = path[:-2], path[-2]
            kernel_path = (*module, name.removeprefix("lora_"), "kernel")
            if kernel_path not in flat:
                raise KeyError(
                    f"No base kernel {'/'.join(kernel_path)} for the adapter {'/'.join(path[:-1])}."
                )
            if index is None:
                continue
            a = np.asarray(jax.device_get(flat[path]), np.float64)[index]  # (r, in)
            b = np.asarray(jax.device_get(flat[(*path[:-1], "lora_B")]), np.float64)[
                index
            ]  # (out, r)
            kernel = flat[kernel_path]
            w = np.asarray(jax.device_get(kernel), np.float64) + (b @ a).T * scale
            merged[kernel_path] = w.astype(np.dtype(kernel.dtype))
        return traverse_util.unflatten_dict(merged)

    def export(
        self, params: Params, directory: str | Path, step: int | None = None
    ) -> dict[str, Path]:
        """Write the merged parameters: `<directory>/params` (Orbax) and `pytorch_state_dict.npz`.

        The Orbax folder restores with `ocp.StandardCheckpointer().restore(path)` for
        `merged_model()`; the `.npz` loads with microsoft-aurora's `load_state_dict` for the same
        preset with `use_lora=False` (or with `aurora.convert.convert_pytorch_checkpoint`).
        """
        import orbax.checkpoint as ocp

        from aurora.convert import to_pytorch_state_dict

        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        merged = self.merge(params, step)
        paths = {"orbax": directory / "params", "pytorch": directory / "pytorch_state_dict.npz"}
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(paths["orbax"], jax.tree_util.tree_map(np.asarray, merged))
        np.savez(paths["pytorch"], **to_pytorch_state_dict(merged))
        return paths


def lora_counts(model: Aurora, batch: Batch) -> dict[str, int]:
    """LoRA and total parameter counts of `model` without allocating it (`jax.eval_shape`)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
    return parameter_counts(shapes)
