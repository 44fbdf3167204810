"""Position and scale encodings of the patches of a latitude-longitude grid, on the host.

Reproduces microsoft-aurora's ``pos_scale_enc`` (1-D latitudes and longitudes, as its encoder
uses it) bit for bit. The ``float32`` part of the computation repeats PyTorch's CPU arithmetic
operation by operation:

* patch centres: ``F.avg_pool2d`` sums the window in ``float32``, one element after the other
  in row-major order, and divides the sum by the window size;
* patch bounds: ``max_pool2d`` of the grid, and of the negated grid for the minima;
* root areas: ``sqrt(6371**2 * pi * (sin(lat_max) - sin(lat_min)) * (lon_max - lon_min))`` with
  angles converted to radians, where PyTorch turns the Python constant ``6371**2 * pi`` into a
  ``float32`` before multiplying, and takes the ``float32`` sines and the square root from its
  vector math library (see :func:`aurora.model.trig.sin_f32` and
  :func:`aurora.model.trig.sqrt_f32`).

The Fourier expansions of the centres and root areas are then formed in ``float64`` by
:mod:`aurora.model.fourier`.
"""

import numpy as np

from aurora.model.fourier import pos_expansion, scale_expansion
from aurora.model.trig import sin_f32, sqrt_f32

__all__ = ["patch_root_area", "pos_scale_encoding"]

_f32 = np.float32
# PyTorch's `deg2rad` multiplies by the double nearest pi / 180, converted to the tensor's type.
_DEG_TO_RAD_F32 = _f32(0.017453292519943295769236907684886127134428718885417)
# `6371**2 * torch.pi` is a Python float; multiplying a float32 tensor by it rounds it to float32.
_EARTH_FACTOR_F32 = _f32(6371**2 * np.pi)


def _windows(grid: np.ndarray, p: int) -> np.ndarray:
    """View `(H, W)` as `(H // p, W // p, p, p)` windows, dropping rows and columns that do not
    fill a window (as pooling with kernel size and stride `p` does)."""
    h, w = grid.shape[0] // p, grid.shape[1] // p
    grid = grid[: h * p, : w * p]
    return grid.reshape(h, p, w, p).transpose(0, 2, 1, 3)


def _avg_pool(grid: np.ndarray, p: int) -> np.ndarray:
    """``F.avg_pool2d(grid, p)`` on the CPU in ``float32``."""
    windows = _windows(grid, p)
    total = np.zeros(windows.shape[:2], dtype=np.float32)
    for i in range(p):
        for j in range(p):
            total = total + windows[:, :, i, j]
    return total / _f32(p * p)


def _max_pool(grid: np.ndarray, p: int) -> np.ndarray:
    return _windows(grid, p).max(axis=(2, 3))


def _min_pool(grid: np.ndarray, p: int) -> np.ndarray:
    return -_max_pool(-grid, p)


def patch_root_area(
    lat_min: np.ndarray,
    lon_min: np.ndarray,
    lat_max: np.ndarray,
    lon_max: np.ndarray,
) -> np.ndarray:
    """Square root of the area in km^2 of latitude-longitude rectangles, in ``float32``.

    Args:
        lat_min (np.ndarray): Minimum latitudes in degrees.
        lon_min (np.ndarray): Minimum longitudes in degrees.
        lat_max (np.ndarray): Maximum latitudes in degrees.
        lon_max (np.ndarray): Maximum longitudes in degrees.

    Raises:
        ValueError: If a rectangle is empty or a coordinate is out of range (latitudes must lie
            in `[-90, 90]`, longitudes in `[0, 360]`).

    Returns:
        np.ndarray: ``float32`` square roots of the areas, in km.
    """
    lat_min, lon_min, lat_max, lon_max = (
        np.asarray(a, dtype=np.float32) for a in (lat_min, lon_min, lat_max, lon_max)
    )
    if not np.all(lat_max > lat_min):
        raise ValueError(
            f"Every patch must span latitudes: min(lat_max - lat_min) = "
            f"{np.min(lat_max - lat_min)}."
        )
    if not np.all(lon_max > lon_min):
        raise ValueError(
            f"Every patch must span longitudes: min(lon_max - lon_min) = "
            f"{np.min(lon_max - lon_min)}."
        )
    if not (np.all(np.abs(lat_max) <= 90) and np.all(np.abs(lat_min) <= 90)):
        raise ValueError("Latitudes must lie in [-90, 90].")
    if not (np.all(lon_max <= 360) and np.all(lon_min <= 360)):
        raise ValueError("Longitudes must not exceed 360.")
    if not (np.all(lon_max >= 0) and np.all(lon_min >= 0)):
        raise ValueError("Longitudes must be nonnegative.")

    sin_span = sin_f32(lat_max * _DEG_TO_RAD_F32) - sin_f32(lat_min * _DEG_TO_RAD_F32)
    lon_span = lon_max * _DEG_TO_RAD_F32 - lon_min * _DEG_TO_RAD_F32
    area = _EARTH_FACTOR_F32 * sin_span * lon_span  # Left to right, as in the reference.
    if not np.all(area > 0):
        raise ValueError("Every patch must have a positive area.")
    return sqrt_f32(area)


def pos_scale_encoding(
    lat: np.ndarray,
    lon: np.ndarray,
    patch_size: int,
    dim: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Position and scale encodings of the `patch_size` x `patch_size` patches of a grid.

    Patches are numbered row-major over `(H // patch_size, W // patch_size)`; trailing rows or
    columns that do not fill a patch are ignored, as in the reference. The encodings are computed
    from ``float32`` coordinates, like the reference encoder (which casts both to ``float32``).

    Args:
        lat (np.ndarray): Latitudes in degrees, a vector of length `H`.
        lon (np.ndarray): Longitudes in degrees, a vector of length `W`, in `[0, 360]` and
            strictly increasing (gaps are allowed).
        patch_size (int): Patch size `P` in grid points along both axes.
        dim (int): Encoding dimension `D`; must be a multiple of four.

    Raises:
        ValueError: If the inputs are not vectors, `dim` is not a multiple of four, a patch has no
            extent or lies outside the valid coordinate ranges, or a patch centre or size falls
            outside the range of its Fourier expansion.

    Returns:
        tuple[np.ndarray, np.ndarray]: ``float32`` position encoding and scale encoding, each of
            shape `(H // P * W // P, D)`. The first `D / 2` position channels encode the
            latitudes of the patch centres, the other `D / 2` their longitudes.
    """
    lat = np.asarray(lat, dtype=np.float32)
    lon = np.asarray(lon, dtype=np.float32)
    if lat.ndim != 1 or lon.ndim != 1:
        raise ValueError(
            f"Latitudes and longitudes must be vectors, but have {lat.ndim} and {lon.ndim} "
            "dimensions."
        )
    if dim % 4 != 0:
        raise ValueError(f"The encoding dimension must be a multiple of four, but is {dim}.")
    p = int(patch_size)
    if p < 1 or lat.size < p or lon.size < p:
        raise ValueError(f"Patch size {patch_size} does not fit a {lat.size} x {lon.size} grid.")

    lat_grid = np.broadcast_to(lat[:, None], (lat.size, lon.size))
    lon_grid = np.broadcast_to(lon[None, :], (lat.size, lon.size))

    centre_lat = _avg_pool(lat_grid, p).reshape(-1)
    centre_lon = _avg_pool(lon_grid, p).reshape(-1)
    root_area = patch_root_area(
        _min_pool(lat_grid, p),
        _min_pool(lon_grid, p),
        _max_pool(lat_grid, p),
        _max_pool(lon_grid, p),
    ).reshape(-1)

    pos = np.concatenate(
        (pos_expansion(centre_lat, dim // 2), pos_expansion(centre_lon, dim // 2)), axis=-1
    )
    scale = scale_expansion(root_area, dim)
    return pos, scale
