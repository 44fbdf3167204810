"""The Swin3D U-Net backbone with AdaLN lead-time conditioning and LoRA.

Follows microsoft-aurora's `swin3d.py` operation for operation (window partitioning, cyclic shift
with left-right "warped" connectivity, two-sided padding, patch merging/splitting, additive and
concatenated skips). Window masks depend only on shapes, so they are built once on the host with
numpy and enter the computation as constants.
"""

from __future__ import annotations

import itertools
from functools import lru_cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from aurora.model.film import AdaptiveLayerNorm
from aurora.model.fourier import lead_time_expansion, lead_time_expansion_v3
from aurora.model.layers import (
    Dense,
    LayerNorm,
    Precision,
    dot_product_attention,
    drop_path_scale,
    gelu,
    remat_in_chunks,
)
from aurora.model.lead_time import lead_time_encoding
from aurora.model.lora import LoRAConfig
from aurora.model.noise import embed_noise, sample_noise
from aurora.model.partitioning import shard_rows

__all__ = ["Swin3DTransformerBackbone", "compute_shifted_window_mask"]

Res = tuple[int, int, int]
DropPathScales = tuple[jax.Array, jax.Array]  # per-sample factors of a block's two branches

REMAT_CHUNK_TOKENS = 8192
"""Tokens per chunk of a rematerialised Swin block: 56 windows of 144 tokens at 0.25°, where the
first stage's 259,200 tokens make 33 chunks and the last stage's 16,200 make 3. A block's backward
pass then holds one chunk's intermediates instead of the whole grid's (see docs/design.md)."""


# --- shape helpers (host side) ---------------------------------------------------------------


def _two_sided(padding: int) -> tuple[int, int]:
    """Split a padding amount as the reference does: the smaller half first."""
    return padding // 2, padding - padding // 2


def pad_3d(x: jax.Array | np.ndarray, pad: Res, value: float = 0.0):
    """Pad C, H and W two-sided, like the reference's `pad_3d`.

    Args:
        x (jax.Array | np.ndarray): Input of shape `(B, C, H, W, D)`.
        pad (tuple[int, int, int]): Total padding of C, H and W (the smaller half first).
        value (float): Fill value.

    Returns:
        jax.Array | np.ndarray: Padded input of shape `(B, C + pad[0], H + pad[1], W + pad[2], D)`.
    """
    widths = ((0, 0), _two_sided(pad[0]), _two_sided(pad[1]), _two_sided(pad[2]), (0, 0))
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.pad(x, widths, constant_values=value)


def crop_3d(x: jax.Array, pad: Res) -> jax.Array:
    """Undo :func:`pad_3d`.

    Args:
        x (jax.Array): Padded input of shape `(B, C, H, W, D)`.
        pad (tuple[int, int, int]): The padding :func:`pad_3d` added to C, H and W.

    Returns:
        jax.Array: Cropped input of shape `(B, C - pad[0], H - pad[1], W - pad[2], D)`.
    """
    _, C, H, W, _ = x.shape
    (cf, cb), (ht, hb), (wl, wr) = (_two_sided(p) for p in pad)
    return x[:, cf : C - cb, ht : H - hb, wl : W - wr, :]


def window_partition(x, ws: Res):
    """Split into windows, ordered batch-major.

    Args:
        x (jax.Array | np.ndarray): Input of shape `(B, C, H, W, D)`, C, H and W multiples of `ws`.
        ws (tuple[int, int, int]): Window size `(Wc, Wh, Ww)`.

    Returns:
        jax.Array | np.ndarray: Windows of shape `(B * nW, Wc * Wh * Ww, D)`.
    """
    B, C, H, W, D = x.shape
    x = x.reshape(B, C // ws[0], ws[0], H // ws[1], ws[1], W // ws[2], ws[2], D)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(-1, ws[0] * ws[1] * ws[2], D)


def window_reverse(windows: jax.Array, ws: Res, C: int, H: int, W: int) -> jax.Array:
    """Inverse of :func:`window_partition`.

    Args:
        windows (jax.Array): Windows of shape `(B * nW, Wc * Wh * Ww, D)`.
        ws (tuple[int, int, int]): Window size `(Wc, Wh, Ww)`.
        C (int): Levels of the (padded) grid.
        H (int): Latitudes of the (padded) grid.
        W (int): Longitudes of the (padded) grid.

    Returns:
        jax.Array: Grid of shape `(B, C, H, W, D)`.
    """
    D = windows.shape[-1]
    C1, H1, W1 = C // ws[0], H // ws[1], W // ws[2]
    x = windows.reshape(-1, C1, H1, W1, ws[0], ws[1], ws[2], D)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(-1, C, H, W, D)


def adjust_windows(window: Res, shift: Res, res: Res) -> tuple[Res, Res]:
    """Shrink windows (and drop shifts) along axes where the input is not larger than the window.

    Args:
        window (tuple[int, int, int]): Configured window size.
        shift (tuple[int, int, int]): Configured shift.
        res (tuple[int, int, int]): Resolution `(C, H, W)` of the input.

    Returns:
        tuple: The window size and shift to use at `res`.
    """
    ws = tuple(r if r <= w else w for w, r in zip(window, res))
    ss = tuple(0 if r <= w else s for w, s, r in zip(window, shift, res))
    return ws, ss  # type: ignore[return-value]


@lru_cache(maxsize=64)
def compute_shifted_window_mask(
    C: int, H: int, W: int, ws: Res, ss: Res, warped: bool = True
) -> np.ndarray:
    """Additive attention mask: 0 within a communication group, -100 across groups.

    Regions created by the cyclic shift form groups; with `warped`, the regions that wrap around in
    longitude are merged so the left and right edges of the globe attend to each other. Padding is a
    group of its own.

    Args:
        C (int): Levels of the unpadded grid.
        H (int): Latitudes of the unpadded grid.
        W (int): Longitudes of the unpadded grid.
        ws (tuple[int, int, int]): Window size.
        ss (tuple[int, int, int]): Shift size.
        warped (bool): Connect the left and right edges in longitude.

    Returns:
        np.ndarray: Mask of shape `(nW, N, N)`, `N = Wc * Wh * Ww` tokens per window.
    """
    img = np.zeros((1, C, H, W, 1), dtype=np.float32)
    slices = [(slice(0, -w), slice(-w, -s), slice(-s, None)) for w, s in zip(ws, ss)]
    for group, (c, h, w) in enumerate(itertools.product(*slices)):
        img[:, c, h, w, :] = group
    n_groups = 27
    if warped:
        # Within each of the 3 level slices, the 9 (h, w) regions are numbered row-major; the last
        # two longitude regions of each row wrap around and join.
        for c_slice in range(3):
            for first, second in ((1, 2), (4, 5), (7, 8)):
                img[img == first + 9 * c_slice] = second + 9 * c_slice
    pad = tuple((-n) % w for n, w in zip((C, H, W), ws))
    img = pad_3d(img, pad, value=n_groups)  # type: ignore[arg-type]
    windows = window_partition(img, ws)[..., 0]  # (nW, N)
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0))


# --- modules -----------------------------------------------------------------------------------


class MLP(nn.Module):
    """`fc1 -> GELU -> fc2`, applied to the last axis: `(..., D)` -> `(..., out_features)`.

    Drop-out (`drop_rate`, unless `deterministic`) after the GELU and after `fc2`, as there.
    """

    hidden_features: int
    out_features: int
    precision: Precision = None
    dtype: jnp.dtype | None = None
    drop_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        drop = nn.Dropout(self.drop_rate, deterministic=self.deterministic)
        x = Dense(self.hidden_features, precision=self.precision, dtype=self.dtype, name="fc1")(x)
        x = Dense(self.out_features, precision=self.precision, dtype=self.dtype, name="fc2")(
            drop(gelu(x))
        )
        return drop(x)


class WindowAttention(nn.Module):
    """Multi-head self-attention within windows, with LoRA on `qkv` and `proj`.

    Attributes:
        dim (int): Token channels `D`.
        num_heads (int): Attention heads; `dim` must be a multiple.
        lora (LoRAConfig, optional): LoRA adapters on `qkv` and `proj`; None: no LoRA.
        drop_rate (float): Drop-out of the attention weights and of the output (unless
            `deterministic`).
        use_fp16_safe_attention (bool): float16 logits clamped against overflow.
    """

    dim: int
    num_heads: int
    lora: LoRAConfig | None = None  # None: no LoRA
    precision: Precision = None
    dtype: jnp.dtype | None = None
    drop_rate: float = 0.0
    deterministic: bool = True
    use_fp16_safe_attention: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, mask: np.ndarray | None, rollout_step: jax.Array | int
    ) -> jax.Array:
        """Attend within each window.

        Args:
            x (jax.Array): Windows of shape `(B * nW, N, D)`.
            mask (np.ndarray, optional): Additive mask of shape `(nW, N, N)`, or None.
            rollout_step (jax.Array | int): Rollout step, selects the LoRA adapters.

        Returns:
            jax.Array: Output of shape `(B * nW, N, D)`.
        """
        dense = lambda n, name: Dense(n, precision=self.precision, dtype=self.dtype, name=name)
        qkv = dense(3 * self.dim, "qkv")(x)
        if self.lora is not None:
            lora = self.lora.adapter(
                self.dim, 3 * self.dim, name="lora_qkv", precision=self.precision, dtype=self.dtype
            )
            qkv = qkv + lora(x, rollout_step)
        Bw, N, _ = x.shape
        head_dim = self.dim // self.num_heads
        # Each of q, k, v is sliced and transposed to (B * nW, H, N, d) in one copy; transposing
        # the whole qkv first and slicing it after costs a second pass over it, both ways.
        qkv = shard_rows(qkv).reshape(Bw, N, 3, self.num_heads, head_dim)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))

        attention = partial(
            dot_product_attention,
            precision=self.precision,
            fp16_safe=self.use_fp16_safe_attention,
            dropout_rate=self.drop_rate,
            dropout_rng=None
            if self.deterministic or not self.drop_rate
            else self.make_rng("dropout"),
        )
        if mask is None:
            out = attention(q, k, v)
        else:
            nW = mask.shape[0]
            split = lambda t: t.reshape(Bw // nW, nW, *t.shape[1:])
            out = attention(split(q), split(k), split(v), bias=mask[:, None])
            out = out.reshape(Bw, *out.shape[2:])

        out = out.transpose(0, 2, 1, 3).reshape(Bw, N, self.dim)
        y = dense(self.dim, "proj")(out)
        if self.lora is not None:
            lora = self.lora.adapter(
                self.dim, self.dim, name="lora_proj", precision=self.precision, dtype=self.dtype
            )
            y = y + lora(out, rollout_step)
        return nn.Dropout(self.drop_rate, deterministic=self.deterministic)(y)


class Swin3DTransformerBlock(nn.Module):
    """(Shifted-)window attention and MLP, each followed by AdaLN and a residual (post-norm).

    With `chunk` > 0 the whole block runs in the windows' token order, in rematerialised chunks of
    about `chunk` tokens (:func:`remat_in_chunks`). Everything after the attention is token-wise,
    so it commutes with the window permutation; the padding tokens this also sends through the
    MLP are cropped afterwards. This keeps the whole-grid intermediates (attention logits, the
    MLP's hidden layer, layout copies) out of the backward pass of a rematerialised block.

    Unless `deterministic`, each residual branch is dropped per sample with probability
    `drop_path` (stochastic depth, drawn once for the whole block) and `drop_rate` drops out in
    the attention and the MLP.
    """

    dim: int
    num_heads: int
    window_size: Res
    shift_size: Res = (0, 0, 0)
    mlp_ratio: float = 4.0
    lora: LoRAConfig | None = None  # None: no LoRA
    chunk: int = 0
    precision: Precision = None
    dtype: jnp.dtype | None = None
    drop_path: float = 0.0
    drop_rate: float = 0.0
    deterministic: bool = True
    use_fp16_safe_attention: bool = False

    def setup(self) -> None:
        self.attn = WindowAttention(
            self.dim,
            self.num_heads,
            lora=self.lora,
            precision=self.precision,
            dtype=self.dtype,
            drop_rate=self.drop_rate,
            deterministic=self.deterministic,
            use_fp16_safe_attention=self.use_fp16_safe_attention,
        )
        self.norm1 = AdaptiveLayerNorm(self.dim, precision=self.precision, dtype=self.dtype)
        self.mlp = MLP(
            int(self.dim * self.mlp_ratio),
            self.dim,
            precision=self.precision,
            dtype=self.dtype,
            drop_rate=self.drop_rate,
            deterministic=self.deterministic,
        )
        self.norm2 = AdaptiveLayerNorm(self.dim, precision=self.precision, dtype=self.dtype)

    def __call__(
        self, x: jax.Array, c: jax.Array, res: Res, rollout_step: jax.Array | int
    ) -> jax.Array:
        """Apply the block.

        Args:
            x (jax.Array): Input tokens of shape `(B, L, D)`, `L = C * H * W`.
            c (jax.Array): Lead-time conditioning of shape `(B, D)`, or per token `(B, L, D)`
                (with the stochastic backbone's noise).
            res (tuple[int, int, int]): Resolution `(C, H, W)` of the tokens.
            rollout_step (jax.Array | int): Rollout step, selects the LoRA adapters.

        Returns:
            jax.Array: Output tokens of shape `(B, L, D)`.
        """
        B, L, D = x.shape
        if res[0] * res[1] * res[2] != L:
            raise ValueError(f"Wrong feature size: {L} vs {res[0]}x{res[1]}x{res[2]}.")
        windows, mask = self._partition(x, res)
        kept = self._drop_path_scales(B)
        if not self.chunk:
            return self._residuals(
                c, x, self._merge(self.attn(windows, mask, rollout_step), res, B), kept
            )

        Bw, N, _ = windows.shape
        per_sample = windows.reshape(B, Bw // B, N, D)  # chunks split each sample's windows
        inputs = (per_sample,) if mask is None else (per_sample, mask[None])
        if c.ndim == 3:  # per-token conditioning goes into windows with its tokens, last input
            inputs += (self._partition(c, res)[0].reshape(B, Bw // B, N, c.shape[-1]),)
            c = None
        out = remat_in_chunks(
            Swin3DTransformerBlock._window_block,
            self,
            (c, rollout_step, kept),
            inputs,
            max(1, self.chunk // N),
            axis=1,
        )
        return self._merge(out.reshape(Bw, N, D), res, B)

    def _geometry(self, res: Res) -> tuple[Res, Res, Res]:
        """Window size and shift for this resolution, and the padding that makes whole windows."""
        ws, ss = adjust_windows(self.window_size, self.shift_size, res)
        pad = tuple((-n) % w for n, w in zip(res, ws))
        return ws, ss, pad  # type: ignore[return-value]

    def _partition(self, x: jax.Array, res: Res) -> tuple[jax.Array, np.ndarray | None]:
        """`(B, L, D)` -> windows `(B * nW, N, D)` after the cyclic shift and padding.

        Also returns the shift's mask `(nW, N, N)` (None without a shift).
        """
        ws, ss, pad = self._geometry(res)
        x = x.reshape(x.shape[0], *res, x.shape[-1])
        mask = None
        if any(ss):
            x = jnp.roll(x, shift=(-ss[0], -ss[1], -ss[2]), axis=(1, 2, 3))
            mask = compute_shifted_window_mask(*res, ws, ss)
        return window_partition(pad_3d(x, pad), ws), mask

    def _merge(self, windows: jax.Array, res: Res, batch: int) -> jax.Array:
        """Inverse of :meth:`_partition`: windows -> `(B, L, D)`."""
        ws, ss, pad = self._geometry(res)
        padded = tuple(n + p for n, p in zip(res, pad))
        x = crop_3d(window_reverse(windows, ws, *padded), pad)
        if any(ss):
            x = jnp.roll(x, shift=ss, axis=(1, 2, 3))
        return x.reshape(batch, -1, x.shape[-1])

    def _window_block(
        self,
        conditioning: tuple[jax.Array | None, jax.Array | int, DropPathScales | None],
        w: jax.Array,
        *rest: jax.Array,
    ) -> jax.Array:
        """The whole block on windows `(B, nW', N, D)` in window order.

        `rest` holds their masks, `(1, nW', N, N)` (absent without a shift), then, when the
        conditioning is None, the per-token conditioning in the same windows, `(B, nW', N, Dc)`.
        """
        c, rollout_step, kept = conditioning
        B, nW, N, D = w.shape
        if c is None:
            *rest, c_windows = rest
            c = c_windows.reshape(B, nW * N, c_windows.shape[-1])
        m = rest[0] if rest else None
        attended = self.attn(w.reshape(B * nW, N, D), None if m is None else m[0], rollout_step)
        tokens = w.reshape(B, nW * N, D)
        return self._residuals(c, tokens, attended.reshape(tokens.shape), kept).reshape(w.shape)

    def _drop_path_scales(self, batch: int) -> DropPathScales | None:
        """Per-sample factors `(B, 1, 1)` of the two residual branches; None when none drop."""
        if self.deterministic or not self.drop_path:
            return None
        attn_key, mlp_key = jax.random.split(self.make_rng("dropout"))
        return (
            drop_path_scale(attn_key, self.drop_path, batch),
            drop_path_scale(mlp_key, self.drop_path, batch),
        )

    def _residuals(
        self, c: jax.Array, x: jax.Array, attended: jax.Array, kept: DropPathScales | None = None
    ) -> jax.Array:
        """The attention's residual with AdaLN, then the MLP's: token-wise, in any token order.

        `kept` scales each branch per sample (drop-path), or is None.
        """
        attn_branch = self.norm1(attended, c)
        x = x + (attn_branch if kept is None else attn_branch * kept[0])
        mlp_branch = self.norm2(self.mlp(x), c)
        return x + (mlp_branch if kept is None else mlp_branch * kept[1])


class PatchMerging3D(nn.Module):
    """Halve H and W (padding odd sizes at the bottom/right), doubling the channels.

    Called with `x (jax.Array)` of shape `(B, C * H * W, D)` and `res = (C, H, W)`; returns shape
    `(B, C * ceil(H / 2) * ceil(W / 2), out_dim)`, `out_dim` by default `2 * D`. The stochastic
    backbone merges its per-token conditioning with `out_dim = D` and no norm.
    """

    dim: int
    precision: Precision = None
    dtype: jnp.dtype | None = None
    out_dim: int | None = None
    norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, res: Res) -> jax.Array:
        C, H, W = res
        B, _, D = x.shape
        x = pad_3d(shard_rows(x).reshape(B, C, H, W, D), (0, H % 2, W % 2))
        H2, W2 = x.shape[2] // 2, x.shape[3] // 2
        x = x.reshape(B, C, H2, 2, W2, 2, D).transpose(0, 1, 2, 4, 3, 5, 6)
        x = x.reshape(B, C * H2 * W2, 4 * D)
        if self.norm:
            x = LayerNorm(dtype=self.dtype, name="norm")(x)
        return Dense(
            self.out_dim or 2 * self.dim,
            use_bias=False,
            precision=self.precision,
            dtype=self.dtype,
            name="reduction",
        )(x)


class PatchSplitting3D(nn.Module):
    """Double H and W (cropping what merging padded), halving the channels.

    Called with `x (jax.Array)` of shape `(B, C * H * W, D)`, `res = (C, H, W)` and the padding
    `crop` that the matching merge added; returns shape `(B, C * (2H - crop[1]) * (2W - crop[2]),
    D // 2)`.
    """

    dim: int
    precision: Precision = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, res: Res, crop: Res) -> jax.Array:
        C, H, W = res
        B = x.shape[0]
        out = self.dim // 2
        x = Dense(4 * out, use_bias=False, precision=self.precision, dtype=self.dtype, name="lin1")(
            x
        )
        x = shard_rows(x)  # not split along the channels like the FSDP-sharded `lin1`
        x = x.reshape(B, C, H, W, 2, 2, out).transpose(0, 1, 2, 4, 3, 5, 6)
        x = crop_3d(x.reshape(B, C, 2 * H, 2 * W, out), crop)
        x = LayerNorm(dtype=self.dtype, name="norm")(x.reshape(B, -1, out))
        return Dense(out, use_bias=False, precision=self.precision, dtype=self.dtype, name="lin2")(
            x
        )


class BasicLayer3D(nn.Module):
    """A stage of `depth` blocks (alternating unshifted/shifted windows), then resampling.

    Called with tokens `x` of shape `(B, C * H * W, D)`, conditioning `c` `(B, D)`, `res =
    (C, H, W)`, the padding `crop` to undo when splitting and the rollout step; returns the
    resampled tokens and the tokens before resampling (the skip connection), `(B, C * H * W, D)`.
    `drop_path` holds each block's drop-path rate (default none).
    """

    dim: int
    depth: int
    num_heads: int
    window_size: Res
    mlp_ratio: float = 4.0
    resample: str | None = None  # "down", "up" or None
    lora: LoRAConfig | None = None  # None: no LoRA
    remat: bool = False
    precision: Precision = None
    dtype: jnp.dtype | None = None
    drop_path: tuple[float, ...] = ()
    drop_rate: float = 0.0
    deterministic: bool = True
    use_fp16_safe_attention: bool = False

    @nn.compact
    def __call__(
        self, x: jax.Array, c: jax.Array, res: Res, crop: Res, rollout_step: jax.Array | int
    ) -> tuple[jax.Array, jax.Array]:
        block_cls = (
            nn.remat(Swin3DTransformerBlock, static_argnums=(3,))
            if self.remat
            else Swin3DTransformerBlock
        )
        half = tuple(w // 2 for w in self.window_size)
        for i in range(self.depth):
            x = block_cls(
                self.dim,
                self.num_heads,
                self.window_size,
                shift_size=(0, 0, 0) if i % 2 == 0 else half,
                mlp_ratio=self.mlp_ratio,
                lora=self.lora,
                chunk=REMAT_CHUNK_TOKENS if self.remat else 0,
                precision=self.precision,
                dtype=self.dtype,
                drop_path=self.drop_path[i] if self.drop_path else 0.0,
                drop_rate=self.drop_rate,
                deterministic=self.deterministic,
                use_fp16_safe_attention=self.use_fp16_safe_attention,
                name=f"blocks_{i}",
            )(x, c, res, rollout_step)
        if self.resample == "down":
            return PatchMerging3D(self.dim, self.precision, self.dtype, name="downsample")(
                x, res
            ), x
        if self.resample == "up":
            return PatchSplitting3D(self.dim, self.precision, self.dtype, name="upsample")(
                x, res, crop
            ), x
        return x, x


class Swin3DTransformerBackbone(nn.Module):
    """U-Net of Swin3D stages over `(latent level, lat patch, lon patch)` tokens."""

    embed_dim: int = 96
    encoder_depths: tuple[int, ...] = (2, 2, 6, 2)
    encoder_num_heads: tuple[int, ...] = (3, 6, 12, 24)
    decoder_depths: tuple[int, ...] = (2, 6, 2, 2)
    decoder_num_heads: tuple[int, ...] = (24, 12, 6, 3)
    window_size: Res = (2, 7, 7)
    mlp_ratio: float = 4.0
    lora: LoRAConfig | None = None  # None: no LoRA
    remat: bool = False
    # Also rematerialise whole stages: the forward pass keeps only each stage's input, not every
    # block's, for one more forward pass of the backbone per step.
    remat_stages: bool = False
    precision: Precision = None
    dtype: jnp.dtype | None = None
    use_updated_lead_time_embedding: bool = False  # `lead_time_expansion_v3` (Aurora 1.5)
    # Regularisation for training (microsoft-aurora's `drop_path_rate`, `drop_rate` and
    # `attn_drop_rate = drop_rate`), active unless `deterministic`.
    drop_path_rate: float = 0.0
    drop_rate: float = 0.0
    deterministic: bool = True
    use_fp16_safe_attention: bool = False
    stochastic: bool = False  # per-token noise in the conditioning (aurora.model.noise)

    def encoder_specs(self, patch_res: Res) -> tuple[list[Res], list[Res]]:
        """Resolution entering each encoder stage and the padding its merge adds.

        Args:
            patch_res (tuple[int, int, int]): Token resolution `(C, H, W)` entering the backbone.

        Returns:
            tuple: Per encoder stage, its resolution `(C, H, W)` and the padding `(0, h, w)` of
            its merge (`(0, 0, 0)` for the last stage).
        """
        all_res, padded = [patch_res], []
        for _ in range(1, len(self.encoder_depths)):
            C, H, W = all_res[-1]
            padded.append((0, H % 2, W % 2))
            all_res.append((C, (H + H % 2) // 2, (W + W % 2) // 2))
        padded.append((0, 0, 0))
        return all_res, padded

    def drop_path_rates(self, depths: tuple[int, ...], stage: int) -> tuple[float, ...]:
        """The drop-path rate of each block of `stage`: rates rise linearly from 0 to
        `drop_path_rate` over the blocks of a half (encoder or decoder), as in microsoft-aurora."""
        rates = np.linspace(0.0, self.drop_path_rate, sum(depths), dtype=np.float32)
        first = sum(depths[:stage])
        return tuple(float(r) for r in rates[first : first + depths[stage]])

    def _stage(
        self,
        dim: int,
        depth: int,
        heads: int,
        resample: str | None,
        name: str,
        drop_path: tuple[float, ...] = (),
    ) -> BasicLayer3D:
        layer = nn.remat(BasicLayer3D, static_argnums=(3, 4)) if self.remat_stages else BasicLayer3D
        return layer(
            dim,
            depth,
            heads,
            self.window_size,
            mlp_ratio=self.mlp_ratio,
            resample=resample,
            lora=self.lora,
            remat=self.remat,
            precision=self.precision,
            dtype=self.dtype,
            drop_path=drop_path,
            drop_rate=self.drop_rate,
            deterministic=self.deterministic,
            use_fp16_safe_attention=self.use_fp16_safe_attention,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        lead_time_hours: float,
        rollout_step: jax.Array | int,
        patch_res: Res,
        lead_minutes: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> jax.Array:
        """Run the U-Net.

        Args:
            x (jax.Array): Tokens of shape `(B, L, D)`, `L = C * H * W`, `D = embed_dim`.
            lead_time_hours (float): Lead time, for the AdaLN conditioning.
            rollout_step (jax.Array | int): Rollout step, selects the LoRA adapters.
            patch_res (tuple[int, int, int]): Token resolution `(C, H, W)`.
            lead_minutes (jax.Array, optional): Per-sample int32 lead times in minutes of shape
                `(B,)` (`variable_lead_time`); they replace `lead_time_hours`.
            noise (jax.Array, optional): With `stochastic`, the noise `(B, L, D)` to embed; by
                default a fresh draw from the "noise" rng stream (see aurora.model.noise).

        Returns:
            jax.Array: Tokens of shape `(B, L, 2 * D)` (the last stage concatenated with the
            first stage's skip).
        """
        if x.shape[1] != patch_res[0] * patch_res[1] * patch_res[2]:
            raise ValueError("Input shape does not match the patch resolution.")
        if patch_res[0] % self.window_size[0]:
            raise ValueError(
                f"Latent levels ({patch_res[0]}) must be divisible by window size "
                f"{self.window_size[0]}."
            )
        if sum(self.encoder_depths) != sum(self.decoder_depths):
            raise ValueError("Encoder and decoder depths must have the same sum.")
        n_enc, n_dec = len(self.encoder_depths), len(self.decoder_depths)
        all_res, padded = self.encoder_specs(patch_res)

        expansion = (
            lead_time_expansion_v3 if self.use_updated_lead_time_embedding else lead_time_expansion
        )
        if lead_minutes is None:
            lead = expansion(np.array([lead_time_hours]), self.embed_dim)
        else:
            updated = self.use_updated_lead_time_embedding
            lead = lead_time_encoding(lead_minutes, self.embed_dim, updated)
        lead = jnp.asarray(lead, dtype=x.dtype)
        dense = lambda name: Dense(
            self.embed_dim, precision=self.precision, dtype=self.dtype, name=name
        )
        c = dense("time_mlp_2")(
            nn.silu(dense("time_mlp_0")(lead))
        )  # (1, D) for a fixed lead time, else (B, D)
        c = jnp.broadcast_to(c, (x.shape[0], self.embed_dim))
        if noise is not None and not self.stochastic:
            raise ValueError("Noise was given to a backbone that is not stochastic.")
        if self.stochastic:
            noise = sample_noise(self, (*x.shape[:2], self.embed_dim)) if noise is None else noise
            c = c[:, None] + embed_noise(
                noise.astype(lead.dtype), self.embed_dim, self.precision, self.dtype
            )  # (B, L, D): each token's own conditioning

        skips, saved_c = [], []
        for i in range(n_enc):
            stage = self._stage(
                self.embed_dim * 2**i,
                self.encoder_depths[i],
                self.encoder_num_heads[i],
                "down" if i < n_enc - 1 else None,
                f"encoder_layers_{i}",
                self.drop_path_rates(self.encoder_depths, i),
            )
            saved_c.append(c)
            x, unscaled = stage(x, c, all_res[i], (0, 0, 0), rollout_step)
            skips.append(unscaled)
            if self.stochastic and i < n_enc - 1:  # the next stage's resolution
                c = PatchMerging3D(
                    self.embed_dim,
                    self.precision,
                    self.dtype,
                    out_dim=self.embed_dim,
                    norm=False,
                    name=f"context_down_layers_{i}",
                )(c, all_res[i])

        for i in range(n_dec):
            index = n_dec - i - 1
            stage = self._stage(
                self.embed_dim * 2**index,
                self.decoder_depths[i],
                self.decoder_num_heads[i],
                "up" if i < n_dec - 1 else None,
                f"decoder_layers_{i}",
                self.drop_path_rates(self.decoder_depths, i),
            )
            x, _ = stage(x, c, all_res[index], padded[index - 1], rollout_step)
            if 0 < i < n_dec - 1:
                x = x + skips[index - 1]
            elif i == n_dec - 1:
                x = jnp.concatenate([x, skips[0]], axis=-1)
            if self.stochastic and index > 0:  # the encoder's conditioning at the next resolution
                c = saved_c[index - 1]
        return x
