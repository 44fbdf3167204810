"""The civil (proleptic Gregorian) calendar in integer arithmetic, traceable inside `jax.jit`.

Times are traced data in the model (a rollout step's time is not a compile-time constant), so
calendar fields are computed from days since 1970-01-01 with Howard Hinnant's
`civil_from_days` / `days_from_civil` algorithms: exact for every date, no tables, no floats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["civil_from_days", "days_from_civil"]

_EPOCH_SHIFT = 719468  # days from 0000-03-01 to 1970-01-01


def civil_from_days(days: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(year, month, day)` (month 1..12, day 1..31) of `days` since 1970-01-01."""
    z = days + _EPOCH_SHIFT
    era = jnp.floor_divide(z, 146097)
    doe = z - era * 146097  # day of the 400-year era
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)  # day of a year that starts on March 1st
    mp = (5 * doy + 2) // 153  # month counted from March
    day = doy - (153 * mp + 2) // 5 + 1
    month = jnp.where(mp < 10, mp + 3, mp - 9)
    year = yoe + era * 400 + (month <= 2)
    return year, month, day


def days_from_civil(year: jax.Array, month: jax.Array, day: jax.Array) -> jax.Array:
    """Days since 1970-01-01 of the date `year-month-day`."""
    y = year - (month <= 2)
    era = jnp.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * jnp.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - _EPOCH_SHIFT
