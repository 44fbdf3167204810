"""run_reference.py with an HRES-WAM-like batch, for microsoft-aurora's `AuroraWave`.

Runs inside the reference virtualenv, like run_reference.py (same spec keys and outputs), which it
imports from beside itself. Wave fields are NaN over land, wave systems are absent (height 0) at
some ocean points, directions are degrees in [0, 360), and the wind comes as speed `wind` and
direction `dwi`, so that every mask of the preset's hooks is exercised. Also writes
`direction_norms.npz` (`{step}/NAME`): the length of each predicted (sine, cosine) pair.
Usage: `run_wave.py SPEC.json OUT_DIR`.
"""

import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import run_reference
import torch

import aurora
from aurora.normalisation import level_to_str, locations, scales

HEIGHTS = {"swh": 0.1, "shww": 0.2, "shts": 0.1, "swh1": 0.2, "swh2": 0.4}  # share absent
PERIODS = ("mwp", "pp1d", "mpww", "mpts", "mwp1", "mwp2")
DIRECTIONS = ("mwd", "mdww", "mdts", "mwd1", "mwd2", "dwi")


def build_batch(spec, model):
    rng = np.random.default_rng(spec["seed"] + 1)
    b, t, h, w, levels = spec["batch"], spec["history"], spec["h"], spec["w"], spec["levels"]
    lat = np.linspace(90, -90, h).astype(np.float32)
    lon = np.linspace(0, 360, w, endpoint=False).astype(np.float32)
    land = np.sin(np.deg2rad(3 * lon))[None] * np.cos(np.deg2rad(2 * lat))[:, None] > 0.4

    def field(key, shape):
        return (locations[key] + scales[key] * rng.standard_normal(shape)).astype(np.float32)

    def ocean(x):
        return np.where(land, np.nan, x).astype(np.float32)

    shape = (b, t, h, w)
    surf = {v: field(v, shape) for v in ("2t", "10u", "10v", "msl")}
    for name, absent in HEIGHTS.items():
        x = locations[name] * np.exp(0.4 * rng.standard_normal(shape))
        surf[name] = ocean(np.where(rng.random(shape) < absent, 0.0, x))
    for name in PERIODS:
        surf[name] = ocean(np.maximum(field(name, shape), 1.0))
    for name in DIRECTIONS:
        surf[name] = ocean(rng.uniform(0, 360, shape))
    surf["wind"] = ocean(np.abs(field("wind", shape)))
    static = {
        "lsm": land.astype(np.float32),
        "z": field("z", (h, w)),
        "slt": np.where(land, rng.integers(1, 8, (h, w)), 0).astype(np.float32),
        "wmb": np.where(land, 0.0, rng.uniform(0.05, 1.0, (h, w))).astype(np.float32),
        "lat_mask": np.broadcast_to(np.abs(lat)[:, None] <= 80, (h, w)).astype(np.float32),
    }
    atmos = {}
    for v in spec.get("atmos_vars", model.atmos_vars):
        per_level = [field(f"{v}_{level_to_str(lv)}", (b, t, 1, h, w)) for lv in levels]
        atmos[v] = np.concatenate(per_level, axis=2)
    batch = aurora.Batch(
        surf_vars={k: torch.from_numpy(v) for k, v in surf.items()},
        static_vars={k: torch.from_numpy(v) for k, v in static.items()},
        atmos_vars={k: torch.from_numpy(v) for k, v in atmos.items()},
        metadata=aurora.Metadata(
            lat=torch.from_numpy(lat),
            lon=torch.from_numpy(lon),
            time=(datetime.fromisoformat(spec["time"]),) * b,
            atmos_levels=tuple(levels),
        ),
    )
    arrays = {f"surf/{k}": v for k, v in surf.items()}
    arrays |= {f"static/{k}": v for k, v in static.items()}
    arrays |= {f"atmos/{k}": v for k, v in atmos.items()}
    arrays |= {"lat": lat, "lon": lon}
    return batch, arrays


def recording_directions(norms):
    """`AuroraWave._post_decoder_hook` that first appends the length of each predicted
    (sine, cosine) pair to `norms`: how well `atan2` conditions the direction at each point."""
    hook = aurora.AuroraWave._post_decoder_hook

    def recorded(self, batch, pred):
        norms.append(
            {
                name: torch.hypot(pred.surf_vars[f"{name}_sin"], pred.surf_vars[f"{name}_cos"])
                for name in self.angle_surf_vars
                if f"{name}_sin" in pred.surf_vars
            }
        )
        return hook(self, batch, pred)

    return recorded


if __name__ == "__main__":
    run_reference.build_batch = build_batch  # `main` builds its batch through this name
    norms = []
    aurora.AuroraWave._post_decoder_hook = recording_directions(norms)
    run_reference.main(sys.argv[1], sys.argv[2])
    steps = {f"{i}/{k}": v.numpy() for i, step in enumerate(norms) for k, v in step.items()}
    np.savez(Path(sys.argv[2]) / "direction_norms.npz", **steps)
