"""Stochastic noise in the backbone: the Aurora 1.5 ensemble's source of spread.

microsoft-aurora's `Swin3DTransformerBackbone(stochastic=True)` draws standard normal noise of
shape `(B, L, D)` (one vector per token) at every call, embeds it with `noise_mlp` and adds it to
the lead-time conditioning, which then differs per token; patch merging without a norm
(`context_down_layers`) brings that conditioning down to every encoder stage and the U-Net's
decoder reuses the encoder's. Across the calls of a rollout with sub-steps, the reference keeps a
FIFO cache of the last `n` draws and uses `sum(cache) / sqrt(n)`, so the noise changes slowly from
one sub-step to the next while each draw still has unit variance.

Here nothing is hidden state. Inside the model the noise comes from the Flax rng stream
:data:`NOISE_RNG` (`model.apply(..., rngs={"noise": key})`), or is given as the model's `noise`
input; a rollout carries the cache itself with :func:`accumulate` and draws from a key with
:func:`key_noise`, so the same key always gives the same member.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import count

import jax
import jax.numpy as jnp
from flax import linen as nn

from aurora.model.layers import Dense, Precision

__all__ = [
    "NOISE_RNG",
    "NoiseSource",
    "accumulate",
    "embed_noise",
    "key_noise",
    "noise_shape",
    "sample_noise",
]

NOISE_RNG = "noise"
"""The Flax rng stream a stochastic model draws its noise from."""

NoiseSource = Callable[[int], jax.Array]
"""`source(k)`: `k` fresh standard normal draws, `(k, B, L, D)`, the next ones of a member."""


def noise_shape(model: nn.Module, batch: object) -> tuple[int, int, int]:
    """`(B, L, D)`: one noise vector of the backbone's width per token of `batch`.

    Args:
        model: an `Aurora` (its `patch_size`, `latent_levels` and `embed_dim` are read).
        batch: a `Batch` already cropped to the patch size.
    """
    h, w = batch.spatial_shape  # type: ignore[attr-defined]
    b = next(iter(batch.atmos_vars.values())).shape[0]  # type: ignore[attr-defined]
    p = model.patch_size  # type: ignore[attr-defined]
    return b, model.latent_levels * (h // p) * (w // p), model.embed_dim  # type: ignore[attr-defined]


def sample_noise(module: nn.Module, shape: tuple[int, ...]) -> jax.Array:
    """A fresh standard normal draw from `module`'s :data:`NOISE_RNG` stream.

    `init` without that stream gets zeros (parameter shapes do not depend on the noise), so
    checkpoint conversion and `model.init(key, batch)` work unchanged; `apply` without it fails.
    """
    if module.has_rng(NOISE_RNG):
        return jax.random.normal(module.make_rng(NOISE_RNG), shape, jnp.float32)
    if module.is_initializing():
        return jnp.zeros(shape, jnp.float32)
    raise ValueError(
        "A stochastic model needs a noise key: `model.apply(..., rngs={'noise': key})`, "
        "`ModelStep(...)(params, batch, rng=key)` or `rollout(..., rng=key)`."
    )


def embed_noise(
    noise: jax.Array, dim: int, precision: Precision = None, dtype: jnp.dtype | None = None
) -> jax.Array:
    """The reference's `noise_mlp` (Linear, SiLU, Linear) on noise `(B, L, D)`.

    Call it inside a compact module: its layers `noise_mlp_0` / `noise_mlp_2` belong to that
    module, under the names the converted checkpoint has.
    """
    dense = lambda name: Dense(dim, precision=precision, dtype=dtype, name=name)
    return dense("noise_mlp_2")(nn.silu(dense("noise_mlp_0")(noise)))


def accumulate(cache: jax.Array | None, draws: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One model call of the reference's noise cache: the new cache and the effective noise.

    The cache holds the last `n` draws, oldest first. The first call fills it with `n` draws
    (its own first, as the reference appends its draw, then fills); each later call evicts the
    oldest and appends one. The effective noise is `sum(cache) / sqrt(n)`. A cache of one draw is
    the reference without accumulation: fresh noise every call.

    Args:
        cache: the previous cache `(n, B, L, D)`, or None before the first call.
        draws: fresh standard normal draws: `(n, B, L, D)` for the first call, else `(1, B, L, D)`.

    Returns:
        The new cache `(n, B, L, D)` and the effective noise `(B, L, D)`.
    """
    if cache is not None:
        if draws.shape != (1, *cache.shape[1:]):
            raise ValueError(f"Expected one draw of shape {cache.shape[1:]}, got {draws.shape}.")
        draws = jnp.concatenate([cache[1:], draws.astype(cache.dtype)])
    return draws, draws.sum(axis=0) / math.sqrt(draws.shape[0])


def key_noise(key: jax.Array, shape: tuple[int, ...]) -> NoiseSource:
    """Draws of one member from one key: the `i`-th request uses `fold_in(key, i)`.

    Args:
        key: a JAX key; another key gives another member.
        shape: `(B, L, D)`, see :func:`noise_shape`.
    """
    calls = count()

    def source(k: int) -> jax.Array:
        return jax.random.normal(jax.random.fold_in(key, next(calls)), (k, *shape), jnp.float32)

    return source
