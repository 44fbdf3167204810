"""WeatherBench2's conventions: variable names, the climatology's time keys, evaluation grids.

WB2 stores name variables by their long CDS names (``geopotential``, ``2m_temperature``); our
batches use ECMWF short names (``z``, ``2t``). A climatology is indexed by the valid time's
``dayofyear`` (1..366, as pandas counts it, so 1 March is day 61 in a leap year and day 60
otherwise) and ``hour``. Published WB2 scores are on global equiangular grids with both poles
(1.5°: 121 × 240, 0.25°: 721 × 1440), regridded conservatively.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import xarray as xr

from aurora.batch import Batch
from data_builders.builders import global_grid
from data_builders.regrid import regrid

__all__ = [
    "GRIDS",
    "WB2_NAMES",
    "day_and_hour",
    "evaluation_grid",
    "from_wb2",
    "regrid_batch",
    "to_wb2",
]

WB2_NAMES: Mapping[str, str] = {
    "2t": "2m_temperature",
    "10u": "10m_u_component_of_wind",
    "10v": "10m_v_component_of_wind",
    "msl": "mean_sea_level_pressure",
    "z": "geopotential",
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "q": "specific_humidity",
    "r": "relative_humidity",
    "w": "vertical_velocity",
}
"""WB2's long name of each ECMWF short name the model can forecast."""

_SHORT = {long: short for short, long in WB2_NAMES.items()}

GRIDS: Mapping[str, float] = {"1.5deg": 1.5, "0.25deg": 0.25, "5.625deg": 5.625}
"""Named evaluation grids (resolution in degrees; global, with poles, as WB2's stores)."""


def to_wb2(name: str) -> str:
    """WB2's long name of a short name (unknown names are kept)."""
    return WB2_NAMES.get(name, name)


def from_wb2(name: str) -> str:
    """The short name of a WB2 long name (short and unknown names are kept)."""
    return _SHORT.get(name, name)


def day_and_hour(seconds: int) -> tuple[int, int]:
    """The day of year (1..366) and hour of day of a time, as WB2 keys its climatology.

    Args:
        seconds: int seconds since 1970 (UTC).

    Returns:
        `(dayofyear, hour)`.
    """
    t = np.datetime64(int(seconds), "s")
    day = t.astype("datetime64[D]")
    doy = int((day - t.astype("datetime64[Y]").astype("datetime64[D]")).astype(np.int64)) + 1
    hour = int((t - day.astype("datetime64[s]")).astype(np.int64) // 3600)
    return doy, hour


def evaluation_grid(name: str, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of a named grid that the model's grid covers.

    The model's grid may lack rows (Aurora drops the south pole row so that its patches fit):
    a target row whose cell is not inside the model grid's latitudes cannot be regridded
    conservatively and is left out (for 0.25° Aurora at 1.5° that is the -90° row, whose area
    weight is 0.03 % of the globe).

    Args:
        name: a key of `GRIDS` or a resolution in degrees (``"2"``).
        lat: the model grid's latitudes, decreasing, evenly spaced.

    Returns:
        `(lat, lon)` of the evaluation grid, decreasing latitudes and longitudes from 0.

    Raises:
        ValueError: an unknown name.
    """
    try:
        res = GRIDS[name] if name in GRIDS else float(name.removesuffix("deg"))
    except ValueError:
        raise ValueError(
            f"Unknown evaluation grid {name!r}: use {sorted(GRIDS)} or degrees"
        ) from None
    lat_t, lon_t = global_grid(res)
    lat = np.asarray(lat, np.float64)
    half = abs(float(lat[0] - lat[1])) / 2 if lat.size > 1 else 0.0
    top, bottom = min(90.0, lat.max() + half), max(-90.0, lat.min() - half)
    upper = np.minimum(lat_t + res / 2, 90.0)
    lower = np.maximum(lat_t - res / 2, -90.0)
    keep = (upper <= top + 1e-6) & (lower >= bottom - 1e-6)
    return lat_t[keep], lon_t


def regrid_batch(batch: Batch, lat: np.ndarray, lon: np.ndarray) -> Batch:
    """A host copy of `batch` regridded conservatively (`data_builders.regrid`) to (lat, lon).

    Forecasts, truths, baselines and climatologies all go through this one function, so they
    are regridded the same way.

    Args:
        batch: variables of shape `(b, t, h, w)` / `(b, t, c, h, w)` on a canonical grid.
        lat: target latitudes, decreasing.
        lon: target longitudes, increasing in [0, 360).

    Returns:
        The batch on the target grid (float32), metadata's grid replaced.
    """
    meta = batch.metadata
    coords = {"latitude": np.asarray(meta.lat), "longitude": np.asarray(meta.lon)}
    data = {}
    for group, extra in (("surf", ()), ("atmos", ("level",))):
        for name, x in getattr(batch, f"{group}_vars").items():
            dims = ("b", "t", *extra, "latitude", "longitude")
            data[f"{group}/{name}"] = (dims, np.asarray(x, np.float32))
    out = regrid(xr.Dataset(data, coords=coords), lat, lon, "conservative")
    pick = lambda group: {
        k.split("/", 1)[1]: out[k].values for k in out.data_vars if k.startswith(f"{group}/")
    }
    return Batch(
        surf_vars=pick("surf"),
        static_vars={},
        atmos_vars=pick("atmos"),
        metadata=meta.replace(lat=np.asarray(lat), lon=np.asarray(lon)),
    )
