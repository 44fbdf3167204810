"""Small building blocks shared by every part of the model.

They pin down the choices where Flax's defaults differ from PyTorch's and would break parity with
microsoft-aurora: LayerNorm epsilon 1e-5 (Flax: 1e-6), exact-erf GELU (Flax: tanh approximation),
two-pass variance, an explicit matmul precision on every contraction (never the backend default,
which is TF32 on NVIDIA GPUs), and PyTorch's `trunc_normal_(std=0.02)` / zero-bias initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

__all__ = [
    "Precision",
    "Dense",
    "LayerNorm",
    "gelu",
    "trunc_normal",
    "torch_linear_uniform",
    "dot_product_attention",
]

Precision = Any  # jax.lax.Precision | str | None
Dtype = Any

trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
"""PyTorch's `trunc_normal_(std=0.02)` used by microsoft-aurora's `init_weights`."""


def torch_linear_uniform(fan_in: int) -> nn.initializers.Initializer:
    """`kaiming_uniform_(a=sqrt(5))`, PyTorch's default for conv/linear weights: U(±1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, as `torch.nn.GELU()`."""
    return nn.gelu(x, approximate=False)


class Dense(nn.Dense):
    """`nn.Dense` with PyTorch's initialisation in microsoft-aurora and an explicit precision."""

    kernel_init: Any = trunc_normal
    bias_init: Any = nn.initializers.zeros_init()


class LayerNorm(nn.LayerNorm):
    """`torch.nn.LayerNorm` semantics: eps 1e-5, two-pass variance."""

    epsilon: float = 1e-5
    use_fast_variance: bool = False


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | np.ndarray | None = None,
    precision: Precision = None,
) -> jax.Array:
    """`softmax(q kᵀ / sqrt(d) + bias) v` over inputs shaped `(..., heads, tokens, head_dim)`.

    The softmax runs in float32 whatever the compute dtype, as PyTorch's attention does.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("...qd,...kd->...qk", q, k, precision=precision).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v, precision=precision)
