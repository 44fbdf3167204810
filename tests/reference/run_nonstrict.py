"""microsoft-aurora's `load_checkpoint_local(strict=False)` into a model unlike the file.

Runs inside the reference virtualenv (tests/reference/venv.py) and never imports our project.
Usage: `run_nonstrict.py SPEC.json OUT_DIR`, with these inputs already in OUT_DIR:

* `checkpoint.ckpt`: the state dict to load (written by `torch.save`);
* `created.npz`: values for the parameters the checkpoint lacks (PyTorch names), which the JAX side
  initialised, so both models end up with the same weights;
* `batch.npz`: `surf/NAME`, `static/NAME`, `atmos/NAME`, `lat`, `lon`.

Spec keys: `preset`, `kwargs` (lists become tuples), `levels`, `time` (ISO), `steps`.

Writes `preds.npz` (`{step}/surf/NAME`, `{step}/atmos/NAME`) and `keys.json`: the `missing` and
`unexpected` keys `load_state_dict(strict=False)` reported while loading the checkpoint.
"""

import json
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import aurora


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    torch.set_num_threads(2)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}
    model = getattr(aurora, spec["preset"])(**kwargs)

    reported = {}
    load_state_dict = model.load_state_dict

    def capture(state, strict=True):
        result = load_state_dict(state, strict=strict)
        reported.update(missing=result.missing_keys, unexpected=result.unexpected_keys)
        return result

    model.load_state_dict = capture
    model.load_checkpoint_local(str(out / "checkpoint.ckpt"), strict=False)
    model.load_state_dict = load_state_dict
    (out / "keys.json").write_text(json.dumps(reported))

    with np.load(out / "created.npz") as f:
        created = {k: torch.from_numpy(f[k]) for k in f.files}
    result = model.load_state_dict(created, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    model.eval()

    with np.load(out / "batch.npz") as f:
        arrays = {k: f[k] for k in f.files}

    def pick(prefix):
        return {
            k.split("/", 1)[1]: torch.from_numpy(v)
            for k, v in arrays.items()
            if k.startswith(prefix + "/")
        }

    surf = pick("surf")
    batch = aurora.Batch(
        surf_vars=surf,
        static_vars=pick("static"),
        atmos_vars=pick("atmos"),
        metadata=aurora.Metadata(
            lat=torch.from_numpy(arrays["lat"]),
            lon=torch.from_numpy(arrays["lon"]),
            time=(datetime.fromisoformat(spec["time"]),) * next(iter(surf.values())).shape[0],
            atmos_levels=tuple(spec["levels"]),
        ),
    )
    preds = {}
    with torch.inference_mode():
        for step, pred in enumerate(aurora.rollout(model, batch, steps=spec["steps"])):
            for k, v in pred.surf_vars.items():
                preds[f"{step}/surf/{k}"] = v.numpy()
            for k, v in pred.atmos_vars.items():
                preds[f"{step}/atmos/{k}"] = v.numpy()
    np.savez(out / "preds.npz", **preds)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
