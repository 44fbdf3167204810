"""Host-side ``sin``, ``cos`` and ``sqrt`` giving exactly the bits of PyTorch's CPU functions.

The position and scale encodings (`aurora.model.posencoding`, `aurora.model.fourier`) must match
microsoft-aurora to the last bit, and PyTorch's results depend on how it was built: with Intel MKL
(`aurora.model.mkl`) or without (SLEEF's sine, `aurora.model.sleef`, and the hardware square
root). :func:`sin_backend` picks ``"mkl"`` when an MKL runtime can be loaded, else ``"sleef"``
(with a one-time warning, as results then differ from an MKL-built PyTorch). MKL comes with the
optional ``parity`` extra (``pip install aurora-jax[parity]``), which ``make test`` installs; a
plain install uses SLEEF. The environment variable ``AURORA_SIN_BACKEND`` (``mkl`` or ``sleef``)
forces a choice.
"""

import os
import warnings

import numpy as np

from aurora.model.mkl import mkl_available, mkl_vml
from aurora.model.sleef import sleef_sin_f32

__all__ = ["cos_f64", "sin_backend", "sin_f32", "sin_f64", "sqrt_f32"]

_warned_fallback = False


def sin_backend() -> str:
    """The backend :func:`sin_f32` and :func:`sqrt_f32` use by default.

    Returns:
        str: ``AURORA_SIN_BACKEND`` when set, else `"mkl"` if an MKL runtime loads, else
            `"sleef"`.

    Raises:
        ValueError: If ``AURORA_SIN_BACKEND`` is set to something other than `mkl` or `sleef`.
    """
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
                "encoding and, through it, the outputs (GPU PyTorch differs as well). "
                "Install the `parity` extra (`pip install aurora-jax[parity]`, the `mkl` package) "
                "to match it bit for bit.",
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
    """``float64`` sine like PyTorch's ``torch.sin``: MKL with the MKL backend, else numpy.

    Args:
        x (np.ndarray): Angles in radians, converted to ``float64``.

    Returns:
        np.ndarray: ``sin(x)`` as ``float64`` with the shape of `x`.
    """
    if sin_backend() == "mkl":
        return mkl_vml("sin", x, np.float64)
    return np.sin(np.asarray(x, dtype=np.float64))


def cos_f64(x: np.ndarray) -> np.ndarray:
    """``float64`` cosine like PyTorch's ``torch.cos``: MKL with the MKL backend, else numpy.

    Args:
        x (np.ndarray): Angles in radians, converted to ``float64``.

    Returns:
        np.ndarray: ``cos(x)`` as ``float64`` with the shape of `x`.
    """
    if sin_backend() == "mkl":
        return mkl_vml("cos", x, np.float64)
    return np.cos(np.asarray(x, dtype=np.float64))
