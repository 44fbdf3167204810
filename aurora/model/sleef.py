"""A numpy port of SLEEF's ``float32`` sine, bit for bit (what PyTorch built without MKL uses).

Aurora's scale encoding multiplies sines of latitudes by wavenumbers up to ~6e4 rad/km, so one
ULP in one sine visibly changes the model output, and numpy's ``np.sin`` differs from PyTorch's on
about one ``float32`` input in ten. PyTorch builds without Intel MKL take ``sin`` from SLEEF
(``Sleef_sinf16_u10`` with AVX-512, ``Sleef_sinf8_u10`` with AVX2); :func:`sleef_sin_f32`
re-implements that algorithm operation by operation. `aurora.model.trig` chooses between it and
MKL (`aurora.model.mkl`).

The algorithm (Cody-Waite reduction by pi in double-float arithmetic, a degree-7 odd polynomial
partly evaluated in double-float arithmetic, and the FMA flavour of SLEEF's double-float helpers
from ``df.h``) is due to Naoki Shibata and the SLEEF contributors, https://github.com/shibatch/sleef,
distributed under the Boost Software License 1.0. This is an independent numpy transcription.
"""

import numpy as np

__all__ = ["fma_f32", "sleef_sin_f32"]

_f32 = np.float32

# Cody-Waite split of pi into three float32 numbers (SLEEF's PI_A2f, PI_B2f, PI_C2f); PI_A2f and
# PI_B2f have trailing zero bits so that products with small integers are exact.
_PI_A = _f32(3.1414794921875)
_PI_B = _f32(0.00011315941810607910156)
_PI_C = _f32(1.9841872589410058936e-09)
_ONE_OVER_PI = _f32(0.318309886183790671537767526745028724)  # (float) M_1_PI
_FAST_PATH_LIMIT = _f32(125.0)  # SLEEF's TRIGRANGEMAX2f

# Coefficients of the odd minimax polynomial sin(t) ~ t * (1 + c3 t^2 + c5 t^4 + c7 t^6 + c9 t^8).
_C9 = _f32(2.6083159809786593541503e-06)
_C7 = _f32(-0.0001981069071916863322258)
_C5 = _f32(0.00833307858556509017944336)
_C3 = _f32(-0.166666597127914428710938)


def fma_f32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Correctly rounded ``float32`` fused multiply-add ``a * b + c`` (one rounding).

    The product of two ``float32`` values is exact in ``float64``. Adding ``c`` in ``float64``
    rounds once more, and rounding that to ``float32`` could then differ from a single rounding
    (double rounding). To avoid that we recover the exact error of the ``float64`` addition
    (Knuth's TwoSum) and turn the ``float64`` sum into its round-to-odd value, which is known to
    round to ``float32`` exactly like the exact sum does because ``float64`` has more than
    ``24 + 1`` bits of precision.

    Args:
        a (np.ndarray): First factor, ``float32``.
        b (np.ndarray): Second factor, ``float32``, broadcastable with `a`.
        c (np.ndarray): Addend, ``float32``, broadcastable with `a` and `b`.

    Returns:
        np.ndarray: ``a * b + c`` rounded once to ``float32``, with the broadcast shape.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)  # Exact.
    c = np.asarray(c, np.float64)
    s = p + c
    # TwoSum: `s + e == p + c` exactly.
    c_part = s - p
    e = (p - (s - c_part)) + (c - c_part)
    # Round to odd: if the sum was inexact and landed on an even significand, step one ULP
    # towards the exact value.
    bits = s.view(np.int64)
    inexact_even = (e != 0) & ((bits & 1) == 0)
    if np.any(inexact_even):
        away_from_zero = np.signbit(e) == np.signbit(s)
        step = np.where(away_from_zero, 1, -1).astype(np.int64)
        bits = np.where(inexact_even, bits + step, bits)
        s = bits.view(np.float64)
    return s.astype(np.float32)


# Double-float ("df") helpers: a value is represented as an unevaluated sum `hi + lo` of two
# float32 numbers. Each function mirrors the order of operations of the corresponding SLEEF
# helper exactly, since every intermediate rounding matters for bit-exactness.


def _two_sum_fast(x, y):
    """Sum of two floats as a df pair, assuming `|x| >= |y|` (SLEEF's dfadd_vf2_vf_vf)."""
    hi = x + y
    return hi, (x - hi) + y


def _two_sum(x, y):
    """Sum of two floats as a df pair without ordering assumption (SLEEF's dfadd2_vf2_vf_vf)."""
    hi = x + y
    v = hi - x
    return hi, (x - (hi - v)) + (y - v)


def _df_add_float(xh, xl, y):
    """df + float, `|xh| >= |y|` (SLEEF's dfadd_vf2_vf2_vf)."""
    hi = xh + y
    return hi, ((xh - hi) + y) + xl


def _float_add_df(x, yh, yl):
    """float + df, `|x| >= |yh|` (SLEEF's dfadd_vf2_vf_vf2)."""
    hi = x + yh
    return hi, ((x - hi) + yh) + yl


def _df_square(xh, xl):
    """Square of a df value (SLEEF's dfsqu_vf2_vf2, FMA variant)."""
    hi = xh * xh
    return hi, fma_f32(xh + xh, xl, fma_f32(xh, xh, -hi))


def _df_mul(xh, xl, yh, yl):
    """Product of two df values (SLEEF's dfmul_vf2_vf2_vf2, FMA variant)."""
    hi = xh * yh
    return hi, fma_f32(xh, yl, fma_f32(xl, yh, fma_f32(xh, yh, -hi)))


def _df_mul_to_float(xh, xl, yh, yl):
    """Product of two df values rounded to a single float (SLEEF's dfmul_vf_vf2_vf2, FMA)."""
    return fma_f32(xh, yh, fma_f32(xl, yh, xh * yl))


def sleef_sin_f32(x: np.ndarray) -> np.ndarray:
    """Sine in ``float32``, bit-identical to SLEEF's ``Sleef_sinf16_u10`` / ``Sleef_sinf8_u10``.

    Args:
        x (np.ndarray): Angles in radians. Converted to ``float32`` first. All values must be
            finite and satisfy ``|x| < 125``.

    Only SLEEF's fast path (taken when all lanes of a SIMD vector satisfy ``|x| < 125``) is
    implemented. SLEEF picks the path per vector, so its result for a small argument could in
    principle depend on a large argument sharing its vector; refusing large arguments sidesteps
    that. Aurora only needs latitudes in radians, ``|x| <= pi / 2``.

    Raises:
        ValueError: If any value is not finite or has magnitude ``>= 125``.

    Returns:
        np.ndarray: ``sin(x)`` as ``float32`` with the shape of `x`.
    """
    d = np.asarray(x, dtype=np.float32)
    shape = d.shape
    d = d.reshape(-1)
    if not np.all(np.abs(d) < _FAST_PATH_LIMIT):  # Also false for NaN.
        raise ValueError(
            "sleef_sin_f32 only reproduces SLEEF's fast path: all inputs must be finite with "
            f"|x| < {float(_FAST_PATH_LIMIT)}."
        )

    with np.errstate(all="ignore"):
        # Range reduction: d = q * pi + r with integer q and |r| <= pi / 2, where r is
        # obtained as a df pair (rh, rl) from a three-part Cody-Waite subtraction.
        q = np.rint(d * _ONE_OVER_PI)  # Round half to even, like vrint.
        r = fma_f32(q, -_PI_A, d)
        rh, rl = _two_sum(r, q * -_PI_B)
        rh, rl = _df_add_float(rh, rl, q * -_PI_C)

        # Polynomial in r^2: the high-order part in float32, the last two terms in df.
        sh, sl = _df_square(rh, rl)
        p = _C9
        p = fma_f32(p, sh, _C7)
        p = fma_f32(p, sh, _C5)
        ph, pl = _two_sum_fast(_C3, p * sh)
        ph, pl = _df_mul(ph, pl, sh, sl)
        ph, pl = _float_add_df(_f32(1.0), ph, pl)
        y = _df_mul_to_float(rh, rl, ph, pl)

        # sin(q * pi + r) = (-1)^q sin(r): flip the sign bit for odd q.
        odd = (q.astype(np.int32) & 1) == 1
        y = np.where(odd, -y, y)
        # SLEEF returns -0.0 for an input of -0.0.
        y = np.where((d == 0) & np.signbit(d), _f32(-0.0), y)

    return y.astype(np.float32, copy=False).reshape(shape)
