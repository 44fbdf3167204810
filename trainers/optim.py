"""Optimiser and learning-rate schedule from config: warm-up, then constant or cosine decay.

`config.optimizer.name` picks the optimiser: "adamw" (the default, with the config's `b1`, `b2`,
`eps`, `weight_decay`), the name of any optax optimiser (`"sgd"`, `"lion"`, `"adafactor"`, ...), or
`"package.module:function"`. Each is called as optax's are, `fn(learning_rate=schedule,
**config.optimizer.kwargs)`, and must return an `optax.GradientTransformation`; clipping and
gradient accumulation wrap it the same way whatever it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from trainers.names import import_object

__all__ = ["ADAMW_FIELDS", "make_base_optimizer", "make_optimizer", "make_schedule"]

ADAMW_FIELDS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0}
"""`config.optimizer` fields that are "adamw"'s keyword arguments, with their defaults."""


def make_schedule(config: Any, total_steps: int | None) -> optax.Schedule:
    """The learning rate per optimiser step: linear warm-up, then constant or cosine decay.

    The warm-up rises from `learning_rate / warmup_steps` at the first step to `learning_rate`
    at step `warmup_steps - 1` (counting from 0); the decay starts from the peak after it.

    Args:
        config: `learning_rate`, `warmup_steps`, `schedule` ("constant" | "cosine"),
            `min_lr_ratio` (the cosine's final fraction of the peak).
        total_steps: optimiser steps of the run (required for "cosine").

    Returns:
        An optax schedule.
    """
    lr = float(config.learning_rate)
    warmup = int(config.get("warmup_steps", 0))
    kind = config.get("schedule", "constant")
    if kind == "constant":
        after = optax.constant_schedule(lr)
    elif kind == "cosine":
        if not total_steps:
            raise ValueError(
                "A cosine schedule needs max_steps (or max_epochs with a known epoch length)."
            )
        decay_steps = max(total_steps - warmup, 1)
        after = optax.cosine_decay_schedule(
            lr, decay_steps, alpha=float(config.get("min_lr_ratio", 0.0))
        )
    else:
        raise ValueError(f"Unknown schedule {kind!r}: use 'constant' or 'cosine'.")
    if warmup <= 0:
        return after

    def warm_up(count: jax.Array) -> jax.Array:
        # Step k (from 0) uses lr * (k + 1) / warmup: the first step already moves the weights
        # (a ramp from 0 would make it a no-op) and step warmup - 1 reaches the peak.
        return lr * jnp.minimum(count + 1, warmup) / warmup

    return optax.join_schedules([warm_up, after], [warmup])


def _optax_optimizer(name: str) -> Callable[..., optax.GradientTransformation] | None:
    """optax's optimiser alias `name` (e.g. `optax.sgd`), or None if optax has no such function."""
    fn = getattr(optax, name, None)
    return fn if callable(fn) and not isinstance(fn, type) else None


def make_base_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    """The optimiser `config.name` names (default "adamw"), called with `learning_rate=schedule`.

    Args:
        config: `name`, `kwargs` (the optimiser's keyword arguments) and, for "adamw", the fields
            of :data:`ADAMW_FIELDS` (`kwargs` wins over them).
        schedule: the learning rate per step.

    Returns:
        The optimiser, before clipping and accumulation.

    Raises:
        ValueError: `name` is neither optax's nor an import path.
    """
    name = config.get("name") or "adamw"
    kwargs = dict(config.get("kwargs") or {})
    if name == "adamw":
        kwargs = {k: float(config.get(k, v)) for k, v in ADAMW_FIELDS.items()} | kwargs
    is_path = ":" in name or "." in name
    factory = import_object(name) if is_path else _optax_optimizer(name)
    if factory is None:
        raise ValueError(
            f"config.optimizer.name={name!r}: optax has no such optimiser; name one of optax's "
            "(e.g. 'adamw', 'sgd', 'lion') or your own as 'package.module:function'."
        )
    tx = factory(learning_rate=schedule, **kwargs)
    if not isinstance(tx, optax.GradientTransformation):
        raise TypeError(
            f"config.optimizer.name={name!r} returned {type(tx).__name__}, not an "
            "optax.GradientTransformation."
        )
    return tx


def make_optimizer(
    config: Any,
    total_steps: int | None,
    *,
    gradient_clip_val: float | None = None,
    gradient_clip_algorithm: str = "norm",
    accumulate_grad_batches: int = 1,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The configured optimiser (`make_base_optimizer`) behind optional global-norm clipping.

    `accumulate_grad_batches > 1` wraps everything in `optax.MultiSteps`: gradients are averaged
    over that many micro-batches and the optimiser (and its schedule) steps once per group.

    Args:
        config: the schedule's fields (`make_schedule`) and the optimiser's
            (`make_base_optimizer`).
        total_steps: optimiser steps of the run, or None.
        gradient_clip_val: the value to clip gradients to (`clip_gradients`), or None.
        gradient_clip_algorithm: "norm" or "value" (`clip_gradients`).
        accumulate_grad_batches: micro-batches per optimiser step.

    Returns:
        The transformation and its learning-rate schedule.
    """
    schedule = make_schedule(config, total_steps)
    tx = make_base_optimizer(config, schedule)
    if gradient_clip_val:
        tx = optax.chain(clip_gradients(gradient_clip_val, gradient_clip_algorithm), tx)
    if accumulate_grad_batches > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_grad_batches)
    return tx, schedule


def clip_gradients(value: float, algorithm: str = "norm") -> optax.GradientTransformation:
    """Lightning's `gradient_clip_val` / `gradient_clip_algorithm` as an optax transformation.

    Args:
        value: the clipping threshold.
        algorithm: "norm" scales the gradients down to a global L2 norm of `value` at most;
            "value" clips each entry to `[-value, value]`.

    Returns:
        The transformation, to chain before the optimiser.
    """
    if algorithm == "norm":
        return optax.clip_by_global_norm(float(value))
    if algorithm == "value":
        return optax.clip(float(value))
    raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', not {algorithm!r}.")
