"""Result files name the memory allocator their timings ran on."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JEMALLOC = sorted(glob.glob("/usr/lib/*/libjemalloc.so.2"))


def allocator_of_a_process(preload: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = preload
    code = "from benchmarks import results; print(results.allocator())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_a_plain_process_runs_on_the_system_allocator():
    assert allocator_of_a_process(None) == "system"


@pytest.mark.skipif(not JEMALLOC, reason="libjemalloc2 is not installed")
def test_a_preloaded_jemalloc_is_named():
    assert allocator_of_a_process(JEMALLOC[0]) == "jemalloc"
