"""Aurora's pressure levels and default variable names, defined once.

The model, the checkpoint converter, the data downloaders, readers and builders, the configs and
the benchmarks all default to the variables and levels of the published Aurora checkpoints. They
import them from here so that the defaults cannot drift apart. Names are Aurora's short names
(ECMWF style); ``z`` is geopotential in both the static and the atmospheric sets (at the surface
and on pressure levels respectively).
"""

__all__ = ["ATMOS_VARS", "AURORA_LEVELS", "STATIC_VARS", "SURF_VARS"]

AURORA_LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
"""The 13 pressure levels (hPa) of the published checkpoints, top of the atmosphere first."""

SURF_VARS: tuple[str, ...] = ("2t", "10u", "10v", "msl")
"""Surface variables: 2 m temperature, 10 m wind components, mean sea-level pressure."""

STATIC_VARS: tuple[str, ...] = ("lsm", "z", "slt")
"""Static fields: land-sea mask, surface geopotential, soil type."""

ATMOS_VARS: tuple[str, ...] = ("z", "u", "v", "t", "q")
"""Atmospheric variables: geopotential, wind components, temperature, specific humidity."""
