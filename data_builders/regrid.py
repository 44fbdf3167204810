"""Regridding between regular latitude/longitude grids.

Both methods are separable: a target field is `W_lat @ field @ W_lon.T` with two sparse weight
matrices. That keeps the code short, makes the weights easy to test, and costs two sparse products
per field even at 0.25 degrees.

* ``bilinear``: linear in latitude, linear in longitude. Longitude is periodic when the source grid
  goes all the way round the globe; a regional source (for example lon -70..40, stored as
  0..40, 290..350) is unwrapped into one contiguous window, so the gap is never interpolated across.
  Target points up to half a grid step outside the source (the poles for a grid without pole
  rows, such as WeatherBench's 5.625 degree grid) take the edge value; farther out is an error.
* ``conservative``: first-order area-conservative remapping. Each grid point stands for the cell
  between the midpoints to its neighbours (clipped at the poles); a target value is the
  area-weighted mean of the source cells it overlaps, with exact spherical areas
  (sin(lat) differences times longitude width). For an integer coarsening factor this is the
  cos-latitude weighted block mean, and the area-weighted global mean is preserved exactly.
  Every target cell must lie inside the source grid.

Grids are in the canonical form of `data_builders.readers`: latitude strictly decreasing,
longitude ascending in [0, 360).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.sparse as sp
import xarray as xr

from data_builders.errors import DataError

Method = Literal["bilinear", "conservative"]

_TOL = 1e-6

__all__ = ["Method", "Regridder", "regrid"]


def regrid(
    ds: xr.Dataset, lat: np.ndarray, lon: np.ndarray, method: Method = "bilinear"
) -> xr.Dataset:
    """Regrid every variable of `ds` that has latitude and longitude onto (lat, lon).

    Values are computed in float64 and stored as float32; NaNs propagate (readers have already
    refused or filled them). Variables without a horizontal grid are kept unchanged.
    """
    lat_t, lon_t = _check_target(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
    lat_s = np.asarray(ds["latitude"].values, np.float64)
    lon_s = np.asarray(ds["longitude"].values, np.float64)
    if method == "bilinear":
        w_lat, w_lon = _linear_lat(lat_s, lat_t), _linear_lon(lon_s, lon_t)
    elif method == "conservative":
        w_lat, w_lon = _conservative_lat(lat_s, lat_t), _conservative_lon(lon_s, lon_t)
    else:
        raise DataError(f"unknown regrid method {method!r}: use 'bilinear' or 'conservative'")
    out = {}
    for name, da in ds.data_vars.items():
        if "latitude" in da.dims and "longitude" in da.dims:
            out[name] = _apply(da, w_lat, w_lon, lat_t, lon_t)
        else:
            out[name] = da
    coords = {k: v for k, v in ds.coords.items() if not {"latitude", "longitude"} & set(v.dims)}
    coords.update(latitude=("latitude", lat_t), longitude=("longitude", lon_t))
    result = xr.Dataset(out, coords=coords, attrs=dict(ds.attrs))
    result["latitude"].attrs = dict(ds["latitude"].attrs)
    result["longitude"].attrs = dict(ds["longitude"].attrs)
    result.attrs["regrid"] = f"{method} from {len(lat_s)}x{len(lon_s)} to {len(lat_t)}x{len(lon_t)}"
    return result


class Regridder:
    """`regrid` with its weights computed once, applied to numpy arrays.

    Args:
        lat_src, lon_src: The source grid (canonical order), shapes `(h,)` and `(w,)`.
        lat, lon: The target grid (canonical order), shapes `(h',)` and `(w',)`.
        method: ``"bilinear"`` or ``"conservative"``.
    """

    def __init__(
        self,
        lat_src: np.ndarray,
        lon_src: np.ndarray,
        lat: np.ndarray,
        lon: np.ndarray,
        method: str = "bilinear",
    ) -> None:
        lat, lon = _check_target(np.asarray(lat, np.float64), np.asarray(lon, np.float64))
        lat_src, lon_src = np.asarray(lat_src, np.float64), np.asarray(lon_src, np.float64)
        if method == "bilinear":
            self.w_lat, self.w_lon = _linear_lat(lat_src, lat), _linear_lon(lon_src, lon)
        elif method == "conservative":
            self.w_lat = _conservative_lat(lat_src, lat)
            self.w_lon = _conservative_lon(lon_src, lon)
        else:
            raise DataError(f"unknown regrid method {method!r}: use 'bilinear' or 'conservative'")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Regrid the last two axes: `(..., h, w)` -> float32 `(..., h', w')`."""
        y = _apply_axis(self.w_lat, np.asarray(x, np.float64), x.ndim - 2)
        return _apply_axis(self.w_lon, y, y.ndim - 1).astype(np.float32)


def _check_target(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Refuse targets that are not in canonical order, so outputs are canonical too."""
    if lat.ndim != 1 or lon.ndim != 1 or lat.size == 0 or lon.size == 0:
        raise DataError("regrid target latitude/longitude must be non-empty 1-D arrays")
    if lat.size > 1 and not np.all(np.diff(lat) < 0):
        raise DataError("regrid target latitude must be strictly decreasing (90 -> -90)")
    if np.any(np.abs(lat) > 90 + _TOL):
        raise DataError("regrid target latitude must lie in [-90, 90]")
    if lon.size > 1 and not np.all(np.diff(lon) > 0):
        raise DataError("regrid target longitude must be strictly increasing")
    if np.any(lon < 0) or np.any(lon >= 360):
        raise DataError("regrid target longitude must lie in [0, 360)")
    return lat, lon


def _apply(
    da: xr.DataArray, w_lat: sp.csr_matrix, w_lon: sp.csr_matrix, lat: np.ndarray, lon: np.ndarray
) -> xr.DataArray:
    """Apply the two 1-D operators to the last two axes of one variable."""
    dims = da.dims
    lead = [d for d in dims if d not in ("latitude", "longitude")]
    x = da.transpose(*lead, "latitude", "longitude").values.astype(np.float64)
    y = _apply_axis(w_lat, x, x.ndim - 2)
    y = _apply_axis(w_lon, y, y.ndim - 1)
    coords = {d: da[d] for d in lead if d in da.coords}
    coords.update(latitude=lat, longitude=lon)
    res = xr.DataArray(y.astype(np.float32), dims=(*lead, "latitude", "longitude"), coords=coords)
    res.attrs = dict(da.attrs)
    return res.transpose(*dims)


def _apply_axis(w: sp.csr_matrix, x: np.ndarray, axis: int) -> np.ndarray:
    """Multiply `x` by the sparse matrix `w` along one axis."""
    moved = np.moveaxis(x, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    y = np.asarray(w @ flat).reshape((w.shape[0], *moved.shape[1:]))
    return np.moveaxis(y, 0, axis)


def _spacing(x: np.ndarray) -> float:
    """Typical grid step: the median spacing, robust to the gap of an unwrapped regional grid."""
    return float(np.median(np.abs(np.diff(np.sort(x))))) if x.size > 1 else 0.0


def _linear_matrix(src: np.ndarray, tgt: np.ndarray, cols: np.ndarray, n_src: int) -> sp.csr_matrix:
    """Weights of linear interpolation from increasing `src` (column indices `cols`) to `tgt`."""
    if src.size == 1:
        data, rows, cc = np.ones(tgt.size), np.arange(tgt.size), np.repeat(cols[:1], tgt.size)
        return sp.csr_matrix((data, (rows, cc)), shape=(tgt.size, n_src))
    j = np.clip(np.searchsorted(src, tgt, side="right") - 1, 0, src.size - 2)
    w1 = (tgt - src[j]) / (src[j + 1] - src[j])
    rows = np.concatenate([np.arange(tgt.size)] * 2)
    cc = np.concatenate([cols[j], cols[j + 1]])
    data = np.concatenate([1.0 - w1, w1])
    keep = data != 0.0  # exact nodes keep one weight, so regridding onto the same grid is exact
    return sp.csr_matrix((data[keep], (rows[keep], cc[keep])), shape=(tgt.size, n_src))


def _linear_lat(src: np.ndarray, tgt: np.ndarray) -> sp.csr_matrix:
    """Linear weights in latitude, with edge values up to half a step beyond the source."""
    order = np.argsort(src)
    s = src[order]
    half = _spacing(src) / 2
    if np.any(tgt < s[0] - half - _TOL) or np.any(tgt > s[-1] + half + _TOL):
        raise DataError(
            f"regrid: target latitudes {tgt.min():g}..{tgt.max():g} reach beyond the source "
            f"grid {s[0]:g}..{s[-1]:g} by more than half a grid step"
        )
    return _linear_matrix(s, np.clip(tgt, s[0], s[-1]), order, src.size)


def _lon_frame(lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Source longitudes as one increasing window: (column order, values, periodic?).

    A grid is periodic when no gap between neighbours (including the wrap from the last point
    back to the first) exceeds 1.5 grid steps. Otherwise the window starts after the largest gap.
    """
    wrapped = np.mod(lon, 360.0)
    order = np.argsort(wrapped)
    s = wrapped[order]
    if s.size == 1:
        return order, s, False
    gaps = np.diff(np.concatenate([s, [s[0] + 360.0]]))
    k = int(np.argmax(gaps))
    if gaps[k] < 1.5 * _spacing(s):
        return order, s, True
    start = (k + 1) % s.size
    order, s = np.roll(order, -start), np.roll(s, -start)
    s = np.where(s < s[0], s + 360.0, s)
    return order, s, False


def _into_window(t: np.ndarray, start: float) -> np.ndarray:
    """Shift longitudes by multiples of 360 into [start, start + 360)."""
    return start + np.mod(t - start, 360.0)


def _linear_lon(src: np.ndarray, tgt: np.ndarray) -> sp.csr_matrix:
    """Linear weights in longitude: periodic for global grids, windowed for regional ones."""
    order, s, periodic = _lon_frame(src)
    if periodic:
        ext = np.concatenate([[s[-1] - 360.0], s, [s[0] + 360.0]])
        cols = np.concatenate([[order[-1]], order, [order[0]]])
        return _linear_matrix(ext, _into_window(tgt, s[0]), cols, src.size)
    half = _spacing(s) / 2
    t = _into_window(tgt, s[0] - half - _TOL)
    if np.any(t > s[-1] + half + _TOL):
        raise DataError(
            f"regrid: target longitudes fall outside the regional source grid "
            f"{s[0] % 360:g}..{s[-1] % 360:g} (east)"
        )
    return _linear_matrix(s, np.clip(t, s[0], s[-1]), order, src.size)


def _regular_step(x: np.ndarray, what: str) -> float:
    """Grid step of a regular axis; conservative weights need one to define cells."""
    if x.size < 2:
        raise DataError(f"conservative regrid needs at least 2 {what} points")
    d = np.abs(np.diff(x))
    step = float(np.median(d))
    if np.any(np.abs(d - step) > 1e-4 * step):
        raise DataError(
            f"conservative regrid needs a regular {what} grid (steps {d.min():g}..{d.max():g})"
        )
    return step


def _overlap(lo_t, hi_t, lo_s, hi_s) -> np.ndarray:
    """Length of the overlap of every target interval with every source interval."""
    return np.clip(
        np.minimum(hi_t[:, None], hi_s[None, :]) - np.maximum(lo_t[:, None], lo_s[None, :]),
        0.0,
        None,
    )


def _normalised(overlap: np.ndarray, size: np.ndarray, cols: np.ndarray, n_src: int, what: str):
    """Row-normalise overlaps into averaging weights, refusing target cells not fully covered."""
    covered = overlap.sum(axis=1)
    bad = covered < size * (1 - 1e-6)
    if np.any(bad):
        raise DataError(
            f"conservative regrid: {int(bad.sum())} target {what} cells lie outside the source grid"
        )
    w = overlap / covered[:, None]
    rows, j = np.nonzero(w)
    return sp.csr_matrix((w[rows, j], (rows, cols[j])), shape=(w.shape[0], n_src))


def _lat_cells(lat: np.ndarray, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell edges in sin(latitude): the exact area measure of a latitude band."""
    lo = np.deg2rad(np.clip(lat - step / 2, -90.0, 90.0))
    hi = np.deg2rad(np.clip(lat + step / 2, -90.0, 90.0))
    return np.sin(lo), np.sin(hi)


def _conservative_lat(src: np.ndarray, tgt: np.ndarray) -> sp.csr_matrix:
    """Area weights in latitude (sin-latitude overlaps)."""
    lo_s, hi_s = _lat_cells(src, _regular_step(src, "source latitude"))
    lo_t, hi_t = _lat_cells(tgt, _regular_step(tgt, "target latitude"))
    ov = _overlap(lo_t, hi_t, lo_s, hi_s)
    return _normalised(ov, hi_t - lo_t, np.arange(src.size), src.size, "latitude")


def _conservative_lon(src: np.ndarray, tgt: np.ndarray) -> sp.csr_matrix:
    """Length weights in longitude, periodic for global grids."""
    order, s, periodic = _lon_frame(src)
    ds_, dt = _regular_step(s, "source longitude"), _regular_step(tgt, "target longitude")
    lo_s, hi_s = s - ds_ / 2, s + ds_ / 2
    t = _into_window(tgt, s[0] - ds_ / 2)
    lo_t, hi_t = t - dt / 2, t + dt / 2
    shifts = (-360.0, 0.0, 360.0) if periodic else (0.0,)
    ov = sum(_overlap(lo_t, hi_t, lo_s + k, hi_s + k) for k in shifts)
    return _normalised(ov, hi_t - lo_t, order, src.size, "longitude")
