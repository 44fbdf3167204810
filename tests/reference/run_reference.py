"""Run microsoft-aurora on one test case and write everything the JAX side needs to compare.

Runs inside the reference virtualenv (tests/reference/venv.py) (never imports our project).
Usage: `run_reference.py SPEC.json OUT_DIR`.

Spec keys: `preset` (a microsoft-aurora class name), `kwargs` (constructor arguments; lists become
tuples, `timestep_hours` becomes `timestep`), `seed`, `noise` (std of Gaussian noise added to every
parameter so that zero-initialised LoRA and AdaLN weights are exercised), `batch`, `history`, `h`,
`w` (global regular grid, lat 90 -> -90 inclusive), `levels`, `time` (ISO), `steps` (rollout
length), optional `zero_params` (parameter names set to zero), optional `surf_vars` /
`static_vars` / `atmos_vars` present in the batch, optional `positive_vars` (variables drawn as
absolute values, e.g. pollutant concentrations for a log transform).

Writes `state_dict.ckpt` (`torch.save`, read back without PyTorch), `batch.npz` (`surf/NAME`,
`static/NAME`, `atmos/NAME`, `lat`, `lon`) and `preds.npz` (`{step}/surf/NAME`, `{step}/atmos/NAME`,
`{step}/time_hours`, `{step}/rollout_step`), plus `info.json` (parameter count).
"""

import json
import sys
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import torch

import aurora
from aurora.normalisation import level_to_str, locations, scales


def build_model(spec):
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()}
    if "timestep_hours" in kwargs:
        kwargs["timestep"] = timedelta(hours=kwargs.pop("timestep_hours"))
    torch.manual_seed(spec["seed"])
    model = getattr(aurora, spec["preset"])(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(spec.get("noise", 0.02) * torch.randn_like(p))
        for name, p in model.named_parameters():
            if name in spec.get("zero_params", ()):  # diagnostics: switch a path off
                p.zero_()
    return model.eval()


def build_batch(spec, model):
    rng = np.random.default_rng(spec["seed"] + 1)
    b, t, h, w, levels = spec["batch"], spec["history"], spec["h"], spec["w"], spec["levels"]

    positive = set(spec.get("positive_vars", ()))

    def field(key, shape, name=None):
        x = (locations[key] + scales[key] * rng.standard_normal(shape)).astype(np.float32)
        return np.abs(x) if (name or key) in positive else x

    surf = {v: field(v, (b, t, h, w)) for v in spec.get("surf_vars", model.surf_vars)}
    static = {v: field(v, (h, w)) for v in spec.get("static_vars", model.static_vars)}
    atmos = {}
    for v in spec.get("atmos_vars", model.atmos_vars):
        per_level = [field(f"{v}_{level_to_str(lv)}", (b, t, 1, h, w), v) for lv in levels]
        atmos[v] = np.concatenate(per_level, axis=2)
    lat = np.linspace(90, -90, h).astype(np.float32)
    lon = np.linspace(0, 360, w, endpoint=False).astype(np.float32)
    time = datetime.fromisoformat(spec["time"])
    batch = aurora.Batch(
        surf_vars={k: torch.from_numpy(v) for k, v in surf.items()},
        static_vars={k: torch.from_numpy(v) for k, v in static.items()},
        atmos_vars={k: torch.from_numpy(v) for k, v in atmos.items()},
        metadata=aurora.Metadata(
            lat=torch.from_numpy(lat),
            lon=torch.from_numpy(lon),
            time=(time,) * b,
            atmos_levels=tuple(levels),
            rollout_step=spec.get("rollout_step", 0),
        ),
    )
    arrays = {f"surf/{k}": v for k, v in surf.items()}
    arrays |= {f"static/{k}": v for k, v in static.items()}
    arrays |= {f"atmos/{k}": v for k, v in atmos.items()}
    arrays |= {"lat": lat, "lon": lon}
    return batch, arrays


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    torch.set_num_threads(2)
    model = build_model(spec)
    batch, arrays = build_batch(spec, model)
    torch.save(model.state_dict(), out / "state_dict.ckpt")
    np.savez(out / "batch.npz", **arrays)

    preds = {}
    with torch.inference_mode():
        for step, pred in enumerate(aurora.rollout(model, batch, steps=spec["steps"])):
            for k, v in pred.surf_vars.items():
                preds[f"{step}/surf/{k}"] = v.numpy()
            for k, v in pred.atmos_vars.items():
                preds[f"{step}/atmos/{k}"] = v.numpy()
            preds[f"{step}/rollout_step"] = np.array(pred.metadata.rollout_step)
            preds[f"{step}/time"] = np.array([np.datetime64(t, "m") for t in pred.metadata.time])
    np.savez(out / "preds.npz", **preds)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "info.json").write_text(json.dumps({"n_params": n_params}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
