"""The hand-written pieces of aurora/model/layers.py against their textbook definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aurora.model.film import AdaptiveLayerNorm
from aurora.model.layers import (
    Dense,
    LayerNorm,
    dot_product_attention,
    gelu,
    normalize,
    scale_product,
    sum_of_products,
)
from aurora.model.lora import LoRAConfig
from aurora.model.perceiver import PerceiverResampler
from aurora.model.swin3d import Swin3DTransformerBlock


def _reference_normalize(x: jax.Array, epsilon: float) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(jnp.mean((x - mean) ** 2, axis=-1, keepdims=True) + epsilon)


def test_normalize_value_and_gradient_match_automatic_differentiation() -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 64)) * 4.0 + 2.0
    cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape)
    with jax.default_matmul_precision("highest"):
        y, vjp = jax.vjp(lambda x: normalize(x, 1e-5), x)
        y_ref, vjp_ref = jax.vjp(lambda x: _reference_normalize(x, 1e-5), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vjp(cotangent)[0], vjp_ref(cotangent)[0], rtol=1e-4, atol=1e-5)


def test_normalize_keeps_bfloat16_inputs_and_gradients() -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 32), jnp.bfloat16)
    grad = jax.grad(lambda x: jnp.sum(normalize(x) * jnp.arange(32.0)))(x)
    assert grad.dtype == jnp.bfloat16
    ref = jax.grad(lambda x: jnp.sum(_reference_normalize(x, 1e-5) * jnp.arange(32.0)))(
        x.astype(jnp.float32)
    )
    np.testing.assert_allclose(grad.astype(jnp.float32), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("features_in,features_out", [(24, 40), (40, 24)])
def test_dense_gradients_match_automatic_differentiation(dtype, features_in, features_out) -> None:
    """Dense's hand-written weight gradient (on CPU a product with the narrower operand
    transposed: the input when widening, the gradient when narrowing) against `lax.dot_general`
    differentiated by JAX, for tokens with two leading axes."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, features_in), dtype)
    cotangent = jax.random.normal(jax.random.PRNGKey(1), (2, 7, features_out), dtype)
    ours = Dense(features_out, precision="highest", dtype=dtype)
    derived = Dense(features_out, precision="highest", dtype=dtype, dot_general=jax.lax.dot_general)
    params = ours.init(jax.random.PRNGKey(2), x)["params"]
    params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
    y, vjp = jax.vjp(lambda p, x: ours.apply({"params": p}, x), params, x)
    y_ref, vjp_ref = jax.vjp(lambda p, x: derived.apply({"params": p}, x), params, x)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, y_ref)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(jax.tree.leaves(vjp(cotangent)), jax.tree.leaves(vjp_ref(cotangent))):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )


def _reference_attention(q, k, v, bias):
    logits = jnp.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1]) + bias
    return jnp.einsum("...qk,...kd->...qd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attention_values_and_gradients_match_the_textbook_softmax(dtype, masked) -> None:
    """The attention with its hand-written backward against `softmax(q kᵀ / sqrt(d) + bias) v`
    differentiated by JAX: windows with a shift mask of -100 across groups, and without."""
    shape = (2, 3, 4, 20, 8)  # batch, windows, heads, tokens, head channels
    q, k, v, cotangent = (jax.random.normal(jax.random.PRNGKey(i), shape, dtype) for i in range(4))
    rng = np.random.default_rng(0)
    bias = np.where(rng.random((3, 1, 20, 20)) < 0.3, -100.0, 0.0).astype(np.float32)
    bias = bias if masked else None
    with jax.default_matmul_precision("highest"):
        out, vjp = jax.vjp(
            lambda q, k, v: dot_product_attention(q, k, v, bias, precision="highest"), q, k, v
        )
        ref, vjp_ref = jax.vjp(
            lambda q, k, v: _reference_attention(q, k, v, 0.0 if bias is None else bias),
            *(t.astype(jnp.float32) for t in (q, k, v)),
        )
        grads, grads_ref = vjp(cotangent), vjp_ref(cotangent.astype(jnp.float32))
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=tol, atol=tol)
    for a, b in zip(grads, grads_ref):
        assert a.dtype == dtype
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (0, 1), (0, 2)])
def test_sum_of_products_is_the_sum_of_the_product(axes) -> None:
    a = jax.random.normal(jax.random.PRNGKey(0), (3, 50, 16))
    b = jax.random.normal(jax.random.PRNGKey(1), a.shape)
    got = jax.jit(lambda a, b: sum_of_products(a, b, axes))(a, b)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, np.sum(np.asarray(a) * np.asarray(b), axis=axes), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("scale_shape", [(16,), (3, 1, 16), (3, 50, 16), (1, 50, 1)])
def test_scale_product_gradients_match_automatic_differentiation(dtype, scale_shape) -> None:
    """Per-channel (LayerNorm), per-sample-and-channel (AdaLN), per-element and per-token scales:
    values and both gradients as JAX derives them for `x * scale`."""
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 50, 16), dtype)
    scale = jax.random.normal(jax.random.PRNGKey(1), scale_shape, jnp.float32)
    cotangent = jax.random.normal(jax.random.PRNGKey(2), x.shape, jnp.float32)
    y, vjp = jax.vjp(scale_product, x, scale)
    y_ref, vjp_ref = jax.vjp(lambda x, s: x * s, x, scale)
    np.testing.assert_array_equal(y, y_ref)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip(vjp(cotangent), vjp_ref(cotangent)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol
        )


def test_scale_product_refuses_a_scale_that_broadcasts_the_input() -> None:
    with pytest.raises(ValueError, match="would broadcast"):
        scale_product(jnp.ones((3, 1, 16)), jnp.ones((3, 50, 16)))


@pytest.mark.parametrize("per_token", [False, True])
def test_adaptive_layer_norm_gradients_match_automatic_differentiation(per_token) -> None:
    """AdaLN's gradients (its scale's through :func:`scale_product`) against the same layer
    written with a plain product."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 32)) * 3.0 + 1.0
    c = jax.random.normal(jax.random.PRNGKey(1), (2, 40, 32) if per_token else (2, 32))
    module = AdaptiveLayerNorm(32, scale_bias=1.0, precision="highest")
    params = module.init(jax.random.PRNGKey(2), x, c)["params"]
    params = jax.tree.map(lambda p: p + 0.05 * jnp.arange(p.size).reshape(p.shape) / p.size, params)

    def plain(p, x, c):
        m = jax.nn.silu(c) @ p["ln_modulation_1"]["kernel"] + p["ln_modulation_1"]["bias"]
        shift, scale = jnp.split(m if m.ndim == 3 else m[:, None], 2, axis=-1)
        return _reference_normalize(x, 1e-5) * (1.0 + scale) + shift

    cotangent = jax.random.normal(jax.random.PRNGKey(3), x.shape)
    with jax.default_matmul_precision("highest"):
        y, vjp = jax.vjp(lambda p, x, c: module.apply({"params": p}, x, c), params, x, c)
        y_ref, vjp_ref = jax.vjp(plain, params, x, c)
        grads, grads_ref = vjp(cotangent), vjp_ref(cotangent)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_layer_norm_parameters_and_output_dtype(dtype) -> None:
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8))
    module = LayerNorm(dtype=dtype)
    params = module.init(jax.random.PRNGKey(1), x)["params"]
    assert {k: v.shape for k, v in params.items()} == {"scale": (8,), "bias": (8,)}
    params = {"scale": jnp.full((8,), 2.0), "bias": jnp.full((8,), 0.5)}
    y = module.apply({"params": params}, x)
    assert y.dtype == (dtype or jnp.float32)
    np.testing.assert_allclose(
        y.astype(jnp.float32),
        2.0 * _reference_normalize(x, 1e-5) + 0.5,
        rtol=1e-2 if dtype else 1e-5,
        atol=1e-2 if dtype else 1e-6,
    )


def test_gelu_is_the_exact_erf_form() -> None:
    x = jnp.linspace(-8.0, 8.0, 4001)
    np.testing.assert_allclose(gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        jax.vmap(jax.grad(gelu))(x),
        jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("shared", [False, True])
def test_perceiver_in_rematerialised_chunks_matches_the_plain_one(shared) -> None:
    """12 rows in chunks of 5 (the last one padded), with per-row or shared latents and a projection
    of the output rows (the decoder's heads): same parameters, outputs and gradients."""
    latents = jax.random.normal(jax.random.PRNGKey(0), (3, 16) if shared else (12, 3, 16))
    context = jax.random.normal(jax.random.PRNGKey(1), (12, 4, 16))
    head = jax.random.normal(jax.random.PRNGKey(3), (16, 2))
    project = lambda w, out: jnp.einsum("...d,dk->...k", out, w, precision="highest")
    plain = PerceiverResampler(16, depth=2, head_dim=4, num_heads=2, precision="highest")
    chunked = plain.clone(remat=True, chunk=5)
    params = plain.init(jax.random.PRNGKey(2), latents, context)["params"]
    chunked_params = chunked.init(jax.random.PRNGKey(2), latents, context)["params"]
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(chunked_params)

    def loss(module, p, w):
        out = module.apply({"params": p}, latents, context, project, w)
        assert out.shape == (12, 3, 2)
        return jnp.sum(jnp.sin(out))

    value, grads = jax.value_and_grad(lambda p, w: loss(plain, p, w), argnums=(0, 1))(params, head)
    chunked_value, chunked_grads = jax.value_and_grad(
        lambda p, w: loss(chunked, p, w), argnums=(0, 1)
    )(params, head)
    np.testing.assert_allclose(chunked_value, value, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(chunked_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-6 * float(jnp.abs(b).max())
        )  # summed in another order


def test_gelu_keeps_bfloat16() -> None:
    assert gelu(jnp.ones((3,), jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 1, 3)])
def test_swin_block_in_rematerialised_window_chunks_matches_the_plain_one(shift) -> None:
    """Two samples, a grid that needs padding, LoRA at a traced rollout step, 2 windows per
    chunk."""
    res = (2, 7, 13)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, np.prod(res), 16))
    c = jax.random.normal(jax.random.PRNGKey(1), (2, 16))
    plain = Swin3DTransformerBlock(
        16,
        2,
        (2, 3, 6),
        shift_size=shift,
        lora=LoRAConfig(r=2, steps=3, mode="all"),
        precision="highest",
    )
    chunked = plain.clone(chunk=2 * 36)
    params = plain.init(jax.random.PRNGKey(2), x, c, res, 1)["params"]
    assert jax.tree_util.tree_structure(
        chunked.init(jax.random.PRNGKey(2), x, c, res, 1)["params"]
    ) == jax.tree_util.tree_structure(params)
    leaves, tree = jax.tree_util.tree_flatten(params)  # non-zero LoRA and modulation weights
    params = tree.unflatten(
        [p + 0.1 * jax.random.normal(jax.random.PRNGKey(i), p.shape) for i, p in enumerate(leaves)]
    )

    def loss(module, p, x, step):
        return jnp.sum(jnp.sin(module.apply({"params": p}, x, c, res, step)))

    grad = jax.jit(jax.value_and_grad(loss, argnums=(1, 2)), static_argnums=0)
    value, grads = grad(plain, params, x, jnp.int32(1))
    chunked_value, chunked_grads = grad(chunked, params, x, jnp.int32(1))
    np.testing.assert_allclose(chunked_value, value, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(chunked_grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
