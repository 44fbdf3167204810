"""Perceiver3D encoder: variables and pressure levels -> a 3D grid of latent tokens.

Everything that depends only on the grid, the pressure levels or the model's lead time (position,
scale, level and lead-time Fourier features) is computed on the host in float64, exactly like the
reference, and enters the jitted computation as a constant; the absolute time, which changes every
batch, is encoded in-graph by :mod:`aurora.model.time_encoding`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from aurora.model.fourier import lead_time_expansion, lead_time_expansion_v3, levels_expansion
from aurora.model.layers import Dense, Dtype, LayerNorm, Precision, trunc_normal
from aurora.model.lead_time import lead_time_encoding
from aurora.model.levelcond import LevelConditioned
from aurora.model.patchembed import LevelPatchEmbed
from aurora.model.perceiver import MLP, PerceiverResampler
from aurora.model.posencoding import pos_scale_encoding
from aurora.model.time_encoding import absolute_time_encoding

__all__ = ["Perceiver3DEncoder"]


class Perceiver3DEncoder(nn.Module):
    """Embeds surface (+ static) and atmospheric variables and aggregates the levels.

    The `C` pressure levels of every patch are aggregated into `latent_levels - 1` latent levels
    by a Perceiver; the surface is one more latent level of its own.
    """

    surf_vars: tuple[str, ...]
    static_vars: tuple[str, ...]
    atmos_vars: tuple[str, ...]
    patch_size: int = 4
    latent_levels: int = 8
    embed_dim: int = 1024
    num_heads: int = 16
    head_dim: int = 64
    depth: int = 2
    mlp_ratio: float = 4.0
    max_history_size: int = 2
    perceiver_ln_eps: float = 1e-5
    stabilise_level_agg: bool = False
    use_updated_lead_time_embedding: bool = False  # `lead_time_expansion_v3` (Aurora 1.5)
    level_condition: tuple[float, ...] | None = None  # one atmospheric embedding per level
    precision: Precision = None
    remat: bool = False  # recompute the level Perceiver in the backward pass, in chunks of patches
    dtype: Dtype | None = None  # compute dtype of the embeddings and the Perceiver (autocast)
    # Drop-out in the MLPs and of the encoded tokens, as microsoft-aurora's `drop_rate`.
    drop_rate: float = 0.0
    deterministic: bool = True
    use_fp16_safe_attention: bool = False

    @nn.compact
    def __call__(
        self,
        x_surf: jax.Array,
        surf_names: Sequence[str],
        x_atmos: jax.Array,
        atmos_names: Sequence[str],
        lat: np.ndarray,
        lon: np.ndarray,
        atmos_levels: Sequence[float],
        time_minutes: jax.Array,
        lead_time_hours: float,
        lead_minutes: jax.Array | None = None,
    ) -> jax.Array:
        """Encode.

        Args:
            x_surf (jax.Array): Normalised surface and static variables of shape
                `(B, T, V_S, H, W)`, in the order of `surf_names`.
            surf_names (Sequence[str]): Names of the `V_S` surface and static variables.
            x_atmos (jax.Array): Normalised atmospheric variables of shape `(B, T, V_A, C, H, W)`,
                in the order of `atmos_names`.
            atmos_names (Sequence[str]): Names of the `V_A` atmospheric variables.
            lat (np.ndarray): Latitudes of shape `(H,)` (the cropped grid).
            lon (np.ndarray): Longitudes of shape `(W,)`.
            atmos_levels (Sequence[float]): The `C` pressure levels in hPa.
            time_minutes (jax.Array): int32 minutes since 1970 of shape `(B,)`.
            lead_time_hours (float): The model's time step.
            lead_minutes (jax.Array, optional): Per-sample int32 lead times in minutes of shape
                `(B,)` (`variable_lead_time`); they replace `lead_time_hours`.

        Returns:
            jax.Array: Tokens of shape `(B, latent_levels * H/P * W/P, D)`, latent level major.
        """
        if self.latent_levels < 2:
            raise ValueError("At least two latent levels are required.")
        D, P = self.embed_dim, self.patch_size
        B, T, _, C, H, W = x_atmos.shape
        dense = lambda name: Dense(D, precision=self.precision, dtype=self.dtype, name=name)
        if self.dtype is not None:  # the patch embeddings compute in their input's dtype
            x_surf, x_atmos = x_surf.astype(self.dtype), x_atmos.astype(self.dtype)

        atmos_latents = self.param("atmos_latents", trunc_normal, (self.latent_levels - 1, D))
        surf_level_encoding = self.param("surf_level_encoding", trunc_normal, (D,))

        # Patch-embed the surface level: (B, T, V, H, W) -> (B, V, T, H, W) -> (B, L, D).
        surf_embed = LevelPatchEmbed(
            self.surf_vars + self.static_vars,
            P,
            D,
            self.max_history_size,
            self.precision,
            name="surf_token_embeds",
        )
        x_surf = surf_embed(x_surf.transpose(0, 2, 1, 3, 4), surf_names)

        # Patch-embed every pressure level: (B, T, V, C, H, W) -> (B*C, V, T, H, W) -> (B, C, L, D).
        make_embed = partial(
            LevelPatchEmbed, self.atmos_vars, P, D, self.max_history_size, self.precision
        )
        x_atmos = x_atmos.transpose(0, 3, 2, 1, 4, 5)  # (B, C, V, T, H, W)
        if self.level_condition:
            x_atmos = LevelConditioned(
                make_embed, self.level_condition, axis=1, name="atmos_token_embeds"
            )(x_atmos, atmos_names, levels=atmos_levels)
        else:
            x_atmos = x_atmos.reshape(B * C, -1, T, H, W)
            x_atmos = make_embed(name="atmos_token_embeds")(x_atmos, atmos_names)
            x_atmos = x_atmos.reshape(B, C, -1, D)

        # The surface level is not aggregated: tag it and give it a Perceiver-style MLP.
        x_surf = x_surf + surf_level_encoding
        mlp = MLP(
            D,
            int(D * self.mlp_ratio),
            precision=self.precision,
            dtype=self.dtype,
            drop_rate=self.drop_rate,
            deterministic=self.deterministic,
            name="surf_mlp",
        )
        x_surf = x_surf + LayerNorm(dtype=self.dtype, name="surf_norm")(mlp(x_surf))

        # Pressure-level encoding, then aggregate C physical levels into latent_levels - 1 latents.
        levels = jnp.asarray(levels_expansion(np.asarray(atmos_levels, dtype=np.float64), D))
        x_atmos = x_atmos + dense("atmos_levels_embed")(levels)[None, :, None, :]
        L = x_atmos.shape[2]
        context = x_atmos.transpose(0, 2, 1, 3).reshape(B * L, C, D)
        aggregated = PerceiverResampler(
            D,
            depth=self.depth,
            head_dim=self.head_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            ln_eps=self.perceiver_ln_eps,
            ln_k_q=self.stabilise_level_agg,
            precision=self.precision,
            remat=self.remat,
            dtype=self.dtype,
            drop_rate=self.drop_rate,
            deterministic=self.deterministic,
            use_fp16_safe_attention=self.use_fp16_safe_attention,
            name="level_agg",
        )(atmos_latents, context)
        x_atmos = aggregated.reshape(B, L, -1, D).transpose(0, 2, 1, 3)

        x = jnp.concatenate([x_surf[:, None], x_atmos], axis=1)  # (B, latent_levels, L, D)

        pos, scale = pos_scale_encoding(np.asarray(lat), np.asarray(lon), P, D)
        x = x + dense("pos_embed")(jnp.asarray(pos)) + dense("scale_embed")(jnp.asarray(scale))
        x = x.reshape(B, -1, D)

        expansion = (
            lead_time_expansion_v3 if self.use_updated_lead_time_embedding else lead_time_expansion
        )
        if lead_minutes is None:
            lead = jnp.asarray(expansion(np.array([lead_time_hours], dtype=np.float64), D))
        else:
            lead = lead_time_encoding(lead_minutes, D, self.use_updated_lead_time_embedding)
        x = x + dense("lead_time_embed")(lead)[:, None, :]
        absolute = absolute_time_encoding(time_minutes, D)
        x = x + dense("absolute_time_embed")(absolute)[:, None, :]
        return nn.Dropout(self.drop_rate, deterministic=self.deterministic)(x)
