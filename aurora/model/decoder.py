"""Perceiver3D decoder: latent tokens -> per-variable fields on the grid (normalised)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from aurora.model.fourier import levels_expansion
from aurora.model.layers import Dense, Dtype, Precision, trunc_normal
from aurora.model.levelcond import level_heads, level_param_name
from aurora.model.perceiver import PerceiverResampler

__all__ = ["Perceiver3DDecoder", "apply_heads", "modulation_names", "unpatchify"]


def modulation_names(names: Sequence[str], modulation_heads: Sequence[str]) -> tuple[str, ...]:
    """`names` and, after them, `{name}_mod` for those with a modulation head, as microsoft-aurora
    orders them (the extra heads are decoded as extra variables)."""
    return tuple(names) + tuple(f"{n}_mod" for n in names if n in modulation_heads)


def apply_heads(heads: dict, x: jax.Array, names: Sequence[str], precision: Precision) -> jax.Array:
    """Each variable's linear patch head, variable last.

    Args:
        heads (dict): Per variable name, `{"kernel": (D, P*P), "bias": (P*P,)}`.
        x (jax.Array): Tokens of shape `(..., D)`.
        names (Sequence[str]): The `V` variables to decode, in output order.
        precision (Precision): Matmul precision.

    Returns:
        jax.Array: Patches of shape `(..., P*P*V)`, index `p * V + v`, computed in the heads'
        dtype (float16 ones under autocast).
    """
    outs = []
    for n in names:
        kernel = heads[n]["kernel"]
        y = jnp.einsum("...d,dk->...k", x.astype(kernel.dtype), kernel, precision=precision)
        outs.append(y + heads[n]["bias"])
    out = jnp.stack(outs, axis=-1)  # (..., P*P, V)
    return out.reshape(*out.shape[:-2], -1)


def _apply_level_heads(
    heads: Sequence[dict], x: jax.Array, names: Sequence[str], precision: Precision
) -> jax.Array:
    """:func:`apply_heads` with `heads[i]` on level `i` of `x` `(..., C, D)`."""
    outs = [apply_heads(h, x[..., i, :], names, precision) for i, h in enumerate(heads)]
    return jnp.stack(outs, axis=-2)


def unpatchify(x: jax.Array, V: int, H: int, W: int, P: int) -> jax.Array:
    """Patches back to fields.

    Args:
        x (jax.Array): Patches of shape `(B, L, C, P*P*V)`, `L = H/P * W/P`, the patch pixel
            index `p1*P + p2` major and the variable last (as :func:`apply_heads` makes them).
        V (int): Variables.
        H (int): Latitudes.
        W (int): Longitudes.
        P (int): Patch size.

    Returns:
        jax.Array: Fields of shape `(B, V, C, H, W)`.
    """
    B, _, C, _ = x.shape
    h, w = H // P, W // P
    x = x.reshape(B, h, w, C, P, P, V).transpose(0, 6, 3, 1, 4, 2, 5)
    return x.reshape(B, V, C, H, W)


class Perceiver3DDecoder(nn.Module):
    """De-aggregates latent levels into the requested pressure levels and decodes patches."""

    surf_vars: tuple[str, ...]
    atmos_vars: tuple[str, ...]
    patch_size: int = 4
    embed_dim: int = 1024
    depth: int = 1
    head_dim: int = 64
    num_heads: int = 8
    mlp_ratio: float = 4.0
    perceiver_ln_eps: float = 1e-5
    # microsoft-aurora's `separate_perceiver` (atmospheric variables decoded by a second level
    # Perceiver) and `modulation_heads` (an extra `{name}_mod` head per named variable).
    separate_perceiver: tuple[str, ...] = ()
    modulation_heads: tuple[str, ...] = ()
    # microsoft-aurora's `level_condition`: one atmospheric head per pressure level.
    level_condition: tuple[float, ...] | None = None
    precision: Precision = None
    # Recompute the level Perceiver and the heads in the backward pass, in chunks of patches.
    remat: bool = False
    dtype: Dtype | None = None  # compute dtype of the Perceiver and the heads (autocast)
    use_fp16_safe_attention: bool = False

    def _heads(
        self, name: str, var_names: tuple[str, ...], levels: tuple[float, ...] | None = None
    ) -> dict[str, dict[str, Any]]:
        """One linear patch-reconstruction head per variable (PyTorch: `{name}.{var}.weight`),
        or per variable and level (`{name}.{var}.layers.{level}.weight`) with `levels`."""

        def head(key: jax.Array) -> dict[str, jax.Array]:
            return {
                "kernel": trunc_normal(key, (self.embed_dim, self.patch_size**2)),
                "bias": jnp.zeros((self.patch_size**2,)),
            }

        def init(key: jax.Array) -> dict[str, dict[str, Any]]:
            keys = jax.random.split(key, max(len(var_names), 1))
            if levels is None:
                return {v: head(k) for v, k in zip(var_names, keys)}
            return {
                v: {
                    level_param_name(lv): head(k_lv)
                    for lv, k_lv in zip(levels, jax.random.split(k, len(levels)))
                }
                for v, k in zip(var_names, keys)
            }

        return self.param(name, init)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        surf_names: Sequence[str],
        atmos_names: Sequence[str],
        atmos_levels: Sequence[float],
        spatial_shape: tuple[int, int],
        patch_res: tuple[int, int, int],
    ) -> tuple[jax.Array | None, jax.Array]:
        """Decode backbone tokens into normalised predictions.

        Args:
            x (jax.Array): Backbone tokens of shape `(B, C_latent * h * w, D)`.
            surf_names (Sequence[str]): The `V_S` surface variables to predict (may be empty),
                `{name}_mod` included (:func:`modulation_names`).
            atmos_names (Sequence[str]): The `V_A` atmospheric variables to predict, likewise.
            atmos_levels (Sequence[float]): The `C` pressure levels (hPa) to predict.
            spatial_shape (tuple[int, int]): The grid `(H, W)`.
            patch_res (tuple[int, int, int]): Token resolution `(C_latent, h, w)`, `h = H/P`.

        Returns:
            tuple: Surface predictions of shape `(B, V_S, H, W)` (None without surface
            variables) and atmospheric predictions of shape `(B, V_A, C, H, W)`.
        """
        B = x.shape[0]
        H, W = spatial_shape
        C_latent, h, w = patch_res
        P = self.patch_size
        x = x.reshape(B, C_latent, h * w, -1).transpose(0, 2, 1, 3)  # (B, L, C_latent, D)

        surf_heads = self._heads(
            "surf_heads", modulation_names(self.surf_vars, self.modulation_heads)
        )
        atmos_heads = self._heads(
            "atmos_heads",
            modulation_names(self.atmos_vars, self.modulation_heads),
            self.level_condition,
        )
        if self.dtype is not None:
            surf_heads, atmos_heads = jax.tree_util.tree_map(
                lambda p: p.astype(self.dtype), (surf_heads, atmos_heads)
            )
        project = partial(apply_heads, precision=self.precision)
        if self.level_condition:
            atmos_heads = level_heads(atmos_heads, atmos_levels, self.level_condition)
            project = partial(_apply_level_heads, precision=self.precision)

        surf = None
        if surf_names:
            x_surf = apply_heads(surf_heads, x[:, :, :1, :], surf_names, self.precision)
            surf = unpatchify(x_surf, len(surf_names), H, W, P)[:, :, 0]

        levels = jnp.asarray(
            levels_expansion(np.asarray(atmos_levels, dtype=np.float64), self.embed_dim)
        )
        levels_embed = Dense(
            self.embed_dim, precision=self.precision, dtype=self.dtype, name="atmos_levels_embed"
        )(levels)
        context = x[:, :, 1:, :].reshape(B * h * w, C_latent - 1, self.embed_dim)

        def decode(names: tuple[str, ...], name: str) -> jax.Array:
            """`(B*h*w, C, P*P, len(names))` from one level Perceiver and the heads of `names`."""
            out = PerceiverResampler(
                self.embed_dim,
                depth=self.depth,
                head_dim=self.head_dim,
                num_heads=self.num_heads,
                mlp_ratio=self.mlp_ratio,
                ln_eps=self.perceiver_ln_eps,
                precision=self.precision,
                remat=self.remat,
                dtype=self.dtype,
                use_fp16_safe_attention=self.use_fp16_safe_attention,
                name=name,
            )(
                levels_embed,
                context,
                partial(project, names=names),
                atmos_heads,
            )
            return out.reshape(*out.shape[:-1], P * P, len(names))

        separate = modulation_names(self.separate_perceiver, self.modulation_heads)
        main_names = tuple(n for n in atmos_names if n not in separate)
        alternate_names = tuple(n for n in atmos_names if n in separate)
        if not separate:
            atmos = decode(main_names, "level_decoder")
        else:
            # Both Perceivers exist whatever the batch holds, as in microsoft-aurora.
            parts, order = [], []
            for names, name in (
                (main_names, "level_decoder"),
                (alternate_names, "level_decoder_alternate"),
            ):
                if names:
                    parts.append(decode(names, name))
                    order += names
            atmos = jnp.concatenate(parts, axis=-1)[..., [order.index(n) for n in atmos_names]]
        atmos = atmos.reshape(*atmos.shape[:-2], -1)
        atmos = unpatchify(atmos.reshape(B, h * w, *atmos.shape[1:]), len(atmos_names), H, W, P)
        return surf, atmos
