"""Absolute-time Fourier encoding computed exactly inside `jit`, without float64.

microsoft-aurora encodes the time `t` (hours since 1970, rounded to float32) as
`sin/cos(2π t / λ_j)` in float64, with wavelengths `λ_j` from 1 hour to a year. In float32 the
phase `t / λ_j` of a 2020 timestamp (~4·10⁵ h) would lose all of its fractional part, and we do
not want `JAX_ENABLE_X64`. The phase only matters modulo 1, so we compute it in 32-bit fixed
point: with `t` in integer minutes, `frac(t / (60 λ_j)) = Σ_k bit_k(t) · frac(2^k / (60 λ_j))`.
Each `frac(2^k / (60 λ_j))` is computed once on the host, exactly, with rational arithmetic and
stored as a uint32 (units of 2⁻³² turns); the sum wraps modulo 2³² in integer arithmetic, i.e.
exactly modulo one turn. The only rounding is the final conversion to a float32 angle (≈4·10⁻⁷ rad).
For whole-hour times this equals the reference's float64 result; for times that are not whole
hours the reference first rounds `t` to float32 hours, and we do not.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ABSOLUTE_TIME_RANGE_HOURS", "absolute_time_encoding", "minutes_encoding"]

ABSOLUTE_TIME_RANGE_HOURS = (1.0, 24 * 365.25)
"""Smallest and largest wavelength of the absolute-time encoding, as in microsoft-aurora."""

_BITS = 32


@lru_cache(maxsize=16)
def _phase_table(dim: int, lower: float, upper: float) -> np.ndarray:
    """`(32, dim // 2)` uint32: `2³² · frac(w_k / (60 λ_j))`, `λ_j` log-spaced in `[lower, upper]`.

    `w_k = 2^k` is the weight of bit k of an int32 (`-2³¹` for the sign bit).
    """
    wavelengths = np.logspace(
        np.log10(lower), np.log10(upper), dim // 2, base=10.0, dtype=np.float64
    )
    table = np.zeros((_BITS, dim // 2), dtype=np.uint32)
    for j, wavelength in enumerate(wavelengths):
        period_minutes = 60 * Fraction(float(wavelength))
        for k in range(_BITS):
            weight = -(2**k) if k == _BITS - 1 else 2**k  # two's complement sign bit
            turns = (Fraction(weight) / period_minutes) % 1
            table[k, j] = round(turns * 2**_BITS) % 2**_BITS
    return table


def absolute_time_encoding(minutes: jax.Array, dim: int) -> jax.Array:
    """`[sin(2πt/λ), cos(2πt/λ)]` for `dim // 2` wavelengths λ, exact phases in int32 arithmetic.

    Args:
        minutes (jax.Array): int32 minutes since 1970 of shape `(B,)`.
        dim (int): Encoding size, even.

    Returns:
        jax.Array: float32 encoding of shape `(B, dim)`.
    """
    return minutes_encoding(minutes, dim, *ABSOLUTE_TIME_RANGE_HOURS)


def minutes_encoding(minutes: jax.Array, dim: int, lower: float, upper: float) -> jax.Array:
    """`[sin(2πt/λ), cos(2πt/λ)]` of int32 minutes `t` for wavelengths λ in hours in
    `[lower, upper]`, with exact phases (any Fourier expansion of whole minutes, e.g. lead times).

    Args:
        minutes (jax.Array): int32 minutes of shape `(B,)`.
        dim (int): Encoding size, even.
        lower (float): Smallest wavelength in hours.
        upper (float): Largest wavelength in hours.

    Returns:
        jax.Array: float32 encoding of shape `(B, dim)`.
    """
    if dim % 2:
        raise ValueError("The dimensionality must be a multiple of two.")
    table = jnp.asarray(_phase_table(dim, float(lower), float(upper)))
    bits = jax.lax.bitcast_convert_type(jnp.asarray(minutes, jnp.int32), jnp.uint32)
    bits = (bits[:, None] >> jnp.arange(_BITS, dtype=jnp.uint32)) & jnp.uint32(1)  # (B, 32)
    phase = jnp.sum(bits[:, :, None] * table[None], axis=1, dtype=jnp.uint32)  # wraps mod 2^32
    # Centre on zero before converting, so the float32 rounding error is relative to |angle| <= π.
    signed = jax.lax.bitcast_convert_type(phase, jnp.int32).astype(jnp.float32)
    angle = signed * np.float32(2 * np.pi / 2**_BITS)
    return jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)
