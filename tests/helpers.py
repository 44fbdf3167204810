"""Small shared builders for tests: tiny models and random batches with Aurora's statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

import aurora
from aurora.batch import Batch, Metadata
from aurora.normalisation import atmos_location_scale, surf_location_scale

TINY_KWARGS: dict[str, Any] = dict(
    encoder_depths=(1, 2),
    encoder_num_heads=(2, 4),
    decoder_depths=(2, 1),
    decoder_num_heads=(4, 2),
    embed_dim=32,
    num_heads=4,
    window_size=(2, 2, 4),
)


def tiny_model(**overrides: Any) -> aurora.Aurora:
    """Same code paths as the real model, a few hundred thousand parameters."""
    return aurora.Aurora(**{**TINY_KWARGS, "use_lora": False, **overrides})


def random_batch(
    model: aurora.Aurora,
    *,
    batch: int = 1,
    history: int = 2,
    h: int = 16,
    w: int = 32,
    levels: tuple[float, ...] = (100, 500, 850),
    time: str = "2020-06-01T12:00",
    seed: int = 0,
) -> Batch:
    """Physically scaled random fields (normalised values ~ N(0, 1)) on a global regular grid."""
    rng = np.random.default_rng(seed)

    def surf(name: str, shape: tuple[int, ...]) -> np.ndarray:
        location, scale = surf_location_scale(name)
        return (location + scale * rng.standard_normal(shape)).astype(np.float32)

    def atmos(name: str) -> np.ndarray:
        location, scale = atmos_location_scale(name, levels)
        return (location + scale * rng.standard_normal((batch, history, len(levels), h, w))).astype(
            np.float32
        )

    return Batch(
        surf_vars={v: surf(v, (batch, history, h, w)) for v in model.surf_vars},
        static_vars={v: surf(v, (h, w)) for v in model.static_vars},
        atmos_vars={v: atmos(v) for v in model.atmos_vars},
        metadata=Metadata(
            lat=np.linspace(90, -90, h + 1)[:-1]
            if h % model.patch_size == 0
            else np.linspace(90, -90, h),
            lon=np.linspace(0, 360, w, endpoint=False),
            time=(np.datetime64(time),) * batch,
            atmos_levels=levels,
        ),
    )


ROOT = Path(__file__).resolve().parents[1]


def run_main(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run `main.py` as a user would (no PYTHONPATH, no simulated devices); fail on a non-zero exit.

    Args:
        *args: Its command-line flags.
        cwd: The working directory.

    Returns:
        The finished process, with stdout and stderr as text.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result
