"""Aurora's per-variable normalisation statistics.

The model sees every variable as `(x - location) / scale`. The tables are microsoft-aurora's own
(`aurora/normalisation_stats.json`, taken from microsoft-aurora 2.0.1), keyed by variable name for
surface and static variables and by `"{name}_{level}"` for atmospheric variables. Variables outside
the tables (e.g. relative humidity `r`) need statistics from the dataset: pass them as `extra_stats`
(or `surf_stats` for surface variables, as microsoft-aurora does), otherwise a `KeyError` names the
missing entry.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

import numpy as np

__all__ = [
    "Stats",
    "atmos_location_scale",
    "aurora_stats",
    "level_to_str",
    "surf_location_scale",
]

Stats = Mapping[str, tuple[float, float]]
"""Mapping from a table key (`"2t"`, `"z_500"`, ...) to `(location, scale)`."""


@lru_cache(maxsize=1)
def aurora_stats() -> dict[str, tuple[float, float]]:
    """Aurora's table as `{key: (location, scale)}`."""
    text = resources.files("aurora").joinpath("normalisation_stats.json").read_text()
    table = json.loads(text)
    return {
        k: (float(table["locations"][k]), float(table["scales"][k])) for k in table["locations"]
    }


def level_to_str(level: float) -> str:
    """Pressure level as it appears in table keys: `500` -> `"500"`, `7.5` -> `"7_5"`."""
    level = round(float(level), 3)
    text = str(int(level)) if level % 1 == 0 else str(level)
    return text.replace(".", "_")


def _lookup(key: str, extra: Stats | None) -> tuple[float, float]:
    if extra and key in extra:
        location, scale = extra[key]
        return float(location), float(scale)
    table = aurora_stats()
    if key not in table:
        raise KeyError(
            f"No normalisation statistics for {key!r}: it is not in Aurora's table. "
            "Pass its (location, scale) from the dataset's statistics."
        )
    return table[key]


def surf_location_scale(name: str, extra: Stats | None = None) -> tuple[float, float]:
    """`(location, scale)` of a surface-level or static variable."""
    return _lookup(name, extra)


def atmos_location_scale(
    name: str, levels: Sequence[float], extra: Stats | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-level `(location, scale)` of an atmospheric variable.

    Args:
        name (str): Variable name, e.g. `"z"`.
        levels (Sequence[float]): The `C` pressure levels in hPa.
        extra (Stats, optional): Statistics overriding or extending Aurora's table.

    Returns:
        tuple[np.ndarray, np.ndarray]: float32 location and scale of shape `(C, 1, 1)`
        (broadcast over lat/lon).
    """
    pairs = [_lookup(f"{name}_{level_to_str(level)}", extra) for level in levels]
    location = np.array([p[0] for p in pairs], dtype=np.float32)[:, None, None]
    scale = np.array([p[1] for p in pairs], dtype=np.float32)[:, None, None]
    return location, scale
