"""Run microsoft-aurora's `insolation` for the spec's times and grid (reference virtualenv).

Usage: `run_insolation.py SPEC.json OUT_DIR`; spec keys `times` (ISO strings), `h`, `w` (global
regular grid as in run_reference.py). Writes `insolation.npz` (`sol`, `lat`, `lon`).
"""

import json
import sys
from datetime import datetime
from pathlib import Path

import numpy as np

from aurora.insolation import insolation


def main(spec_path, out_dir):
    spec = json.loads(Path(spec_path).read_text())
    lat = np.linspace(90, -90, spec["h"]).astype(np.float32)
    lon = np.linspace(0, 360, spec["w"], endpoint=False).astype(np.float32)
    sol = np.stack(
        [
            insolation([datetime.fromisoformat(t)], lat, lon, enforce_2d=True)[0]
            for t in spec["times"]
        ]
    )
    np.savez(Path(out_dir) / "insolation.npz", sol=sol, lat=lat, lon=lon)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
