"""What each data source calls Aurora's variables, and where the public stores are.

The CDS planner, the zarr mirror and the command line all take variable names, levels and hours
from here, so a name added once is understood everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from data_builders.errors import DataError

__all__ = [
    "ATMOS_VARIABLES",
    "DEFAULT_HOURS",
    "ERA5_LEVELS",
    "ERA5_PRESSURE",
    "ERA5_SINGLE",
    "STATIC_VARIABLES",
    "SURFACE_VARIABLES",
    "WB2_STORES",
    "SourceNames",
    "parse_hours",
]

# CDS dataset names of ERA5 surface (and static) fields and of ERA5 on pressure levels.
ERA5_SINGLE = "reanalysis-era5-single-levels"
ERA5_PRESSURE = "reanalysis-era5-pressure-levels"
# The 37 pressure levels (hPa) the CDS serves ERA5 on; a request for any other is refused.
ERA5_LEVELS = (
    1,
    2,
    3,
    5,
    7,
    10,
    20,
    30,
    50,
    70,
    100,
    125,
    150,
    175,
    200,
    225,
    250,
    300,
    350,
    400,
    450,
    500,
    550,
    600,
    650,
    700,
    750,
    775,
    800,
    825,
    850,
    875,
    900,
    925,
    950,
    975,
    1000,
)
DEFAULT_HOURS = (0, 6, 12, 18)  # Aurora's 6-hour step

# Public WeatherBench2 stores (0.25 deg, 13 levels, 6-hourly), over HTTPS so that only aiohttp is
# needed; the same objects are gs://weatherbench2/datasets/... for gcsfs users.
_WB2 = "https://storage.googleapis.com/weatherbench2/datasets"
WB2_ERA5_URL = f"{_WB2}/era5/1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr"
WB2_HRES_T0_URL = f"{_WB2}/hres_t0/2016-2022-6h-1440x721.zarr"
WB2_STORES = {"era5": WB2_ERA5_URL, "hres_t0": WB2_HRES_T0_URL}


@dataclass(frozen=True)
class SourceNames:
    """One variable as each source names it."""

    cds: str  # CDS API long name
    wb2: str  # WeatherBench2 zarr name
    short: tuple[str, ...]  # names it may carry inside a CDS netCDF file


SURFACE_VARIABLES = {
    "2t": SourceNames("2m_temperature", "2m_temperature", ("t2m", "2t")),
    "10u": SourceNames("10m_u_component_of_wind", "10m_u_component_of_wind", ("u10", "10u")),
    "10v": SourceNames("10m_v_component_of_wind", "10m_v_component_of_wind", ("v10", "10v")),
    "msl": SourceNames("mean_sea_level_pressure", "mean_sea_level_pressure", ("msl",)),
}
ATMOS_VARIABLES = {
    "z": SourceNames("geopotential", "geopotential", ("z",)),
    "u": SourceNames("u_component_of_wind", "u_component_of_wind", ("u",)),
    "v": SourceNames("v_component_of_wind", "v_component_of_wind", ("v",)),
    "t": SourceNames("temperature", "temperature", ("t",)),
    "q": SourceNames("specific_humidity", "specific_humidity", ("q",)),
    "r": SourceNames("relative_humidity", "relative_humidity", ("r",)),
    "w": SourceNames("vertical_velocity", "vertical_velocity", ("w",)),
}
STATIC_VARIABLES = {
    "lsm": SourceNames("land_sea_mask", "land_sea_mask", ("lsm",)),
    "z": SourceNames("geopotential", "geopotential_at_surface", ("z",)),
    "slt": SourceNames("soil_type", "soil_type", ("slt",)),
    "tvh": SourceNames("type_of_high_vegetation", "type_of_high_vegetation", ("tvh",)),
    "tvl": SourceNames("type_of_low_vegetation", "type_of_low_vegetation", ("tvl",)),
}


def parse_hours(hours: Sequence[int | str]) -> tuple[int, ...]:
    """Hours of day as given on the command line (``6``, ``"06"``, ``"06:00"``), validated.

    Args:
        hours: Hours of day, 0 to 23, as numbers or strings.

    Returns:
        The distinct hours, sorted.

    Raises:
        DataError: If an hour is not a number from 0 to 23.
    """
    out = []
    for h in hours:
        try:
            value = int(str(h).split(":")[0])
        except ValueError as e:
            raise DataError(f"bad hour {h!r}; use 0..23 (e.g. 00 06 12 18)") from e
        if not 0 <= value <= 23:
            raise DataError(f"bad hour {h!r}; use 0..23")
        out.append(value)
    return tuple(sorted(set(out)))
