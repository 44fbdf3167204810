"""Pressure-level-specific parameters: microsoft-aurora's `level_condition`.

With `level_condition`, the encoder's atmospheric patch embedding and the decoder's atmospheric
heads have one copy per pressure level (`model/levelcond.py:LevelConditioned` in microsoft-aurora),
each applied to its own level's slice. The copy for level 850 is named `layers_850`, which is what
`aurora.convert` makes of the reference's `layers.850` keys. Every configured level has its
parameters, whichever levels the batch holds, so checkpoints convert strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from aurora.normalisation import level_to_str

__all__ = ["LevelConditioned", "level_heads", "level_param_name"]


def level_param_name(level: float) -> str:
    """The Flax name of `level`'s copy: `layers_{level_to_str(level)}`.

    Only whole hPa levels: the reference names level 0.5 `layers.0_5`, which the converter's
    numeric-segment rule cannot tell from two nested indices.
    """
    name = level_to_str(level)
    if not name.isdigit():
        raise NotImplementedError(
            f"level_condition supports whole-hPa levels only, not {level} (checkpoint names)."
        )
    return f"layers_{name}"


def _check_levels(levels: Sequence[float], configured: Sequence[float]) -> list[str]:
    """The copies' names for the batch's `levels`, each of which must be `configured`."""
    known = {level_param_name(lv) for lv in configured}
    names = [level_param_name(lv) for lv in levels]
    unknown = [lv for lv, n in zip(levels, names) if n not in known]
    if unknown:
        raise ValueError(f"Pressure levels {unknown} are not in level_condition {configured}.")
    return names


class LevelConditioned(nn.Module):
    """Applies `make(name=...)`'s copy for each level to that level's slice along `axis`."""

    make: Callable[..., nn.Module]
    levels: tuple[float, ...]
    axis: int

    @nn.compact
    def __call__(self, x: jax.Array, *args: Any, levels: Sequence[float]) -> jax.Array:
        """Run each level's copy.

        Args:
            x (jax.Array): Input whose `axis` runs over `levels`.
            *args (Any): Further arguments of every copy.
            levels (Sequence[float]): The pressure levels of `x` along `axis`.

        Returns:
            jax.Array: The copies' outputs stacked along `axis`.
        """
        axis = self.axis % x.ndim
        if x.shape[axis] != len(levels):
            raise ValueError(f"Expected {len(levels)} levels along axis {axis}, got {x.shape}.")
        names = _check_levels(levels, self.levels)
        modules = {lv: self.make(name=level_param_name(lv)) for lv in self.levels}
        outs = [modules[lv](jnp.take(x, i, axis=axis), *args) for i, lv in enumerate(levels)]
        if self.is_initializing():
            # The levels absent from the batch get their parameters too (result unused).
            for lv in self.levels:
                if level_param_name(lv) not in names:
                    modules[lv](jnp.take(x, 0, axis=axis), *args)
        return jnp.stack(outs, axis=axis)


def level_heads(
    heads: Mapping[str, Mapping[str, Any]], levels: Sequence[float], configured: Sequence[float]
) -> list[dict[str, Any]]:
    """Per batch level, every variable's head of that level: `heads[var][layers_{level}]`."""
    names = _check_levels(levels, configured)
    return [{var: per_level[n] for var, per_level in heads.items()} for n in names]
