"""Aurora in Flax: the model only, no training code.

Public interface::

    from aurora import AuroraSmall, Aurora, Batch, Metadata, ModelStep, from_pretrained, rollout
    model, params = from_pretrained("AuroraPretrained")  # or model.init(rng, batch)["params"]
    pred = model.apply({"params": params}, batch)
    step = ModelStep(model)  # jitted once; reuse it for every rollout
    preds = list(rollout(step, params, batch, steps=4))
"""

from aurora.batch import Batch, Metadata
from aurora.model.air_pollution import AuroraAirPollution
from aurora.model.aurora import (
    Aurora,
    Aurora12hPretrained,
    AuroraHighRes,
    AuroraPretrained,
    AuroraSmall,
    AuroraSmallPretrained,
)
from aurora.model.presets import PRESETS
from aurora.model.v1p5 import AuroraV1p5, AuroraV1p5Ensemble
from aurora.model.wave import AuroraWave
from aurora.pretrained import from_pretrained
from aurora.rollout import ModelStep, rollout

__all__ = [
    "PRESETS",
    "Aurora",
    "Aurora12hPretrained",
    "AuroraAirPollution",
    "AuroraHighRes",
    "AuroraPretrained",
    "AuroraSmall",
    "AuroraSmallPretrained",
    "AuroraV1p5",
    "AuroraV1p5Ensemble",
    "AuroraWave",
    "Batch",
    "Metadata",
    "ModelStep",
    "from_pretrained",
    "rollout",
]
