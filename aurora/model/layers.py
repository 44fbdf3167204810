"""Small building blocks shared by every part of the model.

They pin down the choices where Flax's defaults differ from PyTorch's and would break parity with
microsoft-aurora: LayerNorm epsilon 1e-5 (Flax: 1e-6), exact-erf GELU (Flax: tanh approximation),
two-pass variance, an explicit matmul precision on every contraction (never the backend default,
which is TF32 on NVIDIA GPUs), and PyTorch's `trunc_normal_(std=0.02)` / zero-bias initialisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from aurora.model.partitioning import row_shards, shard_rows

__all__ = [
    "Dense",
    "LayerNorm",
    "Precision",
    "dot_product_attention",
    "drop_path_scale",
    "fp16_safe_logits",
    "gelu",
    "linear_dot_general",
    "normalize",
    "remat_in_chunks",
    "scale_product",
    "sum_of_products",
    "torch_linear_uniform",
    "trunc_normal",
]

Precision = Any  # jax.lax.Precision | str | None
Dtype = Any

trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
"""PyTorch's `trunc_normal_(std=0.02)` used by microsoft-aurora's `init_weights`."""


def torch_linear_uniform(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default conv/linear weight initialiser, `kaiming_uniform_(a=sqrt(5))`.

    Args:
        fan_in (int): Inputs per output unit.

    Returns:
        Initializer: Samples U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (all zeros when `fan_in` is 0).
    """
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, `x / 2 * (1 + erf(x / sqrt(2)))`, written as PyTorch computes it.

    `jax.nn.gelu(approximate=False)` goes through `erfc`, which XLA expands into a far longer
    polynomial than `erf`, so it is several times slower on a CPU.

    Args:
        x (jax.Array): Input of any shape and floating dtype.

    Returns:
        jax.Array: GELU of `x`, same shape and dtype.
    """
    return (
        x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
    )  # weak constants keep bf16 bf16


def sum_of_products(a: jax.Array, b: jax.Array, axes: Sequence[int]) -> jax.Array:
    """`sum(a * b)` over `axes`, in float32, computed on a CPU as a contraction.

    XLA:CPU runs a reduction fused with a product of two arrays over a few hundred channels or
    thousands of tokens 10-80x slower than the equal `dot_general`: every such sum in a backward
    pass (a LayerNorm's scale gradient, AdaLN's modulation gradient, the LayerNorm backward's
    `mean(g x̂)`) cost more than the matmuls around it. Other backends fuse the plain form well
    and would run the contraction as a batch of vector products, so they keep it.

    Args:
        a (jax.Array): Any shape.
        b (jax.Array): Same shape as `a`.
        axes (Sequence[int]): Axes to sum over (non-negative).

    Returns:
        jax.Array: float32, `a`'s shape without `axes`.
    """
    axes = tuple(axes)
    kept = tuple(i for i in range(a.ndim) if i not in axes)

    def contracted(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(
            a,
            b,
            ((axes, axes), (kept, kept)),
            precision=jax.lax.Precision.HIGHEST,
            preferred_element_type=jnp.float32,
        )

    def fused(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=axes)

    return jax.lax.platform_dependent(a, b, cpu=contracted, default=fused)


def scale_product(x: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * scale`, `scale` broadcast against `x` (per channel, per sample and channel, or per
    element), whose gradient for `scale` sums `g x` with :func:`sum_of_products`.

    Args:
        x (jax.Array): Input of the result's shape.
        scale (jax.Array): Factors broadcastable to `x`'s shape.

    Returns:
        jax.Array: `x * scale`, dtype promoted as by `*`.
    """
    if jnp.broadcast_shapes(x.shape, scale.shape) != x.shape:
        raise ValueError(f"scale of shape {scale.shape} would broadcast x of shape {x.shape}.")
    return _scale_product(x, scale)


@jax.custom_vjp
def _scale_product(x: jax.Array, scale: jax.Array) -> jax.Array:
    return x * scale


def _scale_product_fwd(
    x: jax.Array, scale: jax.Array
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return x * scale, (x, scale)


def _scale_product_bwd(
    residuals: tuple[jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, scale = residuals
    padded = (1,) * (x.ndim - scale.ndim) + scale.shape
    summed = tuple(i for i, (n, m) in enumerate(zip(x.shape, padded)) if m == 1 and n != 1)
    if summed:
        dscale = sum_of_products(grad, x, summed).reshape(scale.shape)
    else:
        dscale = (grad * x).reshape(scale.shape)
    return (grad * scale).astype(x.dtype), dscale.astype(scale.dtype)


_scale_product.defvjp(_scale_product_fwd, _scale_product_bwd)


@jax.custom_vjp
def _normalize(x: jax.Array, epsilon: float) -> jax.Array:
    return _normalize_fwd(x, epsilon)[0]


def _normalize_fwd(x: jax.Array, epsilon: float) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    rstd = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    return centred * rstd, (x, mean, rstd)


def _normalize_bwd(residuals: tuple[jax.Array, ...], grad: jax.Array) -> tuple[jax.Array, None]:
    x, mean, rstd = residuals
    normed = (x.astype(jnp.float32) - mean) * rstd
    grad = grad.astype(jnp.float32)
    mean_grad = jnp.mean(grad, axis=-1, keepdims=True)
    mean_grad_normed = sum_of_products(grad, normed, (x.ndim - 1,))[..., None] / x.shape[-1]
    return (rstd * (grad - mean_grad - normed * mean_grad_normed)).astype(x.dtype), None


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def normalize(x: jax.Array, epsilon: float = 1e-5) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` over the last axis in float32, two-pass variance.

    The backward pass is the closed form `rstd * (g - mean(g) - x̂ mean(g x̂))`, recomputing `x̂`
    from the input: far cheaper than automatic differentiation of the two-pass forward, which
    costs more than all other elementwise work of a Swin block.

    Args:
        x (jax.Array): Input of shape `(..., D)`.
        epsilon (float): Added to the variance.

    Returns:
        jax.Array: Normalised input of shape `(..., D)`, float32.
    """
    return _normalize(x, epsilon)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear(x: jax.Array, kernel: jax.Array, precision: Precision) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _linear_fwd(
    x: jax.Array, kernel: jax.Array, precision: Precision
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _linear(x, kernel, precision), (x, kernel)


def _linear_bwd(
    precision: Precision, residuals: tuple[jax.Array, jax.Array], grad: jax.Array
) -> tuple[jax.Array, jax.Array]:
    x, kernel = residuals
    dx = jax.lax.dot_general(
        grad, kernel, (((grad.ndim - 1,), (1,)), ((), ())), precision=precision
    )
    rows, grad_rows = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])

    def transposed_first(a: jax.Array, b: jax.Array) -> jax.Array:
        # Transpose the narrower operand (for fc2 of an MLP, the gradient rather than the hidden
        # layer) and, when that is the gradient, the weight-sized product after. The barriers
        # keep XLA from folding the transposes back into the contraction.
        barrier = jax.lax.optimization_barrier
        if a.shape[1] <= b.shape[1]:
            return jax.lax.dot(barrier(a.T), b, precision=precision)
        return barrier(jax.lax.dot(barrier(b.T), a, precision=precision)).T

    def contracted_leading(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=precision)

    dk = jax.lax.platform_dependent(
        rows, grad_rows, cpu=transposed_first, default=contracted_leading
    )
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def linear_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Precision = None,
    preferred_element_type: Dtype | None = None,
) -> jax.Array:
    """`lax.dot_general` for `nn.Dense` (`x @ kernel` over the last axis of `x`) whose weight
    gradient, on a CPU, is a plain `(D_in, M) @ (M, D_out)` product.

    XLA:CPU runs a product whose left operand is contracted over its leading axis (`xᵀ dy`, the
    derived weight gradient of every dense layer) as an asynchronous Eigen kernel, concurrently
    with the YNNPACK matmuls, both thread pools competing for the same cores. With `xᵀ`
    materialised (a copy the size of the layer's input, small next to the product) the weight
    gradient runs on YNNPACK like the forward matmuls. Other backends keep the derived form:
    their matmul libraries take transposed operands as they are. Values are those of
    `lax.dot_general`; the gradients differ only in summation order.
    """
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or preferred_element_type:
        return jax.lax.dot_general(
            lhs, rhs, dimension_numbers, precision, preferred_element_type=preferred_element_type
        )
    return _linear(lhs, rhs, precision)


class Dense(nn.Dense):
    """`nn.Dense` with microsoft-aurora's initialisation and an explicit precision.

    Maps `(..., D_in)` to `(..., features)`; weights `trunc_normal(std=0.02)`, biases zero.
    """

    kernel_init: Any = trunc_normal
    bias_init: Any = nn.initializers.zeros_init()
    dot_general: Any = linear_dot_general


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` over the last axis: eps 1e-5, two-pass variance, float32 statistics.

    Maps `(..., D)` to `(..., D)`. Parameters are Flax's (`scale`, `bias`, float32); the output
    has `dtype`, or the promoted type of the input and the parameters.
    """

    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (x.shape[-1],)
        y = normalize(x, self.epsilon)
        if self.use_scale:
            y = scale_product(
                y, self.param("scale", nn.initializers.ones_init(), features, jnp.float32)
            )
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros_init(), features, jnp.float32)
        has_params = self.use_scale or self.use_bias
        return y.astype(
            self.dtype or (jnp.result_type(x.dtype, jnp.float32) if has_params else x.dtype)
        )


def fp16_safe_logits(q: jax.Array, k: jax.Array, scale: float, precision: Precision) -> jax.Array:
    """float16 logits `q (k scale)ᵀ`, clamped to float16's range: microsoft-aurora's
    `fp16_safe_scaled_dot_product_attention` up to the softmax.

    The scale goes into the keys first to keep the products small; logits that still overflow
    are clamped, to `max - 1000` when any is infinite (so that an additive mask cannot push them
    back to infinity), else to `max`. "Any" is over this call's logits, as there (one chunk of
    windows when a rematerialised block runs in chunks). Returned in float32 for the softmax.
    """
    k = (k.astype(jnp.float32) * np.float32(scale)).astype(jnp.float16)
    logits = jnp.einsum(
        "...qd,...kd->...qk", q, k, precision=precision, preferred_element_type=jnp.float32
    ).astype(jnp.float16)
    largest = float(jnp.finfo(jnp.float16).max)
    limit = jnp.where(jnp.any(jnp.isinf(logits)), largest - 1000, largest).astype(jnp.float16)
    return jnp.clip(logits, -limit, limit).astype(jnp.float32)


def drop_path_scale(rng: jax.Array, rate: float, batch: int) -> jax.Array:
    """Per-sample stochastic depth (timm's `DropPath`): `(batch, 1, 1)` factors, 0 for a dropped
    residual branch and `1 / (1 - rate)` for a kept one, so the expectation is unchanged."""
    keep = jax.random.bernoulli(rng, 1.0 - rate, (batch, 1, 1))
    return jnp.where(keep, 1.0 / (1.0 - rate), 0.0).astype(jnp.float32)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | np.ndarray | None = None,
    precision: Precision = None,
    fp16_safe: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> jax.Array:
    """`softmax(q kᵀ / sqrt(d) + bias) v`.

    The softmax runs in float32 whatever the compute dtype, as PyTorch's attention does. Without
    drop-out or float16-safe logits this is :func:`_attention`, normalised after the product with
    `v` and with a hand-written backward pass.

    Args:
        q (jax.Array): Queries of shape `(..., heads, Nq, d)`.
        k (jax.Array): Keys of shape `(..., heads, Nk, d)`.
        v (jax.Array): Values of shape `(..., heads, Nk, d_v)`.
        bias (jax.Array | np.ndarray, optional): Additive logits bias, broadcastable to
            `(..., heads, Nq, Nk)`.
        precision (Precision): Matmul precision.
        fp16_safe (bool): In float16, compute the logits as :func:`fp16_safe_logits` (no overflow
            to infinity); no effect in other dtypes.
        dropout_rate (float): Drop-out rate of the attention weights (inverted drop-out, as
            `nn.Dropout`).
        dropout_rng (jax.Array, optional): Key for that drop-out; None: no drop-out.

    Returns:
        jax.Array: Output of shape `(..., heads, Nq, d_v)`, in `v`'s dtype.
    """
    fp16_safe = fp16_safe and q.dtype == jnp.float16
    if not fp16_safe and (dropout_rng is None or not dropout_rate):
        return _attention(q, k, v, 0.0 if bias is None else bias, precision)
    if fp16_safe:
        logits = fp16_safe_logits(q, k, 1.0 / math.sqrt(q.shape[-1]), precision)
    else:
        logits = _logits(q, k, precision)
    if bias is not None:
        logits = logits + bias
    weights = jax.nn.softmax(logits, axis=-1)
    if dropout_rng is not None and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    weights = weights.astype(v.dtype)
    return jnp.einsum("...qk,...kd->...qd", weights, v, precision=precision)


def _logits(q: jax.Array, k: jax.Array, precision: Precision) -> jax.Array:
    """`q kᵀ / sqrt(d)` in float32."""
    logits = jnp.einsum("...qd,...kd->...qk", q, k, precision=precision)
    return logits.astype(jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | float, precision: Precision
) -> jax.Array:
    """`softmax(q kᵀ / sqrt(d) + bias) v`, normalised after the product with `v`, with the
    softmax's backward written out.

    Dividing the `(Nq, d_v)` output rather than the `(Nq, Nk)` weights by the softmax's sum (as
    PyTorch's fused CPU and GPU attention kernels do) halves the forward's elementwise work. The
    backward takes the softmax's row term from the output, `rowsum(dO * O)` over `d_v`, instead
    of `rowsum(dP * P)` over `Nk`, and keeps no other `(Nq, Nk)` intermediate than the weights;
    JAX's derived backward of the same forward does several more passes over such arrays.
    `bias` gets no gradient (window masks are constants).
    """
    return _attention_fwd(q, k, v, bias, precision)[0]


def _attention_fwd(
    q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | float, precision: Precision
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    logits = _logits(q, k, precision) + bias
    unnormalised = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    out = jnp.einsum("...qk,...kd->...qd", unnormalised.astype(v.dtype), v, precision=precision)
    out = (out.astype(jnp.float32) / total).astype(v.dtype)
    weights = unnormalised / total
    return out, (q, k, v, out, weights)


def _attention_bwd(
    precision: Precision, residuals: tuple[jax.Array, ...], grad: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, None]:
    q, k, v, out, weights = residuals
    dv = jnp.einsum("...qk,...qd->...kd", weights.astype(v.dtype), grad, precision=precision)
    dweights = jnp.einsum("...qd,...kd->...qk", grad, v, precision=precision)
    row = sum_of_products(grad, out, (grad.ndim - 1,))[..., None]
    dlogits = weights * (dweights.astype(jnp.float32) - row) * (1.0 / math.sqrt(q.shape[-1]))
    dlogits = dlogits.astype(q.dtype)
    dq = jnp.einsum("...qk,...kd->...qd", dlogits, k, precision=precision)
    dk = jnp.einsum("...qk,...qd->...kd", dlogits, q, precision=precision)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def remat_in_chunks(
    fn: Callable[..., jax.Array],
    module: nn.Module,
    broadcast: Any,
    inputs: Sequence[jax.Array],
    chunk: int,
    axis: int = 0,
) -> jax.Array:
    """`fn(module, broadcast, *inputs)`, rematerialised, `chunk` rows along `axis` at a time.

    At 0.25° a whole-grid activation is hundreds of MiB to GiB; recomputing a layer in the backward
    pass over the whole grid would hold many of them at once. When the rows along `axis` are
    independent (patches, windows, tokens), a `nn.scan` over chunks holds one chunk's
    intermediates instead. The last chunk is zero-padded and the padding dropped from the output;
    `broadcast` (conditioning, the rollout step) goes to every chunk unchanged. Parameters are
    shared across chunks, so the parameter tree is the one of an unchunked call.

    Args:
        fn (Callable): `fn(module, broadcast, *inputs)`, e.g. an unbound method of `module`.
        module (nn.Module): The module `fn` runs on.
        broadcast (Any): Pytree passed unchanged to every chunk.
        inputs (Sequence[jax.Array]): Arrays with the same length `R` along `axis`.
        chunk (int): Rows per chunk; 0 runs all rows at once (still rematerialised).
        axis (int): The axis of independent rows.

    Returns:
        jax.Array: `fn`'s output, `R` rows along `axis`.
    """
    rows = inputs[0].shape[axis]
    shards = row_shards() if axis == 0 else 1
    if chunk and shards > 1 and rows % shards == 0 and rows // shards > chunk:
        return _remat_in_chunks_per_shard(fn, module, broadcast, inputs, chunk, shards)
    body = nn.remat(fn)
    if not chunk or rows <= chunk:
        return body(module, broadcast, *inputs)
    n = -(-rows // chunk)

    def split(t: jax.Array) -> jax.Array:
        widths = [(0, 0)] * t.ndim
        widths[axis] = (0, n * chunk - rows)
        t = jnp.pad(t, widths)
        return jnp.moveaxis(t.reshape(*t.shape[:axis], n, chunk, *t.shape[axis + 1 :]), axis, 0)

    scan = nn.scan(
        lambda mdl, carry, xs: (carry, body(mdl, carry, *xs)),
        variable_broadcast="params",
        # Each chunk draws its own drop-out masks (per-sample choices are made outside).
        split_rngs={"params": False, "dropout": True},
    )
    _, out = scan(module, broadcast, tuple(split(t) for t in inputs))
    out = jnp.moveaxis(out, 0, axis)
    out = out.reshape(*out.shape[:axis], n * chunk, *out.shape[axis + 2 :])
    return jax.lax.slice_in_dim(out, 0, rows, axis=axis)


def _remat_in_chunks_per_shard(
    fn: Callable[..., jax.Array],
    module: nn.Module,
    broadcast: Any,
    inputs: Sequence[jax.Array],
    chunk: int,
    shards: int,
) -> jax.Array:
    """`remat_in_chunks` along axis 0 when a mesh splits those rows over `shards` devices.

    Chunking the global rows would scan over the sharded axis (each chunk on one device, the rest
    idle, and whole activations moved between them). Instead the rows are viewed as
    `(shards, rows / shards)` and each device's own rows are chunked, `chunk` at a time per device;
    `fn` sees each step's rows of every device flattened back to one axis.
    """
    rows = inputs[0].shape[0]

    def per_shard(t: jax.Array) -> jax.Array:
        return shard_rows(t.reshape(shards, rows // shards, *t.shape[1:]))

    def flat(mdl: nn.Module, shared: Any, *xs: jax.Array) -> jax.Array:
        out = fn(mdl, shared, *(shard_rows(x.reshape(-1, *x.shape[2:])) for x in xs))
        return out.reshape(*xs[0].shape[:2], *out.shape[1:])

    out = remat_in_chunks(flat, module, broadcast, [per_shard(t) for t in inputs], chunk, axis=1)
    return shard_rows(out.reshape(rows, *out.shape[2:]))
