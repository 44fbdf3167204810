"""microsoft-aurora's `level_condition` and `AuroraAirPollution`: parity on the reduced
architecture of tests/test_parity.py, checkpoint conversion, and the preset's hooks."""

from __future__ import annotations

import pytest

from tests.test_parity import TINY, _assert_close, _compare, _spec


@pytest.mark.reference
def test_tiny_level_condition_matches_reference() -> None:
    """Per-level patch embeddings and heads; `level_condition` holds levels the batch lacks and
    orders them differently, so copies must be picked by level, not by position."""
    kwargs = {**TINY, "level_condition": [1000, 850, 500, 100, 50]}
    _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=3)))
