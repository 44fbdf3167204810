"""Intel MKL's vector math (``vmsSin``, ``vmdCos``, ``vmsSqrt``, ...) called through ctypes.

PyTorch builds with MKL (the x86-64 wheels on PyPI) route ``sin``/``cos``/``sqrt`` of contiguous
``float32``/``float64`` CPU tensors to MKL's vector math library in high-accuracy mode. Its
algorithms are not public, so to reproduce PyTorch's results bit for bit we call the same functions,
with the same mode flags, from an MKL runtime (the ``mkl`` package on PyPI or conda). The
environment variable ``AURORA_MKL_RT`` names the library (``libmkl_rt.so.*``) to load.
"""

import ctypes
import functools
import glob
import os
import sys

import numpy as np

__all__ = ["mkl_available", "mkl_vml"]


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
    """Whether an Intel MKL runtime library can be loaded.

    Returns:
        bool: True when `mkl_vml` can be called.
    """
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
