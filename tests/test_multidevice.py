"""Runs tests/test_sharding.py on 8 simulated CPU devices, in a process of its own.

The device count is fixed when JAX starts, so the sharding tests cannot share the main test
process (one device); this test starts pytest again with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` and requires every sharding test to pass.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    jax.device_count() == 8, reason="already on 8 devices: tests/test_sharding.py runs directly"
)
def test_sharding_suite_on_eight_simulated_devices() -> None:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_sharding.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    tail = result.stdout[-3000:] + result.stderr[-2000:]
    assert result.returncode == 0, tail
    passed = re.search(r"(\d+) passed", result.stdout)
    assert (
        passed and int(passed.group(1)) >= 5 and "skipped" not in result.stdout.splitlines()[-1]
    ), tail
