"""microsoft-aurora's presets by name: what configs, `from_pretrained` and the converter CLI use.

Each preset is an `Aurora` subclass whose defaults are microsoft-aurora 2.0.1's. Presets with
mechanisms of their own live in their own modules (`aurora.model.v1p5`, ...), beside the five
plain ones in `aurora.model.aurora`.
"""

from __future__ import annotations

from aurora.model.air_pollution import AuroraAirPollution
from aurora.model.aurora import (
    Aurora,
    Aurora12hPretrained,
    AuroraHighRes,
    AuroraPretrained,
    AuroraSmallPretrained,
)
from aurora.model.v1p5 import AuroraV1p5, AuroraV1p5Ensemble
from aurora.model.wave import AuroraWave

__all__ = ["PRESETS"]

PRESETS: dict[str, type[Aurora]] = {
    "Aurora": Aurora,
    "AuroraPretrained": AuroraPretrained,
    "AuroraSmallPretrained": AuroraSmallPretrained,
    "AuroraSmall": AuroraSmallPretrained,
    "Aurora12hPretrained": Aurora12hPretrained,
    "AuroraHighRes": AuroraHighRes,
    "AuroraAirPollution": AuroraAirPollution,
    "AuroraV1p5": AuroraV1p5,
    "AuroraV1p5Ensemble": AuroraV1p5Ensemble,
    "AuroraWave": AuroraWave,
}
"""Preset classes by microsoft-aurora's names."""
