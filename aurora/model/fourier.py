"""Fourier-series style encodings of scalars, computed on the host with numpy.

These reproduce microsoft-aurora's `aurora.model.fourier` expansions number for number: every
encoding is formed in ``float64`` from the same wavelengths, built in the same order of floating
point operations as PyTorch builds them, and only the final result is rounded to ``float32``.

For an input ``x`` and ``n = d // 2`` wavelengths ``lambda_0 < ... < lambda_{n-1}`` spaced
logarithmically between ``lower`` and ``upper``, the encoding is

    [sin(2 pi x / lambda_0), ..., sin(2 pi x / lambda_{n-1}),
     cos(2 pi x / lambda_0), ..., cos(2 pi x / lambda_{n-1})].

Details that matter for bit-exactness with PyTorch:

* ``torch.logspace`` computes the first half of the exponents forwards from ``start`` and the
  second half backwards from ``end`` and raises 10 to them with the C library's ``pow``;
* ``2 * pi / w`` on a tensor is evaluated by PyTorch as ``reciprocal(w) * (2 * pi)``;
* ``sin``/``cos`` in ``float64``: PyTorch's x86 builds call Intel MKL's vector math library. We use
  the same library when it can be loaded (see :mod:`aurora.model.trig`) and numpy otherwise. The
  two differ in the last bit of about 0.1 % of ``float64`` results, which survives the rounding to
  ``float32`` only in the rare cases where a value sits almost exactly halfway between two
  ``float32`` numbers (none in 15 million samples).
"""

import functools
import math

import numpy as np

from aurora.model.trig import cos_f64, sin_f64

__all__ = [
    "Expansion",
    "absolute_time_expansion",
    "area",
    "fourier_expansion",
    "lead_time_expansion",
    "lead_time_expansion_v3",
    "levels_expansion",
    "pos_expansion",
    "radius_earth",
    "scale_expansion",
]

radius_earth = 6378137 / 1000
"""float: Radius of the earth in kilometres (the value microsoft-aurora uses for areas)."""

# Nearest double to pi / 180, the constant PyTorch's `deg2rad` multiplies by.
_DEG_TO_RAD = 0.017453292519943295769236907684886127134428718885417


def area(polygon: np.ndarray) -> np.ndarray:
    """Area in km^2 of polygons on the sphere given by `(lat, lon)` vertices in degrees.

    A ``float64`` numpy port of microsoft-aurora's ``aurora.area.area`` (itself a port of the
    PyPI package `area`), including its quirk of closing the loop by repeating the *last* vertex.

    Args:
        polygon (np.ndarray): Vertices of shape `(*b, n, 2)`, latitude first.

    Returns:
        np.ndarray: Areas of shape `b`.
    """
    polygon = np.asarray(polygon, dtype=np.float64)
    polygon = np.concatenate((polygon, polygon[..., -1:, :]), axis=-2)
    total = np.zeros(polygon.shape[:-2], dtype=np.float64)
    n = polygon.shape[-2]
    if n > 2:
        for i in range(n):
            lon_before = polygon[..., i, 1] * _DEG_TO_RAD
            lat_here = polygon[..., (i + 1) % n, 0] * _DEG_TO_RAD
            lon_after = polygon[..., (i + 2) % n, 1] * _DEG_TO_RAD
            total = total + (lon_after - lon_before) * sin_f64(lat_here)
    total = total * radius_earth * radius_earth / 2
    return np.abs(total)


@functools.lru_cache(maxsize=256)
def _wavenumbers(lower: float, upper: float, n: int) -> np.ndarray:
    """`2 pi / wavelength` for `n` log-spaced wavelengths, exactly as PyTorch computes them."""
    start, end = math.log10(lower), math.log10(upper)
    if n == 1:
        wavelengths = [math.pow(10.0, start)]
    else:
        step = (end - start) / (n - 1)
        half = n // 2
        # Like `torch.logspace` on the CPU: forwards from `start` for the first half, backwards
        # from `end` for the second half, and the C library's `pow` (which `math.pow` calls).
        exponents = [start + step * i if i < half else end - step * (n - i - 1) for i in range(n)]
        wavelengths = [math.pow(10.0, e) for e in exponents]
    wavenumbers = (1.0 / np.array(wavelengths, dtype=np.float64)) * (2 * np.pi)
    wavenumbers.setflags(write=False)
    return wavenumbers


def _check_range(x: np.ndarray, lower: float, upper: float) -> None:
    """Raise unless every element is zero or has magnitude within `[lower, upper]`.

    PyTorch compares a tensor with a Python number in the tensor's own floating point type (and
    in the default ``float32`` for integer tensors), so we do the same.
    """
    kind = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
    magnitude = np.abs(x.astype(kind, copy=False))
    ok = ((magnitude >= kind.type(lower)) & (magnitude <= kind.type(upper))) | (x == 0)
    if not np.all(ok):
        bad = x[~ok]
        raise ValueError(
            f"The input is not within the configured range [{lower}, {upper}] of the Fourier "
            f"expansion (zeros are allowed); offending values include {bad[:5].tolist()}."
        )


def fourier_expansion(
    x: np.ndarray,
    d: int,
    lower: float,
    upper: float,
    assert_range: bool = True,
) -> np.ndarray:
    """Expand `x` into `d` Fourier features with wavelengths from `lower` to `upper`.

    Args:
        x (np.ndarray): Values to encode, shape `(..., n)`. They are converted to ``float64``
            as given: pass ``float32`` values where the reference encodes a ``float32`` tensor.
        d (int): Output dimensionality; must be even. Half of it holds sines, half cosines.
        lower (float): Smallest wavelength.
        upper (float): Largest wavelength.
        assert_range (bool, optional): Check that every nonzero `|x|` lies in `[lower, upper]`.
            Defaults to `True`.

    Raises:
        ValueError: If `assert_range` is set and some value is out of range, or if `d` is odd.

    Returns:
        np.ndarray: ``float32`` encoding of shape `(..., n, d)`.
    """
    x = np.asarray(x)
    if assert_range:
        _check_range(x, lower, upper)
    if d % 2 != 0:
        raise ValueError(f"The dimensionality must be a multiple of two, but is {d}.")

    phase = x.astype(np.float64)[..., None] * _wavenumbers(float(lower), float(upper), d // 2)
    encoding = np.concatenate((sin_f64(phase), cos_f64(phase)), axis=-1)
    return encoding.astype(np.float32)


class Expansion:
    """A Fourier expansion with fixed wavelength range, called as `expansion(x, d)`.

    Attributes:
        lower (float): Smallest wavelength.
        upper (float): Largest wavelength.
        assert_range (bool): Whether inputs are checked against `[lower, upper]`.
        linear_last_sine (bool): Replace the sine of the largest wavelength (channel `d // 2 - 1`)
            by the linear feature `x / upper`, as microsoft-aurora's `FourierExpansionWithLinear`.
    """

    def __init__(
        self,
        lower: float,
        upper: float,
        assert_range: bool = True,
        linear_last_sine: bool = False,
    ) -> None:
        self.lower = lower
        self.upper = upper
        self.assert_range = assert_range
        self.linear_last_sine = linear_last_sine

    def __call__(self, x: np.ndarray, d: int) -> np.ndarray:
        x = np.asarray(x)
        encoding = fourier_expansion(x, d, self.lower, self.upper, self.assert_range)
        if self.linear_last_sine:
            # PyTorch divides in the tensor's own type (``float32`` for integer tensors).
            kind = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float32)
            linear = (x.astype(kind, copy=False) / kind.type(self.upper)).astype(np.float32)
            encoding[..., d // 2 - 1] = linear
        return encoding

    def __repr__(self) -> str:
        return (
            f"Expansion(lower={self.lower!r}, upper={self.upper!r}, "
            f"assert_range={self.assert_range!r}, linear_last_sine={self.linear_last_sine!r})"
        )


# The smallest patch the scale encoding must resolve: a 0.01 x 0.01 degree cell at the pole.
_delta = 0.01
_min_patch_area: float = area(
    np.array([[90, 0], [90, _delta], [90 - _delta, _delta], [90 - _delta, 0]], np.float64)
).item()
_area_earth = 4 * np.pi * radius_earth * radius_earth

pos_expansion = Expansion(_delta, 720)
"""Encoding of latitudes and longitudes in degrees."""

scale_expansion = Expansion(_min_patch_area, _area_earth)
"""Encoding of patch sizes (square roots of patch areas in km)."""

lead_time_expansion = Expansion(1 / 60, 24 * 7 * 3)
"""Encoding of lead times in hours."""

lead_time_expansion_v3 = Expansion(6, 24 * 7 * 3, assert_range=False, linear_last_sine=True)
"""Smoother lead time encoding of newer Aurora versions (`use_updated_lead_time_embedding`)."""

levels_expansion = Expansion(0.01, 1e5)
"""Encoding of pressure levels in hPa."""

absolute_time_expansion = Expansion(1, 24 * 365.25, assert_range=False)
"""Encoding of absolute times in hours."""
