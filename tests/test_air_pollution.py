"""microsoft-aurora's `level_condition` and `AuroraAirPollution`: parity on the reduced
architecture of tests/test_parity.py, checkpoint conversion, and the preset's hooks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from aurora.model.air_pollution import CAMS_ATMOS_VARS, CAMS_SURF_VARS
from aurora.normalisation import aurora_stats
from tests.reference.venv import case_dir
from tests.test_parity import TINY, _assert_close, _compare, _spec

# The batch's levels: 850 hPa is one where SO2 is clipped under LoRA.
LEVELS = (100, 500, 850)


def _air_pollution_spec(kwargs: dict[str, Any], *, steps: int = 3, **grid: Any) -> dict[str, Any]:
    """A rollout of `AuroraAirPollution` on pollutant fields drawn positive (the log transform's
    domain), with the two history steps the difference prediction indexes."""
    grid = {"h": 19, "w": 36, "levels": LEVELS, **grid}
    return _spec(
        "AuroraAirPollution",
        kwargs,
        steps=steps,
        positive_vars=[*CAMS_SURF_VARS, *CAMS_ATMOS_VARS],
        **grid,
    )


@pytest.mark.reference
def test_tiny_level_condition_matches_reference() -> None:
    """Per-level patch embeddings and heads; `level_condition` holds levels the batch lacks and
    orders them differently, so copies must be picked by level, not by position."""
    kwargs = {**TINY, "level_condition": [1000, 850, 500, 100, 50]}
    _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=3)))


@pytest.mark.reference
@pytest.mark.parametrize("use_lora", [False, True])
def test_tiny_air_pollution_matches_reference(use_lora: bool) -> None:
    """Feature combiners, difference prediction from history slices 0 and 1, `_mod` outputs
    dropped, positivity from step 2 and, under LoRA, SO2 clipped at 850 hPa; three steps."""
    spec = _air_pollution_spec({**TINY, "use_lora": use_lora})
    errors = _compare(spec)
    assert not any(name.endswith("_mod") for name in errors)
    assert {f"2/surf/{v}" for v in CAMS_SURF_VARS} <= set(errors)
    # The clip must bite for the test to cover it: SO2 at 850 hPa then peaks at its scale.
    with np.load(case_dir(spec) / "preds.npz") as ref:
        so2_850 = ref["0/atmos/so2"][:, :, LEVELS.index(850)].max()
    scale = aurora_stats()["so2_850"][1]
    assert np.isclose(so2_850, scale, rtol=1e-6) == use_lora, (so2_850, scale)
    _assert_close(errors)
