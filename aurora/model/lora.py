"""LoRA on the backbone's window attention, one adapter per rollout step or shared.

`rollout_step` may be a traced integer, so one compiled step serves every rollout step:
the adapter is selected with array indexing and switched off with `jnp.where`, never with Python
control flow. Modes follow microsoft-aurora:

* `"single"`: the same adapter at every step `< lora_steps` (including step 0);
* `"from_second"`: no adapter at step 0, the same adapter at steps `1 .. lora_steps - 1`;
* `"all"`: a separate adapter for each step `< lora_steps`.

No adapter applies at steps `>= lora_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
from flax import linen as nn

from aurora.model.layers import Precision, torch_linear_uniform

__all__ = ["LORA_MODES", "LoRAConfig", "LoRAMode", "LoRARollout"]

LoRAMode = Literal["single", "from_second", "all"]
LORA_MODES = ("single", "from_second", "all")


@dataclass(frozen=True)
class LoRAConfig:
    """Rank, alpha, number of rollout steps with an adapter, and mode (see the module docstring)."""

    r: int = 8
    alpha: int = 8
    steps: int = 40
    mode: LoRAMode = "single"

    def __post_init__(self) -> None:
        if self.mode not in LORA_MODES:
            raise ValueError(f"Invalid LoRA mode {self.mode!r}; choose one of {LORA_MODES}.")

    def adapter(
        self,
        in_features: int,
        out_features: int,
        *,
        name: str,
        precision: Precision,
        dtype: jnp.dtype | None,
    ) -> LoRARollout:
        """A `LoRARollout` for an `in_features -> out_features` linear layer with this config."""
        return LoRARollout(
            in_features,
            out_features,
            r=self.r,
            alpha=self.alpha,
            max_steps=self.steps,
            mode=self.mode,
            precision=precision,
            dtype=dtype,
            name=name,
        )


class LoRARollout(nn.Module):
    """Additive low-rank correction `x Aᵀ Bᵀ · alpha / r` for a linear layer.

    Parameters are stacked over adapters: `lora_A` `(n, r, in)`, `lora_B` `(n, out, r)` with
    `n = lora_steps` in mode `"all"` and 1 otherwise (PyTorch: `loras.{i}.lora_A`).
    """

    in_features: int
    out_features: int
    r: int = 8
    alpha: int = 8
    max_steps: int = 40
    mode: LoRAMode = "single"
    precision: Precision = None
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array, step: jax.Array | int) -> jax.Array:
        """The correction for rollout step `step`.

        Args:
            x (jax.Array): The linear layer's input of shape `(..., in_features)`.
            step (jax.Array | int): Rollout step (may be traced).

        Returns:
            jax.Array: Correction of shape `(..., out_features)`, zero where no adapter applies.
        """
        if self.mode not in LORA_MODES:
            raise ValueError(f"Invalid LoRA mode {self.mode!r}; choose one of {LORA_MODES}.")
        n = self.max_steps if self.mode == "all" else 1
        lora_a = self.param(
            "lora_A", torch_linear_uniform(self.in_features), (n, self.r, self.in_features)
        )
        lora_b = self.param("lora_B", nn.initializers.zeros_init(), (n, self.out_features, self.r))

        step = jnp.asarray(step, dtype=jnp.int32)
        index = jnp.clip(step, 0, n - 1) if self.mode == "all" else 0
        dtype = self.dtype or x.dtype
        a = lora_a[index].astype(dtype)
        b = lora_b[index].astype(dtype)
        delta = jnp.einsum("...i,ri->...r", x.astype(dtype), a, precision=self.precision)
        delta = jnp.einsum("...r,or->...o", delta, b, precision=self.precision) * (
            self.alpha / self.r
        )

        active = step < self.max_steps
        if self.mode == "from_second":
            active = jnp.logical_and(active, step > 0)
        return jnp.where(active, delta, jnp.zeros_like(delta))
