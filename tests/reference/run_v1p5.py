"""run_reference.py with an Aurora-1.5-like batch and sub-step lead times, for `AuroraV1p5`.

Runs inside the reference virtualenv, like run_reference.py (same spec keys and outputs), which it
imports from beside itself. The `scaled_*` variables hold physical amounts, drawn in the
log-transformed space of their statistics and transformed back (so they are non-negative, with
exact zeros where the draw is negative, as dry points are); `insolation` is the prescribed one at
each history time. An optional spec key `fine_lead_times` is passed to `aurora.rollout`, whose
predictions are all written, sub-steps included. Usage: `run_v1p5.py SPEC.json OUT_DIR`.
"""

import functools
import json
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import run_reference
import torch

import aurora
from aurora.insolation import insolation
from aurora.normalisation import locations, log_untransform, scales

_reference_batch = run_reference.build_batch


def build_batch(spec, model):
    batch, arrays = _reference_batch(spec, model)
    rng = np.random.default_rng(spec["seed"] + 2)
    b, t = spec["batch"], spec["history"]
    lat, lon = arrays["lat"], arrays["lon"]
    for name in list(batch.surf_vars):
        if name.startswith("scaled_"):
            logs = locations[name] + scales[name] * rng.standard_normal(
                (b, t, *lat.shape, *lon.shape)
            )
            x = log_untransform(torch.from_numpy(np.maximum(logs, 0).astype(np.float32)))
        elif name == "insolation":
            last = datetime.fromisoformat(spec["time"])
            times = [last - (t - 1 - i) * timedelta(hours=6) for i in range(t)]
            sol = insolation(times, lat, lon, enforce_2d=True).astype(np.float32)
            x = torch.from_numpy(np.broadcast_to(sol, (b, t, *sol.shape[1:])).copy())
        else:
            continue
        batch.surf_vars[name] = x
        arrays[f"surf/{name}"] = x.numpy()
    return batch, arrays


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    run_reference.build_batch = build_batch  # `main` builds its batch through this name
    aurora.rollout = functools.partial(aurora.rollout, fine_lead_times=spec.get("fine_lead_times"))
    run_reference.main(sys.argv[1], sys.argv[2])
