"""Result files of the benchmarks: one JSON file per run, next to what the script prints.

Each script in ``benchmarks/`` ends with `write(script, args, figures)`, which writes
``benchmarks/results/<script>-<UTC timestamp>.json`` (or the script's ``--out`` path) holding:

* ``date``: UTC, ISO 8601;
* ``machine``: platform, CPU model (from ``/proc/cpuinfo`` where there is one), CPU cores,
  memory, the load average when the file is written (other jobs on a shared machine skew
  timings), the memory allocator and its settings (a preloaded one speeds XLA:CPU up; see the
  Makefile's ``MALLOC``), JAX's backend and devices;
* ``versions``: python, jax, jaxlib, flax, numpy, plus what the script passes in ``extra_versions``
  (torch and microsoft-aurora where it runs them);
* ``arguments``: the script's parsed command line;
* ``figures``: the script's measurements, in the units their keys name (``_s``, ``_gib``, ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PACKAGES = ("jax", "jaxlib", "flax", "numpy")


def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--out``: where to write the result file (default: a new file in RESULTS_DIR)."""
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result JSON file (default: benchmarks/results/<script>-<UTC timestamp>.json)",
    )


def cpu_count() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 0


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def allocator() -> str:
    """The malloc this process runs on: a preloaded one from ALLOCATORS, else ``"system"``.

    Large XLA:CPU buffers are mapped afresh by glibc on every step, so the allocator moves CPU
    timings and belongs with them.
    """
    try:
        with open("/proc/self/maps") as f:
            mapped = f.read()
    except OSError:
        return "unknown"
    return next((name for name in ALLOCATORS if f"lib{name}" in mapped), "system")


def machine() -> dict[str, Any]:
    """Platform, CPU model, cores, memory, load average, allocator and JAX's devices."""
    import jax

    return {
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_cores": cpu_count(),
        "memory_gib": _memory_gib(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "allocator": allocator(),
        "malloc_conf": os.environ.get("MALLOC_CONF"),  # jemalloc's settings
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
    }


def versions(extra: dict[str, str] | None = None) -> dict[str, str | None]:
    """Python's and the JAX stack's versions, plus `extra` (e.g. the PyTorch side's)."""
    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = None
    return {**out, **(extra or {})}


def write(
    script: str,
    args: argparse.Namespace,
    figures: Any,
    *,
    extra_versions: dict[str, str] | None = None,
) -> Path:
    """Writes one result file and returns its path.

    Args:
        script: the benchmark's name, e.g. ``"memory"``; names the default file.
        args: the parsed command line; its ``out`` (if set) is the file to write.
        figures: the measurements, anything JSON can hold (NaN is written as ``NaN``).
        extra_versions: versions of further packages the run used, e.g. torch.

    Returns:
        The path of the file written.
    """
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    path = getattr(args, "out", None) or RESULTS_DIR / f"{script}-{now:%Y%m%dT%H%M%SZ}.json"
    record = {
        "benchmark": script,
        "date": now.isoformat(),
        "machine": machine(),
        "versions": versions(extra_versions),
        "arguments": {k: v for k, v in vars(args).items() if k != "out"},
        "figures": figures,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"results written to {path}", flush=True)
    return path


def torch_versions() -> dict[str, str]:
    """torch's and microsoft-aurora's versions; for the ``_torch_*`` helpers' JSON output."""
    import torch

    return {
        "torch": torch.__version__,
        "microsoft-aurora": importlib.metadata.version("microsoft-aurora"),
    }
