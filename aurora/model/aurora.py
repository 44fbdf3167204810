"""The Aurora model and microsoft-aurora's presets, in Flax linen.

`Aurora` takes microsoft-aurora's architecture arguments under the same names and defaults, so a
model described for one is built the same way in the other. `model.apply({"params": p}, batch)`
returns the prediction one time step ahead, unnormalised, with a history dimension of one, exactly
like the PyTorch `forward`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from aurora.batch import Batch
from aurora.convert import adapt_checkpoint
from aurora.model.clipping import Bounds
from aurora.model.decoder import Perceiver3DDecoder, modulation_names
from aurora.model.encoder import Perceiver3DEncoder
from aurora.model.layers import Precision
from aurora.model.lead_time import lead_time_minutes
from aurora.model.lora import LoRAConfig, LoRAMode
from aurora.model.output_only import zero_output_only
from aurora.model.positivity import clamp_inputs, clamp_prediction
from aurora.model.static_channels import (
    DYNAMIC_VARS,
    atmos_static_names,
    dynamic_channels,
    simulate_indexing_bug,
)
from aurora.model.swin3d import Swin3DTransformerBackbone
from aurora.variables import ATMOS_VARS, STATIC_VARS, SURF_VARS

__all__ = [
    "Aurora",
    "Aurora12hPretrained",
    "AuroraHighRes",
    "AuroraPretrained",
    "AuroraSmall",
    "AuroraSmallPretrained",
]


def _ordered(configured: tuple[str, ...], present: Mapping[str, Any], kind: str) -> tuple[str, ...]:
    """The batch's variables in the model's order; unknown variables are an error."""
    unknown = sorted(set(present) - set(configured))
    if unknown:
        raise ValueError(
            f"The batch has {kind} variables {unknown} that the model does not know ({configured})."
        )
    return tuple(v for v in configured if v in present)


class Aurora(nn.Module):
    """Aurora. Defaults are the 1.3 B-parameter 0.25° fine-tuned configuration (LoRA on)."""

    surf_vars: tuple[str, ...] = SURF_VARS
    static_vars: tuple[str, ...] = STATIC_VARS
    atmos_vars: tuple[str, ...] = ATMOS_VARS
    window_size: tuple[int, int, int] = (2, 6, 12)
    encoder_depths: tuple[int, ...] = (6, 10, 8)
    encoder_num_heads: tuple[int, ...] = (8, 16, 32)
    decoder_depths: tuple[int, ...] = (8, 10, 6)
    decoder_num_heads: tuple[int, ...] = (32, 16, 8)
    latent_levels: int = 4
    patch_size: int = 4
    embed_dim: int = 512
    num_heads: int = 16
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    drop_rate: float = 0.0
    enc_depth: int = 1
    dec_depth: int = 1
    dec_mlp_ratio: float = 2.0
    perceiver_ln_eps: float = 1e-5
    max_history_size: int = 2
    timestep: timedelta = timedelta(hours=6)
    stabilise_level_agg: bool = False
    use_lora: bool = True
    lora_steps: int = 40
    lora_mode: LoRAMode = "single"
    surf_stats: Mapping[str, tuple[float, float]] | None = None
    autocast: bool = False
    bf16_mode: bool = False
    use_fp16_safe_attention: bool = False
    level_condition: tuple[int | float, ...] | None = None
    dynamic_vars: bool = False
    atmos_static_vars: bool = False
    separate_perceiver: tuple[str, ...] = ()
    modulation_heads: tuple[str, ...] = ()
    positive_surf_vars: tuple[str, ...] = ()
    positive_atmos_vars: tuple[str, ...] = ()
    clamp_at_first_step: bool = False
    simulate_indexing_bug: bool = False
    stochastic: bool = False
    use_updated_lead_time_embedding: bool = False
    variable_lead_time: bool = False
    rollout_input_clipping: Bounds | None = None
    output_only_surf_vars: tuple[str, ...] = ()
    output_only_atmos_vars: tuple[str, ...] = ()
    # Not in microsoft-aurora's signature: LoRA rank/alpha (hard-coded to 8 there), the precision
    # of every matmul, the compute dtype of the backbone under `autocast`, and rematerialisation:
    # `remat` recomputes every Swin block and the level Perceivers (with the decoder's heads) in
    # the backward pass, in chunks of windows or patches, as microsoft-aurora's activation
    # checkpointing does; `remat_stages` also recomputes whole backbone stages.
    lora_r: int = 8
    lora_alpha: int = 8
    precision: Precision = "highest"
    autocast_dtype: Any = jnp.bfloat16
    remat: bool = False
    remat_stages: bool = False
    # microsoft-aurora's `autocast_encoder` / `autocast_decoder` attributes (AuroraV1p5 sets both):
    # with `autocast`, the encoder and the decoder compute in `autocast_dtype` too.
    autocast_encoder: bool = False
    autocast_decoder: bool = False

    @property
    def timestep_minutes(self) -> int:
        minutes, remainder = divmod(int(self.timestep.total_seconds()), 60)
        if remainder:
            raise ValueError("The time step must be a whole number of minutes.")
        return minutes

    @property
    def uses_autocast(self) -> bool:
        """Whether the backbone computes in `autocast_dtype`: `bf16_mode` now means `autocast`."""
        return self.autocast or self.bf16_mode

    def _compute_dtype(self, autocast_part: bool) -> Any:
        """`autocast_dtype` for a part that autocasts (None: float32)."""
        return self.autocast_dtype if self.uses_autocast and autocast_part else None

    # Preset hooks, as microsoft-aurora's `Aurora` has them (same names, same call order in
    # `__call__`); identities here. Subclasses override them to add a preset's transforms, so
    # the forward pass itself is written once. All are pure functions of their arguments and run
    # inside `jit`: data-dependent choices are `jnp.where`, not Python branches.

    def batch_transform_hook(self, batch: Batch) -> Batch:
        """The raw batch, first thing in `__call__` and once at the start of `rollout`.

        Must be idempotent (the rollout's input goes through it twice).
        """
        return batch

    def _pre_norm_hook(self, batch: Batch) -> Batch:
        """The batch just before normalisation (not idempotent transforms, e.g. log-scaling)."""
        return batch

    def _pre_encoder_hook(self, batch: Batch) -> Batch:
        """The normalised batch as the encoder will see it (positive variables clamped).

        Variables may be added or replaced here; the encoder and the decoder take their variable
        lists from the result, as microsoft-aurora's do. Parameters created here (`self.param`,
        submodules) belong to the model.
        """
        return batch

    def _post_decoder_hook(self, batch: Batch, pred: Batch) -> Batch:
        """The normalised prediction (history 1) given the normalised input `batch`."""
        return pred

    def _post_unnorm_hook(self, batch: Batch, pred: Batch) -> Batch:
        """The prediction in physical units, last thing in `__call__`."""
        return pred

    @property
    def input_surf_vars(self) -> tuple[str, ...]:
        """The surface variables a batch may hold after `batch_transform_hook` (checked before
        normalisation): `surf_vars` unless the preset's hooks derive some of them."""
        return self.surf_vars

    @property
    def input_atmos_vars(self) -> tuple[str, ...]:
        """As `input_surf_vars`, for atmospheric variables."""
        return self.atmos_vars

    @property
    def output_surf_vars(self) -> tuple[str, ...]:
        """The surface variables a prediction holds (after `_post_decoder_hook`), the ones a
        forecast is scored on: `surf_vars` unless the preset's hooks turn some of them back
        into others (`AuroraWave`'s raw wave names)."""
        return self.surf_vars

    checkpoint_layout: ClassVar[str] = "aurora"
    """Names the rules of `adapt_state_dict` (part of the conversion cache's key)."""

    def adapt_state_dict(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A published state dict in the current key layout: microsoft-aurora's `_adapt_checkpoint`.

        Presets with their own published layout override it (and `checkpoint_layout`).
        """
        return adapt_checkpoint(state, self.patch_size, self.max_history_size)

    def _check_supported(self) -> None:
        if self.bf16_mode and not self.autocast:
            warnings.warn(
                "`bf16_mode` was removed in microsoft-aurora; it now switches on `autocast`.",
                stacklevel=2,
            )
        if self.atmos_static_vars and not self.dynamic_vars:
            # microsoft-aurora 2.0.1 names the channels inconsistently then and cannot run it.
            raise ValueError("`atmos_static_vars` needs `dynamic_vars`, as in microsoft-aurora.")
        if self.simulate_indexing_bug and not self.atmos_static_vars:
            raise ValueError("`simulate_indexing_bug` needs `atmos_static_vars`.")
        if not self.surf_vars and not self.static_vars:
            raise ValueError("The surface level needs at least one surface or static variable.")
        for kind, output_only, known in (
            ("surface", self.output_only_surf_vars, self.surf_vars),
            ("atmospheric", self.output_only_atmos_vars, self.atmos_vars),
        ):
            if set(output_only) - set(known):
                raise ValueError(
                    f"Output-only {kind} variables {sorted(set(output_only) - set(known))} are "
                    f"not among the model's {kind} variables."
                )

    @nn.compact
    def __call__(
        self,
        batch: Batch,
        lead_times: jax.Array | float | None = None,
        noise: jax.Array | None = None,
        *,
        deterministic: bool = True,
    ) -> Batch:
        """The prediction one step ahead.

        `lead_times` (hours, scalar or `(B,)`) is used with `variable_lead_time` only, as in
        microsoft-aurora's `forward`; unlike there, it defaults to the time step (so `init` and
        plain `apply` calls work unchanged).

        A `stochastic` model draws its backbone noise from the "noise" rng stream
        (`apply(..., rngs={"noise": key})`) unless `noise`, `(B, L, embed_dim)` with `L` the
        backbone's tokens, gives it (a rollout's accumulated noise; see aurora.model.noise).

        With `deterministic=False` (training), `drop_path` and `drop_rate` act, drawing from the
        "dropout" rng stream (`apply(..., rngs={"dropout": key}, deterministic=False)`).
        """
        self._check_supported()
        stats = dict(self.surf_stats) if self.surf_stats else None
        batch = self.batch_transform_hook(batch)
        _ordered(self.input_surf_vars, batch.surf_vars, "surface")
        _ordered(self.input_atmos_vars, batch.atmos_vars, "atmospheric")
        batch = batch.astype(jnp.float32).crop(self.patch_size)
        normed = self._pre_norm_hook(batch).normalise(surf_stats=stats)
        meta = batch.metadata
        # Positive variables are clamped for the encoder only: `normed` stays what the hooks
        # after the decoder see, as in microsoft-aurora. Output-only variables enter as zeros.
        encoder_in = self._pre_encoder_hook(
            normed.replace(
                surf_vars=zero_output_only(
                    clamp_inputs(normed.surf_vars, self.positive_surf_vars),
                    self.output_only_surf_vars,
                ),
                atmos_vars=zero_output_only(
                    clamp_inputs(normed.atmos_vars, self.positive_atmos_vars),
                    self.output_only_atmos_vars,
                ),
            )
        )
        surf_in, atmos_in = encoder_in.surf_vars, encoder_in.atmos_vars
        surf_names = _ordered(self.surf_vars, surf_in, "surface")
        static_names = _ordered(self.static_vars, encoder_in.static_vars, "static")
        atmos_names = _ordered(self.atmos_vars, atmos_in, "atmospheric")
        if not atmos_names:
            raise ValueError("The batch has no atmospheric variables.")
        B, T = atmos_in[atmos_names[0]].shape[:2]
        H, W = batch.spatial_shape
        patch_res = (self.latent_levels, H // self.patch_size, W // self.patch_size)

        stack = lambda fields: jnp.stack(fields, axis=2) if fields else jnp.zeros((B, T, 0, H, W))
        x_static = stack(
            [jnp.broadcast_to(encoder_in.static_vars[v], (B, T, H, W)) for v in static_names]
        )  # (B, T, V_static, H, W)
        x_atmos = jnp.stack([atmos_in[v] for v in atmos_names], axis=2)  # (B, T, V_A, C, H, W)
        encoder_static_vars, encoder_atmos_vars = self.static_vars, self.atmos_vars
        encoder_static_names, encoder_atmos_names = static_names, atmos_names
        if self.dynamic_vars:
            x_static = jnp.concatenate([x_static, dynamic_channels(meta.time, (B, T, H, W))], 2)
            encoder_static_names = static_names + DYNAMIC_VARS
            encoder_static_vars += DYNAMIC_VARS
        x_surf = stack([surf_in[v] for v in surf_names])
        x_surf = jnp.concatenate([x_surf, x_static], axis=2)  # (B, T, V_S + V_static, H, W)
        if self.atmos_static_vars:
            C = x_atmos.shape[3]
            x_per_level = jnp.broadcast_to(x_static[:, :, :, None], (*x_static.shape[:3], C, H, W))
            x_atmos = jnp.concatenate([x_atmos, x_per_level], axis=2)
            encoder_atmos_names += atmos_static_names(encoder_static_names)
            encoder_atmos_vars += atmos_static_names(encoder_static_vars)
            if self.simulate_indexing_bug:
                x_atmos = simulate_indexing_bug(x_atmos, encoder_atmos_names)

        lead_hours = self.timestep.total_seconds() / 3600
        lead_minutes = None
        if self.variable_lead_time:
            lead_minutes = lead_time_minutes(lead_hours if lead_times is None else lead_times, B)
        x = Perceiver3DEncoder(
            surf_vars=self.surf_vars,
            static_vars=encoder_static_vars,
            atmos_vars=encoder_atmos_vars,
            patch_size=self.patch_size,
            latent_levels=self.latent_levels,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            head_dim=self.embed_dim // self.num_heads,
            depth=self.enc_depth,
            mlp_ratio=self.mlp_ratio,
            max_history_size=self.max_history_size,
            perceiver_ln_eps=self.perceiver_ln_eps,
            stabilise_level_agg=self.stabilise_level_agg,
            use_updated_lead_time_embedding=self.use_updated_lead_time_embedding,
            level_condition=self.level_condition,
            precision=self.precision,
            remat=self.remat,
            dtype=self._compute_dtype(self.autocast_encoder),
            drop_rate=self.drop_rate,
            deterministic=deterministic,
            use_fp16_safe_attention=self.use_fp16_safe_attention,
            name="encoder",
        )(
            x_surf,
            surf_names + encoder_static_names,
            x_atmos,
            encoder_atmos_names,
            np.asarray(meta.lat),
            np.asarray(meta.lon),
            meta.atmos_levels,
            meta.time,
            lead_hours,
            lead_minutes,
        )

        backbone_dtype = self.autocast_dtype if self.uses_autocast else None
        x = Swin3DTransformerBackbone(
            embed_dim=self.embed_dim,
            encoder_depths=self.encoder_depths,
            encoder_num_heads=self.encoder_num_heads,
            decoder_depths=self.decoder_depths,
            decoder_num_heads=self.decoder_num_heads,
            window_size=self.window_size,
            mlp_ratio=self.mlp_ratio,
            lora=LoRAConfig(self.lora_r, self.lora_alpha, self.lora_steps, self.lora_mode)
            if self.use_lora
            else None,
            remat=self.remat,
            remat_stages=self.remat_stages,
            precision=self.precision,
            dtype=backbone_dtype,
            use_updated_lead_time_embedding=self.use_updated_lead_time_embedding,
            drop_path_rate=self.drop_path,
            drop_rate=self.drop_rate,
            deterministic=deterministic,
            use_fp16_safe_attention=self.use_fp16_safe_attention,
            stochastic=self.stochastic,
            name="backbone",
        )(
            x, lead_hours, meta.rollout_step, patch_res, lead_minutes, noise
        )  # the residual stream stays float32, as under torch.autocast
        x = x.astype(jnp.float32)

        surf_names = modulation_names(surf_names, self.modulation_heads)
        atmos_names = modulation_names(atmos_names, self.modulation_heads)
        surf, atmos = Perceiver3DDecoder(
            surf_vars=self.surf_vars,
            atmos_vars=self.atmos_vars,
            patch_size=self.patch_size,
            embed_dim=2 * self.embed_dim,
            depth=self.dec_depth,
            head_dim=2 * self.embed_dim // self.num_heads,
            num_heads=self.num_heads,
            mlp_ratio=self.dec_mlp_ratio,
            perceiver_ln_eps=self.perceiver_ln_eps,
            separate_perceiver=self.separate_perceiver,
            modulation_heads=self.modulation_heads,
            level_condition=self.level_condition,
            precision=self.precision,
            remat=self.remat,
            dtype=self._compute_dtype(self.autocast_decoder),
            use_fp16_safe_attention=self.use_fp16_safe_attention,
            name="decoder",
        )(x, surf_names, atmos_names, meta.atmos_levels, (H, W), patch_res)

        rollout_step = jnp.asarray(meta.rollout_step, jnp.int32) + 1
        pred = Batch(
            surf_vars={v: surf[:, i, None] for i, v in enumerate(surf_names)},
            static_vars=dict(normed.static_vars),
            atmos_vars={v: atmos[:, i, None] for i, v in enumerate(atmos_names)},
            metadata=meta.replace(
                time=jnp.asarray(meta.time, jnp.int32)
                + (self.timestep_minutes if lead_minutes is None else lead_minutes),
                rollout_step=rollout_step,
            ),
        )
        pred = self._post_decoder_hook(normed, pred)
        pred = pred.replace(
            surf_vars=clamp_prediction(
                pred.surf_vars, self.positive_surf_vars, rollout_step, self.clamp_at_first_step
            ),
            atmos_vars=clamp_prediction(
                pred.atmos_vars, self.positive_atmos_vars, rollout_step, self.clamp_at_first_step
            ),
        )
        pred = pred.astype(jnp.float32).unnormalise(surf_stats=stats)
        return self._post_unnorm_hook(batch, pred)


class AuroraPretrained(Aurora):
    """Aurora 0.25° pretrained (no LoRA)."""

    use_lora: bool = False


class AuroraSmallPretrained(Aurora):
    """The small pretrained Aurora (debugging-size model in microsoft-aurora)."""

    encoder_depths: tuple[int, ...] = (2, 6, 2)
    encoder_num_heads: tuple[int, ...] = (4, 8, 16)
    decoder_depths: tuple[int, ...] = (2, 6, 2)
    decoder_num_heads: tuple[int, ...] = (16, 8, 4)
    embed_dim: int = 256
    num_heads: int = 8
    use_lora: bool = False


AuroraSmall = AuroraSmallPretrained
"""Alias kept for compatibility with microsoft-aurora."""


class Aurora12hPretrained(Aurora):
    """Aurora pretrained with a 12-hour time step."""

    timestep: timedelta = timedelta(hours=12)
    use_lora: bool = False


class AuroraHighRes(Aurora):
    """Aurora fine-tuned at 0.1° (patch size 10)."""

    patch_size: int = 10
    encoder_depths: tuple[int, ...] = (6, 8, 8)
    decoder_depths: tuple[int, ...] = (8, 8, 6)
