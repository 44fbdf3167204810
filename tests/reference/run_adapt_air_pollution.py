"""microsoft-aurora's checkpoint adaptation for `AuroraAirPollution` on a given state dict.

Runs inside the reference virtualenv (tests/reference/venv.py) and never imports our project.
Usage: `run_adapt_air_pollution.py SPEC.json OUT_DIR`, with `state.npz` (PyTorch key -> array)
already in OUT_DIR. Spec keys: `patch_size`.

Applies `_adapt_checkpoint_pretrained` then `_adapt_checkpoint_air_pollution`, as
`AuroraAirPollution._adapt_checkpoint` does, and writes the result to `adapted.npz`.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from aurora.model.compat import _adapt_checkpoint_air_pollution, _adapt_checkpoint_pretrained


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    with np.load(out / "state.npz") as f:
        d = {k: torch.from_numpy(f[k]) for k in f.files}
    d = _adapt_checkpoint_pretrained(spec["patch_size"], d)
    d = _adapt_checkpoint_air_pollution(spec["patch_size"], d)
    np.savez(out / "adapted.npz", **{k: v.numpy() for k, v in d.items()})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
