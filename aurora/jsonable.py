"""Turn the numpy values, paths and tuples of metadata and provenance into what `json` writes.

One helper for every JSON file the project writes (dataset metadata, evaluation summaries), so
they spell numpy scalars, arrays and paths alike.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """`value` in plain Python types that `json.dumps` writes.

    Paths become strings, mappings dicts with string keys, tuples and lists lists (both walked
    through), numpy arrays nested lists, numpy scalars Python scalars, and a non-finite Python
    float None (strict JSON has no NaN). Use it on a whole value before
    ``json.dumps(..., allow_nan=False)``, or as ``json.dumps(..., default=jsonable)``, where it
    sees only what `json` cannot write itself.

    Args:
        value: the value to convert.

    Returns:
        The converted value.

    Raises:
        TypeError: for a value of any other type that `json` cannot write.
    """
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int)):
        return value
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
