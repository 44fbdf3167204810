"""Extra input channels built from the static variables and the time (Aurora air pollution).

microsoft-aurora's `dynamic_vars` appends six calendar features (time of day, day of week and
day of month as cosine/sine pairs, constant over the grid) to the static variables;
`atmos_static_vars` also feeds the static (and dynamic) channels to every pressure level, as
atmospheric variables named `static_<name>`; `simulate_indexing_bug` reproduces the original air
pollution model, in which `static_z` read the atmospheric `z` instead of the static `z`.

The calendar features are exact: hour, weekday and day of month are integers taken from the
traced minutes since 1970, and index tables computed on the host in float64 and rounded to float32,
as the reference computes them with numpy from the input time.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from aurora.civil_dates import civil_from_days

__all__ = ["DYNAMIC_VARS", "atmos_static_names", "dynamic_channels", "simulate_indexing_bug"]

DYNAMIC_VARS = ("tod_cos", "tod_sin", "dow_cos", "dow_sin", "doy_cos", "doy_sin")
"""Names of the dynamic channels, in microsoft-aurora's order."""


def _table(count: int, period: float, start: int = 0) -> np.ndarray:
    """float32 `[cos, sin](2π k / period)` for `k = start .. start + count - 1`, from float64."""
    angle = 2 * np.pi * np.arange(start, start + count) / period
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32)


def dynamic_channels(minutes: jax.Array, shape: tuple[int, int, int, int]) -> jax.Array:
    """The six calendar channels of shape `(B, T, 6, H, W)` for int32 minutes since 1970 `(B,)`.

    The day-of-year pair uses the day of the *month* over 365.25 days, as microsoft-aurora does.
    """
    B, T, H, W = shape
    minutes = jnp.asarray(minutes, jnp.int32)
    days = jnp.floor_divide(minutes, 1440)
    hour = jnp.floor_divide(minutes - days * 1440, 60)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday; Monday is 0
    features = jnp.concatenate(
        [
            jnp.asarray(_table(24, 24))[hour],
            jnp.asarray(_table(7, 7))[weekday],
            jnp.asarray(_table(31, 365.25, start=1))[civil_from_days(days)[2] - 1],
        ],
        axis=-1,
    )  # (B, 6)
    return jnp.broadcast_to(features[:, None, :, None, None], (B, T, 6, H, W))


def atmos_static_names(static_names: Sequence[str]) -> tuple[str, ...]:
    """The atmospheric names of the static channels (prefixed: `z` is static and atmospheric)."""
    return tuple(f"static_{v}" for v in static_names)


def simulate_indexing_bug(x_atmos: jax.Array, atmos_names: Sequence[str]) -> jax.Array:
    """`x_atmos` `(B, T, V, C, H, W)` with the `static_z` channel replaced by the `z` channel."""
    if "z" not in atmos_names or "static_z" not in atmos_names:
        return x_atmos
    i_z, i_static_z = atmos_names.index("z"), atmos_names.index("static_z")
    return x_atmos.at[:, :, i_static_z].set(x_atmos[:, :, i_z])
