"""The one exception type for bad input data.

Every problem found while reading or regridding data raises `DataError`, with a message that names
the file and the variable. A single type lets callers (builders, CLI) catch data problems without
also swallowing programming errors; subclassing `ValueError` keeps `except ValueError` working.
"""

from __future__ import annotations


class DataError(ValueError):
    """Input data that cannot be turned into the canonical form (see `data_builders.readers`)."""
