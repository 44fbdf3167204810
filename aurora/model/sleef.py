"""Host-side ``sin`` (and ``sqrt``) giving exactly the bits of PyTorch's CPU ``torch.sin``.

Aurora's scale encoding multiplies the patch root areas, which are computed from ``float32``
sines of latitudes, by wavenumbers up to ~6e4 rad/km, so a 1-ULP difference in one sine visibly
changes the model output. numpy's ``np.sin`` differs from PyTorch's in roughly one in ten
``float32`` inputs, so this module provides ``float32`` sines that reproduce PyTorch's.

Which library PyTorch uses depends on how it was built:

* PyTorch builds with Intel MKL (the x86-64 wheels on PyPI, e.g. torch 2.14.1 on Linux) route
  ``sin``/``cos`` of contiguous ``float32``/``float64`` tensors to MKL's vector math library
  (``vmsSin``/``vmdSin`` with ``VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE``). Its algorithm is
  not public; we call the same functions from an MKL runtime library (the ``mkl`` package on
  PyPI) through ctypes. Checked: MKL 2024.2.2 and 2026.2.0 from PyPI both give bit-identical
  results to torch 2.14.1 on 14 million ``float32`` inputs, with the AVX-512 and AVX2 kernels.
* PyTorch builds without MKL use SLEEF (``Sleef_sinf16_u10`` with AVX-512, ``Sleef_sinf8_u10``
  with AVX2). :func:`sleef_sin_f32` re-implements that algorithm operation by operation in numpy;
  it is bit-identical to the SLEEF functions shipped inside torch 2.14.1 on 14 million inputs.
  SLEEF and MKL disagree by 1 ULP on about 2 % of inputs in ``[-pi/2, pi/2]``.
* ``torch.sqrt`` goes the same way: MKL's ``vmsSqrt`` (not correctly rounded; it differs from
  ``np.sqrt`` on about a quarter of inputs) or else the hardware instruction (= ``np.sqrt``).
  See :func:`sqrt_f32`.

:func:`sin_f32` picks the backend: ``"mkl"`` when an MKL runtime can be loaded, else ``"sleef"``
(with a one-time warning, as the result then differs from an MKL-built PyTorch). The environment
variable ``AURORA_SIN_BACKEND`` (``mkl`` or ``sleef``) forces a choice, and ``AURORA_MKL_RT``
names the MKL runtime library (``libmkl_rt.so.*``) to load.

The SLEEF algorithm (Cody-Waite reduction by pi carried out in double-float arithmetic, a
degree-7 odd polynomial partly evaluated in double-float arithmetic, and the FMA flavour of
SLEEF's double-float helpers from ``df.h``) is due to Naoki Shibata and the SLEEF contributors,
https://github.com/shibatch/sleef, distributed under the Boost Software License 1.0. This is an
independent numpy transcription of that algorithm.
"""

import ctypes
import functools
import glob
import os
import sys
import warnings

import numpy as np

__all__ = [
    "cos_f64",
    "fma_f32",
    "mkl_available",
    "mkl_vml",
    "sin_backend",
    "sin_f32",
    "sin_f64",
    "sleef_sin_f32",
    "sqrt_f32",
]

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


# --- Intel MKL vector math (what MKL-built PyTorch calls) ---------------------------------------

# Mode flags PyTorch passes (aten/src/ATen/cpu/vml.h): VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
_VML_MODE = 0x00000002 | 0x00140000 | 0x00000100
_MKL_THREADING_SEQUENTIAL = 1
_MKL_INTERFACE_LP64 = 0
_VML_FUNCTIONS = {
    ("sin", np.float32): "vmsSin",
    ("cos", np.float32): "vmsCos",
    ("sqrt", np.float32): "vmsSqrt",
    ("sin", np.float64): "vmdSin",
    ("cos", np.float64): "vmdCos",
    ("sqrt", np.float64): "vmdSqrt",
}


def _mkl_candidates() -> list[str]:
    """`AURORA_MKL_RT` if set, else MKL runtimes in this environment's `lib` folder (where the
    `mkl` package from PyPI or conda puts them)."""
    explicit = os.environ.get("AURORA_MKL_RT")
    if explicit:
        return [explicit]
    found = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        lib = os.path.join(prefix, "lib")
        # libmkl_rt loads the other MKL libraries on first use and ends the process when they
        # are missing, so only take it when they are next to it.
        if glob.glob(os.path.join(lib, "libmkl_core.so*")) and glob.glob(
            os.path.join(lib, "libmkl_sequential.so*")
        ):
            found += sorted(glob.glob(os.path.join(lib, "libmkl_rt.so*")), reverse=True)
    return found


@functools.lru_cache(maxsize=1)
def _load_mkl() -> ctypes.CDLL | None:
    """Load MKL's single dynamic library, or return `None` if there is none."""
    for candidate in _mkl_candidates():
        try:
            lib = ctypes.CDLL(candidate)
            # Must come before any computational call. The sequential layer needs no OpenMP
            # runtime, and elementwise results do not depend on threading.
            lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
            lib.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
            lib.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
            lib.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64)
            for name in _VML_FUNCTIONS.values():
                fn = getattr(lib, name)
                fn.argtypes = [ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                fn.restype = None
            return lib
        except (OSError, AttributeError):
            continue
    return None


def mkl_available() -> bool:
    """Whether an Intel MKL runtime library could be loaded."""
    return _load_mkl() is not None


def mkl_vml(op: str, x: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    """Evaluate MKL's vector `sin`, `cos` or `sqrt` on `x` exactly as MKL-built PyTorch does.

    Args:
        op (str): `"sin"`, `"cos"` or `"sqrt"`.
        x (np.ndarray): Input, converted to `dtype`.
        dtype (type, optional): `np.float32` or `np.float64`. Defaults to `np.float32`.

    Raises:
        RuntimeError: If no MKL runtime library can be loaded.

    Returns:
        np.ndarray: Result of type `dtype` with the shape of `x`.
    """
    lib = _load_mkl()
    if lib is None:
        raise RuntimeError(
            "Intel MKL's runtime library (libmkl_rt) was not found: install the `mkl` package "
            "from PyPI or point AURORA_MKL_RT at libmkl_rt.so."
        )
    fn = getattr(lib, _VML_FUNCTIONS[(op, dtype)])
    src = np.ascontiguousarray(x, dtype=dtype)
    out = np.empty_like(src)
    flat_in, flat_out = src.reshape(-1), out.reshape(-1)
    chunk = 2**30  # `n` is a 32-bit MKL_INT.
    for begin in range(0, flat_in.size, chunk):
        part_in, part_out = flat_in[begin : begin + chunk], flat_out[begin : begin + chunk]
        fn(part_in.size, part_in.ctypes.data, part_out.ctypes.data, _VML_MODE)
    return out


_warned_fallback = False


def sin_backend() -> str:
    """The backend :func:`sin_f32` uses by default: `"mkl"` if available, else `"sleef"`."""
    forced = os.environ.get("AURORA_SIN_BACKEND", "").strip().lower()
    if forced:
        if forced not in ("mkl", "sleef"):
            raise ValueError(f"AURORA_SIN_BACKEND must be `mkl` or `sleef`, not {forced!r}.")
        return forced
    return "mkl" if mkl_available() else "sleef"


def sin_f32(x: np.ndarray, backend: str | None = None) -> np.ndarray:
    """``float32`` sine, bit-identical to PyTorch's CPU ``torch.sin`` on ``float32`` tensors.

    Args:
        x (np.ndarray): Angles in radians, converted to ``float32``.
        backend (str, optional): `"mkl"` (MKL-built PyTorch, e.g. the x86-64 PyPI wheels) or
            `"sleef"` (PyTorch built without MKL). Defaults to :func:`sin_backend`, which
            prefers MKL and warns once when it has to fall back to SLEEF.

    Returns:
        np.ndarray: ``sin(x)`` as ``float32`` with the shape of `x`.
    """
    global _warned_fallback
    if backend is None:
        backend = sin_backend()
        if backend == "sleef" and not _warned_fallback and "AURORA_SIN_BACKEND" not in os.environ:
            _warned_fallback = True
            warnings.warn(
                "Intel MKL was not found, so float32 sin and sqrt follow PyTorch built without "
                "MKL (SLEEF, hardware sqrt). MKL-built PyTorch (the x86-64 wheels) differs by 1 "
                "ULP on ~2 % of sines and ~25 % of square roots, which changes Aurora's scale "
                "encoding. Install the `mkl` package from PyPI to match it.",
                stacklevel=2,
            )
    if backend == "mkl":
        return mkl_vml("sin", x, np.float32)
    if backend == "sleef":
        return sleef_sin_f32(x)
    raise ValueError(f"Unknown backend {backend!r}; use `mkl` or `sleef`.")


def sqrt_f32(x: np.ndarray, backend: str | None = None) -> np.ndarray:
    """``float32`` square root, bit-identical to PyTorch's CPU ``torch.sqrt``.

    MKL's ``vmsSqrt`` in the high-accuracy mode PyTorch uses is *not* correctly rounded (errors up
    to ~0.65 ULP), so it differs from ``np.sqrt`` on about a quarter of the inputs. PyTorch built
    without MKL uses the correctly rounded hardware instruction, like ``np.sqrt``.

    Args:
        x (np.ndarray): Nonnegative input, converted to ``float32``.
        backend (str, optional): As for :func:`sin_f32`. Defaults to :func:`sin_backend`.

    Returns:
        np.ndarray: ``sqrt(x)`` as ``float32`` with the shape of `x`.
    """
    backend = backend or sin_backend()
    if backend == "mkl":
        return mkl_vml("sqrt", x, np.float32)
    if backend == "sleef":
        return np.sqrt(np.asarray(x, dtype=np.float32))
    raise ValueError(f"Unknown backend {backend!r}; use `mkl` or `sleef`.")


def sin_f64(x: np.ndarray) -> np.ndarray:
    """``float64`` sine like PyTorch's ``torch.sin``: MKL with the MKL backend, else numpy."""
    if sin_backend() == "mkl":
        return mkl_vml("sin", x, np.float64)
    return np.sin(np.asarray(x, dtype=np.float64))


def cos_f64(x: np.ndarray) -> np.ndarray:
    """``float64`` cosine like PyTorch's ``torch.cos``: MKL with the MKL backend, else numpy."""
    if sin_backend() == "mkl":
        return mkl_vml("cos", x, np.float64)
    return np.cos(np.asarray(x, dtype=np.float64))
