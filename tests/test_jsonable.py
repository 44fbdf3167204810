"""`aurora.jsonable`: the one helper behind dataset metadata and evaluation summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aurora.jsonable import jsonable


def test_whole_value_for_strict_json() -> None:
    value = {
        "path": Path("/a/b"),
        1: (np.float32(0.5), [np.int64(3), float("nan")]),
        "grid": np.array([[1.0, 2.0]]),
        "flags": (True, None, "x"),
    }
    out = jsonable(value)
    assert out == {
        "path": "/a/b",
        "1": [0.5, [3, None]],
        "grid": [[1.0, 2.0]],
        "flags": [True, None, "x"],
    }
    json.dumps(out, allow_nan=False)


def test_default_hook_sees_only_what_json_cannot_write() -> None:
    text = json.dumps(
        {"lat": np.array([90.0, -90.0]), "n": np.int32(2), "x": 1.5}, default=jsonable
    )
    assert json.loads(text) == {"lat": [90.0, -90.0], "n": 2, "x": 1.5}
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        json.dumps({"o": object()}, default=jsonable)
    with pytest.raises(TypeError, match="not JSON serialisable: set"):
        jsonable({"s": {1}})
