"""Output-only variables: predicted by the model, never read from the input.

microsoft-aurora's `output_only_surf_vars` / `output_only_atmos_vars` (Aurora 1.5's accumulated
fluxes, precipitation, gusts...): real input data lacks them, so the encoder sees zeros in their
channels, after normalisation, whether or not the batch holds them (the reference overwrites them
too). The decoder predicts them like every other variable; `aurora.rollout.advance_batch` drops
them from the next input because the input had none. microsoft-aurora does the zero-filling in
`AuroraV1p5._pre_encoder_hook`; here `Aurora.__call__` does it for every model that names
output-only variables, so presets overriding the hook keep it.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

__all__ = ["zero_output_only"]


def zero_output_only(
    fields: Mapping[str, jax.Array], output_only: tuple[str, ...]
) -> dict[str, jax.Array]:
    """`fields` with every `output_only` variable set to zeros shaped like the other fields.

    Args:
        fields: Normalised surface (`(B, T, H, W)`) or atmospheric (`(B, T, C, H, W)`) variables.
        output_only: The variables to zero-fill, present in `fields` or not.

    Raises:
        ValueError: If `fields` holds no variable to take the shape from.
    """
    if not output_only:
        return dict(fields)
    inputs = [v for k, v in fields.items() if k not in output_only]
    if not inputs:
        raise ValueError(f"Output-only variables {output_only} need an input variable beside them.")
    zeros = jnp.zeros_like(inputs[0])
    return {**fields, **dict.fromkeys(output_only, zeros)}
