"""The GPU benchmark (`benchmarks/gpu_step.py`, `benchmarks/gpu/`) on a CPU.

Its smoke mode runs the whole script, both sides in processes of their own, on a tiny model and
grid: every item reports, precision is pinned on both sides, the targets get a verdict and the
result file holds every figure. The time budget is checked by planning and by a run with none.
`benchmarks/gpu/run.sh`, which installs the carried wheels offline first, runs in the slow suite
when `make gpu-wheels` has gathered them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_step
from tests.conftest import CACHE
from tests.reference.venv import REQUIREMENTS
from tests.reference.venv import python as reference_python

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "benchmarks" / "gpu" / "wheels"


def _env() -> dict[str, str]:
    """The smoke run's environment: the tests' compilation cache, and XLA:CPU's quickest
    compiles (the figures of a smoke run only show that each part runs)."""
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_backend_optimization_level=0",
        "JAX_COMPILATION_CACHE_DIR": str(CACHE),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


def _smoke(tmp_path: Path, *args: str) -> tuple[str, dict]:
    out = tmp_path / "gpu_step.json"
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_step.py", "--smoke", "--out", str(out), *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    return result.stdout, json.loads(out.read_text())


@pytest.mark.slow  # CI time: heavy, and its neighbours cover the same code in CI
def test_smoke_run_measures_every_item_on_both_sides(tmp_path) -> None:
    stdout, record = _smoke(tmp_path, "--torch-python", str(reference_python()))
    rows = record["figures"]["presets"]["tiny"]
    for side, items in gpu_step.ITEMS.items():
        assert {i: rows[side][i]["status"] for i in items} == dict.fromkeys(items, "done"), side
    jax_rows, torch_rows = rows["jax"], rows["torch"]
    assert jax_rows["setup"]["matmul_precision"] == "highest"
    assert torch_rows["setup"]["allow_tf32"] is False
    assert jax_rows["setup"]["params"] == torch_rows["setup"]["params"] > 0  # the same model
    for row, item, key in (
        (jax_rows, "train_stages", "train_s"),
        (jax_rows, "train_backbone", "train_s"),
        (jax_rows, "forward_fp32", "forward_s"),
        (jax_rows, "forward_bf16", "forward_s"),
        (jax_rows, "forecast", "forecast_s"),
        (torch_rows, "train", "train_s"),
        (torch_rows, "forecast", "forecast_s"),
    ):
        assert row[item][key] > 0, (item, key)
    assert jax_rows["train_stages"]["plan_peak_gib"] > 0
    assert jax_rows["forecast"]["steps"] == torch_rows["forecast"]["steps"] == 2

    targets = {t["target"]: t for t in record["figures"]["targets"]}
    assert set(targets) == {
        "train step (bf16, remat=stages)",
        "2-step forecast (bf16)",
        "peak memory, train step",
    }
    assert (
        targets["train step (bf16, remat=stages)"]["value"] == jax_rows["train_stages"]["train_s"]
    )
    assert targets["peak memory, train step"]["status"] == "N/A"  # XLA:CPU keeps no statistics
    for t in targets.values():
        if t["value"] is not None:
            assert t["status"] == ("PASS" if t["value"] <= t["limit"] else "MISS")
        assert f"{t['status']:<5} {t['target']}" in stdout
    assert record["figures"]["skipped"] == []
    assert "nothing skipped" in stdout


def test_a_run_out_of_time_skips_everything_and_says_so(tmp_path) -> None:
    stdout, record = _smoke(tmp_path, "--budget-s", "0")
    rows = record["figures"]["presets"]["tiny"]["jax"]
    assert {r["status"] for r in rows.values()} == {"skipped"}
    assert "skipped for the time budget: jax tiny setup, jax tiny train_stages" in stdout
    assert "[torch tiny] not run: no --torch-python" in stdout
    assert all(t["status"] == "N/A" for t in record["figures"]["targets"])


def test_budget_keeps_time_for_later_items_of_higher_priority() -> None:
    jobs = [("jax", "Aurora"), ("torch", "Aurora"), ("jax", "AuroraSmall")]
    budget = gpu_step.Budget(1000.0, gpu_step.ESTIMATES)
    plan = {item: (est, end) for item, est, end in budget.plan(jobs, 0)}
    torch = gpu_step.ESTIMATES["Aurora"]["torch"]
    # the targets' items run first; the rest of the JAX job leaves time for microsoft-aurora's
    # train step and bf16 forward, which rank above it
    assert plan["train_stages"][1] == plan["forecast"][1] == 1000.0
    reserve = torch["setup"] + torch["forward_bf16"] + torch["train"]
    assert plan["forward_fp32"][1] == plan["train_backbone"][1] == 1000.0 - reserve
    assert plan["setup"][1] == 1000.0 - plan["forecast"][0]  # room left for the shortest item

    # once JAX has run at twice its estimates, the later JAX estimates double
    budget.learn(
        {"side": "jax", "preset": "Aurora", "item": "setup", "status": "done", "wall_s": 80.0}
    )
    assert (
        budget.estimate("jax", "AuroraSmall", "setup")
        == 2 * (gpu_step.ESTIMATES["AuroraSmall"]["jax"]["setup"])
    )


# What the GPU image holds (docs/benchmarks.md) with everything these require, and modules that
# libraries import only when present (JAX: cloudpickle, zstandard; HTTP: charset_normalizer).
IMAGE = (
    *("jax", "jaxlib", "scipy", "flax", "optax", "orbax-checkpoint"),
    *("torch", "timm", "xarray", "huggingface-hub"),
)
OPTIONAL = ("cloudpickle", "zstandard", "charset-normalizer")


def _carried(side: str) -> list[str]:
    lines = (ROOT / f"benchmarks/gpu/requirements-{side}.txt").read_text().splitlines()
    return [line.split("==")[0] for line in lines if line and not line.startswith("#")]


@pytest.mark.parametrize("side", ["jax", "torch"])
def test_each_side_needs_only_the_image_and_the_carried_wheels(side) -> None:
    """On the GPU machine nothing can be installed but the carried wheels: every module either
    side's worker imports comes from the image (or its dependencies) or from those wheels."""
    python = sys.executable if side == "jax" else str(reference_python())
    result = subprocess.run(
        [
            python,
            str(ROOT / "tests/workers/import_closure.py"),
            json.dumps(IMAGE),
            json.dumps([*_carried(side), *OPTIONAL]),
            str(ROOT / f"benchmarks/gpu/{side}_side.py"),
        ],
        cwd="/",  # microsoft-aurora's `aurora`, not ours, on the PyTorch side
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == []


def test_carried_microsoft_aurora_is_the_reference_version() -> None:
    pinned = (ROOT / "benchmarks/gpu/requirements-torch.txt").read_text().split()
    reference = next(r for r in REQUIREMENTS if r.startswith("microsoft-aurora=="))
    assert reference in pinned


@pytest.mark.slow
@pytest.mark.skipif(not WHEELS.is_dir(), reason="no carried wheels: run `make gpu-wheels`")
def test_run_sh_installs_the_carried_wheels_offline_and_runs(tmp_path) -> None:
    env = {
        **_env(),
        "PYTHON": sys.executable,  # stands in for the GPU image's Python
        "TORCH_PYTHON": str(reference_python()),
        "OUT": str(tmp_path),
        "PIP_INDEX_URL": "http://127.0.0.1:9/none",  # any index use fails
    }
    result = subprocess.run(
        ["bash", "benchmarks/gpu/run.sh", "--smoke"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "installed the carried wheels" in result.stdout
    record = json.loads((tmp_path / "gpu_step.json").read_text())
    rows = record["figures"]["presets"]["tiny"]
    assert rows["torch"]["train"]["status"] == "done"
    # each side imported what run.sh installed from the wheels, not this machine's copies
    assert rows["jax"]["setup"]["ml_collections_from"].endswith("/jax/ml_collections")
    assert rows["torch"]["setup"]["microsoft_aurora_from"].endswith("/torch/aurora")
    assert "targets (tiny, one device):" in (tmp_path / "gpu_step.log").read_text()
