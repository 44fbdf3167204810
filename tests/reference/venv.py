"""The microsoft-aurora reference environment (`.venv-ref`), built once and reused.

microsoft-aurora's top-level package is also called `aurora`, so it lives in its own virtualenv and
talks to our tests only through files. `python -m tests.reference.venv` builds it by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-ref"
CACHE = ROOT / ".cache" / "reference"
REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "microsoft-aurora==2.0.1"]
RUNNER = Path(__file__).with_name("run_reference.py")


def python() -> Path:
    """Path of the reference interpreter, building the virtualenv on first use."""
    stamp = VENV / ".installed"
    wanted = " ".join(REQUIREMENTS)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / "venv-ref.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == wanted):
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
            subprocess.run(pip + ["--upgrade", "pip"], check=True)
            subprocess.run(pip + REQUIREMENTS, check=True)
            stamp.write_text(wanted)
    return VENV / "bin" / "python"


def case_dir(spec: dict[str, Any]) -> Path:
    """Run the reference for `spec` (see run_reference.py) once; return the folder of its outputs."""
    text = json.dumps(spec, sort_keys=True)
    runner_hash = hashlib.sha256(RUNNER.read_bytes()).hexdigest()[:8]
    key = hashlib.sha256((text + runner_hash).encode()).hexdigest()[:16]
    out = CACHE / key
    if not (out / "done").exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(text)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        # Run from a neutral directory so the reference's `aurora` is imported, not ours.
        subprocess.run(
            [str(python()), str(RUNNER), str(out / "spec.json"), str(out)],
            check=True,
            cwd=str(out),
            env=env,
        )
        (out / "done").write_text("ok")
    return out


if __name__ == "__main__":
    print(python())
