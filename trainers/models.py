"""What the Trainer needs of a model, and the one place precision and rematerialisation are set.

A model is any Flax module with Aurora's interface: `model.apply({"params": p}, batch)` maps an
input `Batch` (fields `(b, history, ...)`) to the prediction one step ahead (fields
`(b, 1, ...)`, `metadata.time` advanced by the model's step and `metadata.rollout_step` by 1, as
`aurora.rollout.advance_batch` expects). Aurora's other attributes are optional: `patch_size`
(inputs are cropped to it; default 1, no crop), `surf_stats` (normalisation statistics beyond
Aurora's table, used by the loss), `timestep` (checked against the data's step), `use_lora`.
Scoring and forecast files (`--mode=test`, `--mode=predict`, `trainers.evaluation`) also read
`surf_vars`, `atmos_vars`, `static_vars` and `timestep_minutes`, as Aurora declares them
(`examples/tiny_model.py` has them). A model with Aurora's `drop_path` / `drop_rate` (any non-zero)
trains with drop-out: the training step applies it as `apply(..., rngs={"dropout": key},
deterministic=False)`, with a new key every step; evaluation and prediction stay deterministic.
A model with Aurora's `stochastic=True` draws noise from `rngs={"noise": key}` in every call:
a new key every training step, one from the seed in evaluation (`rng_streams` names the streams).

`configure_model` sets the Trainer's `precision` and `remat` on a model through the fields the
model declares, so a model without them trains at the defaults ("32", "none") and a request it
cannot honour is a clear error instead of a silent no-op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from aurora.model.noise import NOISE_RNG

__all__ = [
    "DROPOUT_RNG",
    "NOISE_RNG",
    "configure_model",
    "is_stochastic",
    "patch_size",
    "rng_streams",
    "uses_dropout",
]

DROPOUT_RNG = "dropout"
"""The Flax rng stream of drop-out and drop-path (Flax's convention)."""

BF16 = ("bf16-mixed", "bf16-true")
"""Precisions that compute in bfloat16."""


def patch_size(model: Any) -> int:
    """The model's patch size (inputs are cropped to a multiple of it); 1 if it declares none."""
    return int(getattr(model, "patch_size", 1))


def uses_dropout(model: Any) -> bool:
    """Whether the model has drop-out or drop-path to switch on in training (Aurora's fields)."""
    return bool(getattr(model, "drop_path", 0.0) or getattr(model, "drop_rate", 0.0))


def is_stochastic(model: Any) -> bool:
    """Whether the model draws noise in every call (Aurora's `stochastic`, e.g.
    AuroraV1p5Ensemble), so that each call needs a key of the :data:`NOISE_RNG` stream."""
    return bool(getattr(model, "stochastic", False))


def rng_streams(model: Any, training: bool) -> tuple[str, ...]:
    """The rng streams a call of `model` needs: :data:`DROPOUT_RNG` in training a model with
    drop-out, :data:`NOISE_RNG` for a stochastic model; empty for a deterministic call."""
    streams = []
    if training and uses_dropout(model):
        streams.append(DROPOUT_RNG)
    if is_stochastic(model):
        streams.append(NOISE_RNG)
    return tuple(streams)


def configure_model(model: Any, *, precision: str = "32", remat: str = "none") -> Any:
    """`model` computing at `precision` and rematerialising per `remat`.

    Through the model's own fields: Aurora's `autocast` (else Flax's `dtype` convention, the
    computation dtype, set to bfloat16) for a bfloat16 precision; `remat` (and Aurora's
    `remat_stages`) for rematerialisation. A model with none of them runs as it is at the
    defaults.

    Args:
        model: a Flax module (see the module docstring).
        precision: "32", or a bfloat16 one of :data:`BF16` (parameters stay float32).
        remat: "none"; "backbone" (Aurora's Swin blocks and level Perceivers, or the model's
            `remat` flag); "stages" (also Aurora's whole backbone stages, `remat_stages`); "all"
            (as "stages"; strategies that roll out also rematerialise each step).

    Returns:
        A clone of `model` with those fields set (`model` itself if there is nothing to set).

    Raises:
        ValueError: the model has no field for what was asked.
    """
    fields = {f.name for f in dataclasses.fields(model)} if dataclasses.is_dataclass(model) else ()
    name = type(model).__name__
    bf16 = precision in BF16
    changes: dict[str, Any] = {}
    if "autocast" in fields:
        changes["autocast"] = bf16
    elif bf16 and "dtype" in fields:
        changes["dtype"] = jnp.bfloat16
    elif bf16:
        raise ValueError(
            f"precision={precision!r} needs a model with an `autocast` flag (as Aurora) or a "
            f"`dtype` field (Flax's computation dtype); {name} has neither: use precision='32' "
            "or give the model one."
        )
    if "remat" in fields:
        changes["remat"] = remat != "none"
    elif remat != "none":
        raise ValueError(
            f"remat={remat!r} needs a model with a boolean `remat` field (as Aurora); {name} has "
            "none: use remat='none' or give the model one."
        )
    if "remat_stages" in fields:
        changes["remat_stages"] = remat in ("stages", "all")
    elif remat == "stages":
        raise ValueError(
            f"remat='stages' needs a model with a `remat_stages` field (as Aurora); {name} has "
            "none: use remat='backbone'."
        )
    return model.clone(**changes) if changes else model
