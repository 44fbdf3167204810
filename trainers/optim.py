"""Optimiser and learning-rate schedule from config: AdamW with warm-up, then constant or cosine."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["make_optimizer", "make_schedule"]


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


def make_optimizer(
    config: Any,
    total_steps: int | None,
    *,
    gradient_clip_val: float | None = None,
    accumulate_grad_batches: int = 1,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (`b1`, `b2`, `eps`, `weight_decay` from config) behind optional global-norm clipping.

    `accumulate_grad_batches > 1` wraps everything in `optax.MultiSteps`: gradients are averaged
    over that many micro-batches and the optimiser (and its schedule) steps once per group.

    Args:
        config: the schedule's fields (`make_schedule`) and AdamW's.
        total_steps: optimiser steps of the run, or None.
        gradient_clip_val: the global gradient norm to clip to, or None.
        accumulate_grad_batches: micro-batches per optimiser step.

    Returns:
        The transformation and its learning-rate schedule.
    """
    schedule = make_schedule(config, total_steps)
    tx = optax.adamw(
        schedule,
        b1=float(config.get("b1", 0.9)),
        b2=float(config.get("b2", 0.999)),
        eps=float(config.get("eps", 1e-8)),
        weight_decay=float(config.get("weight_decay", 0.0)),
    )
    if gradient_clip_val:
        tx = optax.chain(optax.clip_by_global_norm(float(gradient_clip_val)), tx)
    if accumulate_grad_batches > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulate_grad_batches)
    return tx, schedule
