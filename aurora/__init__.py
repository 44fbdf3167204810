"""Aurora in Flax: the model only, no training code.

Public interface::

    from aurora import AuroraSmall, Aurora, Batch, Metadata, rollout
    params = model.init(rng, batch)["params"]
    pred = model.apply({"params": params}, batch)
"""

from aurora.batch import Batch, Metadata
from aurora.model.aurora import (
    PRESETS,
    Aurora,
    Aurora12hPretrained,
    AuroraHighRes,
    AuroraPretrained,
    AuroraSmall,
    AuroraSmallPretrained,
)
from aurora.rollout import rollout

__all__ = [
    "PRESETS",
    "Aurora",
    "Aurora12hPretrained",
    "AuroraHighRes",
    "AuroraPretrained",
    "AuroraSmall",
    "AuroraSmallPretrained",
    "Batch",
    "Metadata",
    "rollout",
]
