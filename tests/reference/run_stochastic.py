"""Run a stochastic microsoft-aurora rollout and record the noise its backbone draws.

Runs inside the reference virtualenv, like run_reference.py (whose model and batch it builds, and
whose outputs it writes). Usage: `run_stochastic.py SPEC.json OUT_DIR`.

Extra spec keys: `fine_lead_times` (optional, hours), `use_noise_accumulation` (default true),
`batch_kind` (optional: `"v1p5"` builds run_v1p5.py's Aurora 1.5 batch).
Every `torch.randn` call of the rollout is the backbone's noise (nothing else draws in a forward),
so each is recorded, in call order, as `noise.npz` (`{i}`, each `(B, L, D)`): the JAX side feeds
the same draws through its own noise cache. `preds.npz` is indexed by yielded prediction.
"""

import json
import sys
from pathlib import Path

import numpy as np
import run_reference
import run_v1p5
import torch

import aurora


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    torch.set_num_threads(2)
    model = run_reference.build_model(spec)
    v1p5 = spec.get("batch_kind") == "v1p5"
    batch, arrays = (run_v1p5 if v1p5 else run_reference).build_batch(spec, model)
    torch.save(model.state_dict(), out / "state_dict.ckpt")
    np.savez(out / "batch.npz", **arrays)

    draws = []
    randn = torch.randn

    def recording_randn(*args, **kwargs):
        noise = randn(*args, **kwargs)
        draws.append(noise.detach().cpu().numpy().copy())
        return noise

    preds = {}
    torch.manual_seed(spec["seed"] + 2)
    torch.randn = recording_randn
    try:
        with torch.inference_mode():
            predictions = aurora.rollout(
                model,
                batch,
                steps=spec["steps"],
                fine_lead_times=spec.get("fine_lead_times"),
                use_noise_accumulation=spec.get("use_noise_accumulation", True),
            )
            for i, pred in enumerate(predictions):
                for k, v in pred.surf_vars.items():
                    preds[f"{i}/surf/{k}"] = v.numpy()
                for k, v in pred.atmos_vars.items():
                    preds[f"{i}/atmos/{k}"] = v.numpy()
                preds[f"{i}/rollout_step"] = np.array(pred.metadata.rollout_step)
                preds[f"{i}/time"] = np.array([np.datetime64(t, "m") for t in pred.metadata.time])
    finally:
        torch.randn = randn
    np.savez(out / "preds.npz", **preds)
    np.savez(out / "noise.npz", **{str(i): d for i, d in enumerate(draws)})
    n_params = sum(p.numel() for p in model.parameters())
    (out / "info.json").write_text(json.dumps({"n_params": n_params, "draws": len(draws)}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
