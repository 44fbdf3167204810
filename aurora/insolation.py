"""Prescribed top-of-atmosphere solar insolation, computed inside `jit` from the traced time.

microsoft-aurora's `aurora.insolation.insolation` (1995 orbital elements, after Brian Rose's
Climate Laboratory Book), which Aurora 1.5 feeds as the input variable `insolation` and recomputes
for every prediction's valid time. The reference works in numpy on host datetimes; here the time
is int32 minutes since 1970, so the day of the year comes from integer calendar arithmetic and
the orbital formulas run in float32. The hour angle, a few thousand radians late in the year, is
the float32 number the reference forms (whole days plus the day fraction, longitude turns divided
on the host), so both take the cosine of the same argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aurora.civil_dates import civil_from_days, days_from_civil

__all__ = ["insolation"]

_EPS = 23.4441 * np.pi / 180.0  # obliquity
_ECC = 0.016715  # eccentricity
_OM = 282.7 * np.pi / 180.0  # longitude of perihelion
_BETA = np.sqrt(1 - _ECC**2.0)


def _days_to_year_start(days: jax.Array) -> jax.Array:
    """Days since 1970-01-01 of January 1st of the year holding `days`."""
    year, _, _ = civil_from_days(days)
    return days_from_civil(year, 1, 1)


def insolation(minutes: jax.Array, lat: np.ndarray, lon: np.ndarray) -> jax.Array:
    """Insolation (solar constant 1, night negative) of shape `(B, H, W)`.

    Args:
        minutes (jax.Array): int32 minutes since 1970 of shape `(B,)`.
        lat (np.ndarray): Latitudes in degrees of shape `(H,)`.
        lon (np.ndarray): Longitudes in degrees of shape `(W,)`.
    """
    minutes = jnp.asarray(minutes, jnp.int32)
    start = _days_to_year_start(jnp.floor_divide(minutes, 1440)) * 1440
    # Whole days plus the fraction: exact whatever way XLA divides the (small) remainder.
    elapsed = minutes - start
    whole, rest = jnp.floor_divide(elapsed, 1440), jnp.remainder(elapsed, 1440)
    days = whole.astype(jnp.float32) + rest.astype(jnp.float32) / np.float32(1440)
    days = days[:, None, None]
    lat_rad = jnp.asarray(np.pi / 180.0 * np.asarray(lat, np.float32)[:, None], jnp.float32)
    lon_turns = jnp.asarray(np.asarray(lon, np.float32)[None, :] / np.float32(360))  # on the host

    lambda_m = _ECC * (1.0 + _BETA) * np.sin(_OM) + 2.0 * np.pi * (days - 80.5) / 365.0
    lambda_ = lambda_m + 2.0 * _ECC * jnp.sin(lambda_m - _OM)
    dec = jnp.arcsin(np.sin(_EPS) * jnp.sin(lambda_))
    h = 2 * np.pi * (days + lon_turns)  # float32, as the reference's (up to ~2300 rad)
    rho = (1.0 - _ECC**2.0) / (1.0 + _ECC * jnp.cos(lambda_ - _OM))
    diff = jnp.sin(lat_rad) * jnp.sin(dec) - jnp.cos(lat_rad) * jnp.cos(dec) * jnp.cos(h)
    return diff * rho**-2.0
