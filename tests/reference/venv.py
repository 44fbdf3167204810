"""The microsoft-aurora reference environment, built once per machine and reused.

microsoft-aurora's top-level package is also called `aurora`, so it lives in its own virtualenv and
talks to our tests only through files. Both the virtualenv and the reference outputs live in a
per-user cache outside the clone (`$AURORA_JAX_CACHE`, else `$XDG_CACHE_HOME/aurora-jax`, else
`~/.cache/aurora-jax`), keyed by the requirements and the runner's hash, so a second clean clone on
the same machine reuses them while a new machine builds everything. `python -m tests.reference.venv`
builds the virtualenv by hand and prints its interpreter.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REQUIREMENTS = ["torch==2.14.1", "torchvision==0.29.1", "microsoft-aurora==2.0.1"]
RUNNER = Path(__file__).with_name("run_reference.py")


def user_cache() -> Path:
    """The per-user cache folder shared by every clone on this machine."""
    if os.environ.get("AURORA_JAX_CACHE"):
        return Path(os.environ["AURORA_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "aurora-jax"


_PYTHON_TAG = f"py{sys.version_info.major}{sys.version_info.minor}"
_REQUIREMENTS_KEY = hashlib.sha256(" ".join([_PYTHON_TAG, *REQUIREMENTS]).encode()).hexdigest()[:8]
VENV = user_cache() / f"venv-ref-{_REQUIREMENTS_KEY}"
CACHE = user_cache() / "reference"


def python() -> Path:
    """Path of the reference interpreter, building the virtualenv on first use."""
    stamp = VENV / ".installed"
    wanted = " ".join(REQUIREMENTS)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.parent / "venv-ref.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (stamp.exists() and stamp.read_text() == wanted):
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
            subprocess.run([*pip, "--upgrade", "pip"], check=True)
            subprocess.run(pip + REQUIREMENTS, check=True)
            stamp.write_text(wanted)
    return VENV / "bin" / "python"


def case_dir(
    spec: dict[str, Any], runner: Path = RUNNER, inputs: Mapping[str, Path] | None = None
) -> Path:
    """Run a reference `runner` (default run_reference.py) for `spec` once; return the folder of
    its outputs.

    `inputs` (name -> file) are copied into that folder under their names before the runner
    starts; their contents are part of the cache key, as are the spec and the runner's code.
    """
    text = json.dumps(spec, sort_keys=True)
    material = text + hashlib.sha256(runner.read_bytes()).hexdigest()[:8]
    if inputs:
        material += json.dumps(
            {name: hashlib.sha256(Path(p).read_bytes()).hexdigest() for name, p in inputs.items()},
            sort_keys=True,
        )
    key = hashlib.sha256(material.encode()).hexdigest()[:16]
    out = CACHE / key
    out.mkdir(parents=True, exist_ok=True)
    # Clones share the cache: one process runs a case, the others wait for its outputs.
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "done").exists():
            for name, path in (inputs or {}).items():
                shutil.copyfile(path, out / name)
            _run_case(text, out, runner)
    return out


def _run_case(text: str, out: Path, runner: Path = RUNNER) -> None:
    """Run a reference runner on the spec `text`, writing its outputs and a `done` mark to
    `out`."""
    (out / "spec.json").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    # Run from a neutral directory so the reference's `aurora` is imported, not ours.
    subprocess.run(
        [str(python()), str(runner), str(out / "spec.json"), str(out)],
        check=True,
        cwd=str(out),
        env=env,
    )
    (out / "done").write_text("ok")


if __name__ == "__main__":
    print(python())
