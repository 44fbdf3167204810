"""LoRA fine-tuning: any strategy with only its LoRA adapters trainable; merge and export.

LoRA is a property of a strategy, not a wrapper around one: `LoRAStrategy(RolloutStrategy(...))`
is that RolloutStrategy with `trainable=Trainable.lora(...)`, so it trains on exactly the
rollouts, time stepping and gradient window of plain rollout training (Bodnar et al. 2025,
Suppl. D.4). The adapters train with AdamW at their own learning rate (optimiser fields `lora_*`,
e.g. `lora_learning_rate`); the base is frozen, or trains too with `train_base=True` (fields
`base_*`). The LoRA mode, rank, alpha and `lora_steps` are the model's (`Aurora(use_lora=True,
...)`), because they decide the architecture.

`merge_adapters` folds a trained adapter into the `qkv` / `proj` kernels and `export_merged`
writes the result as an Orbax checkpoint and a microsoft-aurora state dict (`.npz`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import jax
import numpy as np
from flax import traverse_util

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from trainers.strategies.base import Strategy
from trainers.strategies.trainable import LORA_LEAVES, Trainable, is_lora_path

__all__ = [
    "LORA_LEAVES",
    "LoRAStrategy",
    "adapter_index",
    "export_merged",
    "is_lora_path",
    "lora_counts",
    "merge_adapters",
    "merged_model",
    "parameter_counts",
    "parameter_labels",
]

Params = Any
S = TypeVar("S", bound=Strategy)


def parameter_labels(params: Params, train_base: bool = False) -> Params:
    """The optimiser group of every leaf under LoRA training.

    Args:
        params: any tree with the parameters' structure (arrays, shape structs, masked trees).
        train_base: whether the base trains too.

    Returns:
        A tree of "lora" (adapters), "base" (trained base) or "frozen" per leaf.
    """
    return Trainable.lora(train_base=train_base).labels(params)


def parameter_counts(params: Params) -> dict[str, int]:
    """Element counts of the adapters and of everything.

    Args:
        params: the parameters, or their `jax.eval_shape` (nothing is allocated).

    Returns:
        `{"lora": n, "total": n}`.
    """
    flat = traverse_util.flatten_dict(dict(params))
    lora = sum(int(np.prod(v.shape)) for k, v in flat.items() if is_lora_path(k))
    return {"lora": lora, "total": sum(int(np.prod(v.shape)) for v in flat.values())}


class LoRAStrategy:
    """Ask for LoRA fine-tuning of a strategy; returns that strategy with LoRA trainables.

    Not a wrapper, and never an instance of this class: `LoRAStrategy(strategy, ...)` is
    `strategy.with_trainable(Trainable.lora(...))`, a copy of `strategy` of the same class whose
    `trainable` is the adapters (and, with `train_base`, the base in a group of its own).

    Args:
        strategy: the strategy whose targets and loss to use, e.g.
            `RolloutStrategy(model, steps=4)`. Its model must have `use_lora=True`.
        lora_learning_rate: the adapters' peak learning rate; default the optimiser config's
            `lora_learning_rate`, else its `learning_rate`.
        train_base: also train the base parameters (AdamW at `base_learning_rate`).
        base_learning_rate: the base's peak learning rate; default the optimiser config's
            `base_learning_rate`, else its `learning_rate`.

    Returns:
        A strategy of `strategy`'s class; `strategy` itself is left unchanged.
    """

    def __new__(
        cls,
        strategy: S,
        *,
        lora_learning_rate: float | None = None,
        train_base: bool = False,
        base_learning_rate: float | None = None,
    ) -> S:
        return strategy.with_trainable(
            Trainable.lora(
                lora_learning_rate, train_base=train_base, base_learning_rate=base_learning_rate
            )
        )

    @staticmethod
    def wrapping(
        inner: Callable[..., S],
        model: Aurora,
        *,
        lora_learning_rate: float | None = None,
        train_base: bool = False,
        base_learning_rate: float | None = None,
        **inner_kwargs: Any,
    ) -> S:
        """`inner(model, **inner_kwargs)` with LoRA trainables: the config-driven constructor.

        `trainers.run.build_strategy` passes the strategy config's fields; those that are not
        LoRA's own go to `inner` (`steps`, `backprop`, `loss`, ...).

        Args:
            inner: a strategy class (or factory), e.g. `RolloutStrategy` or `ReplayStrategy`.
            model: the Aurora model, with `use_lora=True`.
            lora_learning_rate: as for `LoRAStrategy`.
            train_base: as for `LoRAStrategy`.
            base_learning_rate: as for `LoRAStrategy`.
            **inner_kwargs: `inner`'s other arguments.

        Returns:
            The strategy `inner` builds, training the adapters.
        """
        return LoRAStrategy(
            inner(model, **inner_kwargs),
            lora_learning_rate=lora_learning_rate,
            train_base=train_base,
            base_learning_rate=base_learning_rate,
        )


# --- merge and export -----------------------------------------------------------------------------
def adapter_index(model: Aurora, step: int | None) -> int | None:
    """Which adapter `model` applies at rollout `step`.

    Merging is exact only where one adapter is fixed: in mode "single" the same adapter runs at
    every step `< lora_steps`, so `step` may be omitted. In "from_second" step 0 runs without the
    adapter and in "all" every step has its own, so a merged model can match one rollout step
    (or, for "from_second", steps 1 .. lora_steps - 1) only: `step` is required.

    Args:
        model: an Aurora with `use_lora=True`.
        step: the rollout step, or None (mode "single" only).

    Returns:
        The index into the adapters' leading axis, or None where no adapter runs.
    """
    mode, n = model.lora_mode, model.lora_steps
    if step is None:
        if mode != "single":
            raise ValueError(
                f"LoRA mode {mode!r} applies different adapters at different rollout steps, so "
                "no single merged model is exact at every step; pass step= to merge the adapter "
                "of one rollout step (the merged model is then exact at that step only)."
            )
        step = 0
    if step < 0 or step >= n or (mode == "from_second" and step == 0):
        return None
    return step if mode == "all" else 0


def merged_model(model: Aurora) -> Aurora:
    """The architecture `merge_adapters`'s parameters belong to: `model` without LoRA."""
    return model.clone(use_lora=False)


def merge_adapters(model: Aurora, params: Params, step: int | None = None) -> Params:
    """Fold the adapter of rollout `step` into the base kernels and drop the LoRA leaves.

    LoRA adds `x Aᵀ Bᵀ · alpha / r` to a Dense layer `x W + b`, with Flax's kernel `W` laid out
    `(in, out)` and LoRA's `A (r, in)`, `B (out, r)`, so `W' = W + (B A)ᵀ · alpha / r`. Computed
    in float64 on the host and cast back to the kernel's dtype. In mode "single" the result
    equals the LoRA model at every rollout step `< lora_steps` (beyond that the LoRA model runs
    without adapters); see `adapter_index` for the other modes.

    Args:
        model: the Aurora with `use_lora=True` that `params` belong to.
        params: its parameters; adapters `lora_A` `(n, r, in)` and `lora_B` `(n, out, r)`.
        step: the rollout step whose adapter to merge (None: mode "single" only).

    Returns:
        Parameters of `merged_model(model)`.
    """
    index = adapter_index(model, step)
    scale = model.lora_alpha / model.lora_r
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
        b = np.asarray(jax.device_get(flat[(*path[:-1], "lora_B")]), np.float64)[index]  # (out, r)
        kernel = flat[kernel_path]
        w = np.asarray(jax.device_get(kernel), np.float64) + (b @ a).T * scale
        merged[kernel_path] = w.astype(np.dtype(kernel.dtype))
    return traverse_util.unflatten_dict(merged)


def export_merged(
    model: Aurora, params: Params, directory: str | Path, step: int | None = None
) -> dict[str, Path]:
    """Write the merged parameters (`merge_adapters`) for use without LoRA.

    The Orbax folder restores with `ocp.StandardCheckpointer().restore(path)` for
    `merged_model(model)`; the `.npz` loads with microsoft-aurora's `load_state_dict` for the same
    preset with `use_lora=False` (or with `aurora.convert.convert_pytorch_checkpoint`).

    Args:
        model: the Aurora with `use_lora=True` that `params` belong to.
        params: its parameters.
        directory: where to write (created if missing).
        step: the rollout step whose adapter to merge, as for `merge_adapters`.

    Returns:
        `{"orbax": <directory>/params, "pytorch": <directory>/pytorch_state_dict.npz}`.
    """
    import orbax.checkpoint as ocp

    from aurora.convert import to_pytorch_state_dict

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    merged = merge_adapters(model, params, step)
    paths = {"orbax": directory / "params", "pytorch": directory / "pytorch_state_dict.npz"}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(paths["orbax"], jax.tree_util.tree_map(np.asarray, merged))
    np.savez(paths["pytorch"], **to_pytorch_state_dict(merged))
    return paths


def lora_counts(model: Aurora, batch: Batch) -> dict[str, int]:
    """LoRA and total parameter counts of `model` without allocating it (`jax.eval_shape`).

    Args:
        model: the Aurora.
        batch: a batch it accepts (only shapes matter).

    Returns:
        `{"lora": n, "total": n}`.
    """
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))["params"]
    return parameter_counts(shapes)
