"""Adaptive layer norm (AdaLN): the backbone's lead-time conditioning."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from aurora.model.layers import Dense, LayerNorm, Precision, scale_product
from aurora.model.partitioning import shard_rows

__all__ = ["AdaptiveLayerNorm"]


class AdaptiveLayerNorm(nn.Module):
    """`LN(x) * (scale_bias + scale(c)) + shift(c)`; the modulation starts at zero, as in DiT."""

    dim: int
    scale_bias: float = 0.0
    precision: Precision = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """Normalise and modulate.

        Args:
            x (jax.Array): Tokens of shape `(B, L, D)`.
            c (jax.Array): Conditioning of shape `(B, D)` (or `(B, L, D)`).

        Returns:
            jax.Array: Output of shape `(B, L, D)`.
        """
        c = Dense(
            2 * self.dim,
            kernel_init=nn.initializers.zeros_init(),
            precision=self.precision,
            dtype=self.dtype,
            name="ln_modulation_1",
        )(nn.silu(c))
        if c.ndim == 2:
            c = c[:, None, :]
        # Split by rows like the tokens, not along the channels like the FSDP-sharded kernel.
        shift, scale = jnp.split(shard_rows(c), 2, axis=-1)
        normed = LayerNorm(use_scale=False, use_bias=False, dtype=self.dtype, name="ln")(
            shard_rows(x)
        )
        return scale_product(normed, self.scale_bias + scale) + shift
