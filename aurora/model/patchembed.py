"""Per-variable patch embedding: one `(T, P, P)` kernel per variable, summed into one token."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from aurora.model.layers import Precision, torch_linear_uniform

__all__ = ["LevelPatchEmbed"]


class LevelPatchEmbed(nn.Module):
    """Maps all variables at one level (or the surface) into one embedding per patch.

    Parameters keep PyTorch's `Conv3d` layout so checkpoints convert without reshaping:
    `weights[name]` is `(D, 1, T_max, P, P)` and `bias` is `(D,)`. A batch with a shorter history
    uses the first `T` history slices of each kernel, as microsoft-aurora does.
    """

    var_names: tuple[str, ...]
    patch_size: int
    embed_dim: int
    history_size: int = 1
    precision: Precision = None

    @nn.compact
    def __call__(self, x: jax.Array, var_names: Sequence[str]) -> jax.Array:
        """Embed the patches.

        Args:
            x (jax.Array): Fields of shape `(B, V, T, H, W)`, `T <= history_size`.
            var_names (Sequence[str]): The `V` variables of `x`, each one of `self.var_names`.

        Returns:
            jax.Array: Tokens of shape `(B, H/P * W/P, D)`.
        """
        kernel = (self.embed_dim, 1, self.history_size, self.patch_size, self.patch_size)
        fan_in = self.history_size * self.patch_size**2
        init = torch_linear_uniform(fan_in)

        def init_weights(key: jax.Array) -> dict[str, jax.Array]:
            keys = jax.random.split(key, len(self.var_names))
            return {name: init(k, kernel) for name, k in zip(self.var_names, keys)}

        weights = self.param("weights", init_weights)
        bias = self.param("bias", init, (self.embed_dim,))

        B, V, T, H, W = x.shape
        P = self.patch_size
        if len(var_names) != V or len(set(var_names)) != V:
            raise ValueError(f"Expected {V} distinct variable names, got {tuple(var_names)}.")
        unknown = [n for n in var_names if n not in weights]
        if unknown:
            raise ValueError(
                f"Variables {unknown} have no patch embedding; the model knows {self.var_names}."
            )
        if self.history_size < T:
            raise ValueError(f"History of {T} steps exceeds max_history_size={self.history_size}.")
        if H % P or W % P:
            raise ValueError(f"Grid {H}x{W} is not divisible by the patch size {P}.")

        w = jnp.concatenate([weights[n][:, :, :T] for n in var_names], axis=1)  # (D, V, T, P, P)
        patches = x.reshape(B, V, T, H // P, P, W // P, P)
        out = jnp.einsum(
            "bvthpwq,dvtpq->bhwd", patches, w.astype(x.dtype), precision=self.precision
        )
        return out.reshape(B, (H // P) * (W // P), self.embed_dim) + bias.astype(x.dtype)
