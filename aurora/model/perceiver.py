"""Perceiver blocks: the encoder's level aggregation and the decoder's level de-aggregation.

Module and parameter names follow microsoft-aurora's PyTorch modules (`layers_{i}_0` is
`layers.{i}.0`), which is what lets `aurora.convert` map checkpoints by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from aurora.model.layers import (
    Dense,
    Dtype,
    LayerNorm,
    Precision,
    dot_product_attention,
    gelu,
    remat_in_chunks,
)
from aurora.model.partitioning import shard_rows

__all__ = ["MLP", "PerceiverAttention", "PerceiverResampler"]


class MLP(nn.Module):
    """One hidden layer with exact GELU (`net.0`, `net.2` in PyTorch), `(..., D) -> (..., dim)`,
    then drop-out (`drop_rate`, unless `deterministic`); matmuls in `dtype` (autocast)."""

    dim: int
    hidden_features: int
    precision: Precision = None
    dtype: Dtype | None = None
    drop_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = lambda n, name: Dense(n, precision=self.precision, dtype=self.dtype, name=name)
        x = gelu(dense(self.hidden_features, "net_0")(x))
        x = dense(self.dim, "net_2")(x)
        return nn.Dropout(self.drop_rate, deterministic=self.deterministic)(x)


class PerceiverAttention(nn.Module):
    """Cross-attention from latents to context, `num_heads` heads of `head_dim` channels."""

    latent_dim: int
    head_dim: int = 64
    num_heads: int = 8
    ln_k_q: bool = False
    precision: Precision = None
    dtype: Dtype | None = None  # compute dtype of the projections (autocast)
    use_fp16_safe_attention: bool = False

    @nn.compact
    def __call__(self, latents: jax.Array, x: jax.Array) -> jax.Array:
        """Attend from the latents to the context.

        Args:
            latents (jax.Array): Queries of shape `(B, L1, D)`.
            x (jax.Array): Context of shape `(B, L2, D)`.

        Returns:
            jax.Array: Output of shape `(B, L1, latent_dim)`.
        """
        inner = self.head_dim * self.num_heads
        dense = lambda n, name: Dense(
            n, use_bias=False, precision=self.precision, dtype=self.dtype, name=name
        )
        q = dense(inner, "to_q")(latents)
        k, v = jnp.split(dense(2 * inner, "to_kv")(x), 2, axis=-1)
        if self.ln_k_q:  # Normalise before splitting the heads, as the reference does.
            k = LayerNorm(dtype=self.dtype, name="ln_k")(k)
            q = LayerNorm(dtype=self.dtype, name="ln_q")(q)

        def heads(t: jax.Array) -> jax.Array:  # (B, L, H*D) -> (B, H, L, D)
            t = shard_rows(t)  # not split along the heads like the FSDP-sharded kernel
            return t.reshape(*t.shape[:-1], self.num_heads, self.head_dim).swapaxes(-2, -3)

        out = dot_product_attention(
            heads(q),
            heads(k),
            heads(v),
            precision=self.precision,
            fp16_safe=self.use_fp16_safe_attention,
        )
        out = out.swapaxes(-2, -3).reshape(*latents.shape[:-1], inner)
        return dense(self.latent_dim, "to_out")(out)


class PerceiverResampler(nn.Module):
    """Flamingo's Perceiver resampler with post-norm residuals (as in Aurora).

    `dtype` is the compute dtype of its matmuls (autocast; the residual stream stays float32),
    `drop_rate` the drop-out at the end of each MLP (unless `deterministic`).
    """

    latent_dim: int
    depth: int = 1
    head_dim: int = 64
    num_heads: int = 16
    mlp_ratio: float = 4.0
    ln_eps: float = 1e-5
    ln_k_q: bool = False
    precision: Precision = None
    remat: bool = False
    chunk: int = 2048
    dtype: Dtype | None = None
    drop_rate: float = 0.0
    deterministic: bool = True
    use_fp16_safe_attention: bool = False

    def __call__(
        self,
        latents: jax.Array,
        x: jax.Array,
        project: Callable[[Any, jax.Array], jax.Array] | None = None,
        project_params: Any = None,
    ) -> jax.Array:
        """Latents attend to the context; the N rows are independent.

        With `remat`, the backward pass recomputes the layers, and more than `chunk` rows go
        through them (and `project`) `chunk` at a time in a scan: at 0.25° the decoder's 64,800
        patches x 13 levels x 1024 channels make every whole-grid activation 3.2 GiB, which a
        whole-grid recomputation would hold many of at once.

        Args:
            latents (jax.Array): Queries of shape `(N, Q, D)`, or `(Q, D)` shared by every row.
            x (jax.Array): Context of shape `(N, C, D)`.
            project (Callable, optional): `project(project_params, out)` maps the output rows
                (the decoder's patch heads) inside the same computation.
            project_params (Any): Parameters for `project`.

        Returns:
            jax.Array: Output of shape `(N, Q, D)`, or what `project` makes of it.
        """

        def rows(
            module: PerceiverResampler,
            shared: tuple[jax.Array | None, Any],
            c: jax.Array,
            q: jax.Array | None = None,
        ) -> jax.Array:
            shared_latents, params = shared
            if q is None:
                q = jnp.broadcast_to(shared_latents, (c.shape[0], *shared_latents.shape))
            out = module._layers(q, c)
            return out if project is None else project(params, out)

        shared = latents if latents.ndim == 2 else None
        inputs = (x,) if shared is not None else (x, latents)
        if not self.remat:
            return rows(self, (shared, project_params), *inputs)
        return remat_in_chunks(rows, self, (shared, project_params), inputs, self.chunk)

    @nn.compact
    def _layers(self, latents: jax.Array, x: jax.Array) -> jax.Array:
        hidden = int(self.latent_dim * self.mlp_ratio)
        for i in range(self.depth):
            attn = PerceiverAttention(
                self.latent_dim,
                head_dim=self.head_dim,
                num_heads=self.num_heads,
                ln_k_q=self.ln_k_q and i == 0,
                precision=self.precision,
                dtype=self.dtype,
                use_fp16_safe_attention=self.use_fp16_safe_attention,
                name=f"layers_{i}_0",
            )
            ff = MLP(
                self.latent_dim,
                hidden,
                precision=self.precision,
                dtype=self.dtype,
                drop_rate=self.drop_rate,
                deterministic=self.deterministic,
                name=f"layers_{i}_1",
            )
            ln1 = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=f"layers_{i}_2")
            ln2 = LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name=f"layers_{i}_3")
            latents = ln1(attn(latents, x)) + latents
            latents = ln2(ff(latents)) + latents
        return latents
