"""One prepared GPU run: Aurora 1.3B and AuroraSmall, JAX against microsoft-aurora, verdicts.

    bash benchmarks/gpu/run.sh          # on the GPU machine: installs the carried wheels, runs this
    .venv/bin/python benchmarks/gpu_step.py [--presets Aurora,AuroraSmall] [--torch-python PATH]
    .venv/bin/python benchmarks/gpu_step.py --smoke   # CPU: a tiny model on a tiny grid, seconds

At 0.25° (721×1440), 13 levels, batch 1, random weights, for each preset: the forward pass in
float32 and with bf16 compute, the train step (bf16, `remat="stages"` and `"backbone"`), a
`--forecast-steps` forecast (40 = 10 days), XLA's memory plan and the measured peak, MFU (XLA's
forward FLOPs, ×3 for the train step, against the card's peak bf16 FLOP/s), the same on
microsoft-aurora, then PASS / MISS against the targets (`TARGETS`) for the first preset.

Each side runs in processes of its own, one preset at a time, one after the other (`jax_side.py`,
`torch_side.py` in `benchmarks/gpu/`): a process holds GPU memory until it exits. Float32 means
full float32 on both sides (no TF32), bf16 means the models' `autocast` (the backbone in bf16).
The run keeps to `--budget-s` (from `--start`): items run by priority (`TIERS`) and one that would
end past the budget, given its estimate (`ESTIMATES`, rescaled by what the run has measured so
far), is skipped and listed. Writes every figure to a result file (`benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import results  # noqa: E402
from benchmarks.gpu import worker  # noqa: E402

SIDES = {"jax": ROOT / "benchmarks/gpu/jax_side.py", "torch": ROOT / "benchmarks/gpu/torch_side.py"}
ITEMS = {
    "jax": ("setup", "train_stages", "forward_bf16", "forecast", "forward_fp32", "train_backbone"),
    "torch": ("setup", "forward_bf16", "forward_fp32", "forecast", "train"),
}
# Priority of each item of the first preset (1 first): the targets, then the comparison with
# microsoft-aurora, then the rest. Later presets come after all of it.
TIERS = {
    "jax": {"setup": 1, "train_stages": 1, "forward_bf16": 1, "forecast": 1},
    "torch": {"setup": 2, "forward_bf16": 2, "train": 2},
}
OTHER_TIER = 3
LATER_PRESET_TIER = 4
# Wall seconds per item on one H100/H200-class GPU, compilation included (guesses before the first
# GPU run; the run rescales them by what it measures); "tiny" is the CPU smoke test.
ESTIMATES = {
    "Aurora": {
        "jax": {
            "setup": 40,
            "train_stages": 180,
            "forward_bf16": 80,
            "forecast": 15,
            "forward_fp32": 80,
            "train_backbone": 160,
        },
        "torch": {"setup": 30, "forward_bf16": 5, "forward_fp32": 8, "forecast": 25, "train": 15},
    },
    "AuroraSmall": {
        "jax": {
            "setup": 20,
            "train_stages": 60,
            "forward_bf16": 30,
            "forecast": 5,
            "forward_fp32": 30,
            "train_backbone": 50,
        },
        "torch": {"setup": 15, "forward_bf16": 2, "forward_fp32": 3, "forecast": 8, "train": 6},
    },
    "tiny": {
        "jax": {
            "setup": 5,
            "train_stages": 15,
            "forward_bf16": 6,
            "forecast": 1,
            "forward_fp32": 6,
            "train_backbone": 15,
        },
        "torch": {"setup": 5, "forward_bf16": 1, "forward_fp32": 1, "forecast": 1, "train": 2},
    },
}
# Targets for the first preset (Aurora 1.3B at 0.25° on one GPU): (item, figure, limit, unit, what).
TARGETS = (
    ("train_stages", "train_s", 1.3, "s", "train step (bf16, remat=stages)"),
    ("forecast", "forecast_s", 10.0, "s", "forecast (bf16)"),
    ("train_stages", "peak_gib", 40.0, "GiB", "peak memory, train step"),
)
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}
SMOKE = dict(presets="tiny", h=17, w=32, levels=3, repeats=1, forecast_steps=2)


def model_spec(name: str) -> dict[str, Any]:
    """How both sides build preset `name`: a preset class of both packages, or "tiny" (the tests'
    tiny Aurora with one Swin block per stage: every code path, quick to compile)."""
    if name == "tiny":
        from tests.helpers import TINY_KWARGS

        depths = {"encoder_depths": (1, 1), "decoder_depths": (1, 1)}
        return {"preset": "Aurora", "kwargs": {**TINY_KWARGS, **depths, "use_lora": False}}
    return {"preset": name, "kwargs": {"use_lora": False}}


class Budget:
    """The time budget: which items may still start, with estimates rescaled by the run so far."""

    def __init__(self, deadline: float, estimates: dict[str, dict[str, dict[str, float]]]) -> None:
        self.deadline = deadline
        self.estimates = estimates
        self.spent = {"jax": [0.0, 0.0], "torch": [0.0, 0.0]}  # [measured, estimated] per side

    def estimate(self, side: str, preset: str, item: str) -> float:
        table = self.estimates.get(preset, self.estimates["Aurora"])[side]
        measured, estimated = self.spent[side]
        scale = min(max(measured / estimated, 0.5), 4.0) if estimated else 1.0
        return table[item] * scale

    def learn(self, record: dict[str, Any]) -> None:
        if record.get("status") == "done":
            side = record["side"]
            self.spent[side][0] += record["wall_s"]
            self.spent[side][1] += self.estimate_raw(record)

    def estimate_raw(self, record: dict[str, Any]) -> float:
        table = self.estimates.get(record["preset"], self.estimates["Aurora"])
        return table[record["side"]][record["item"]]

    def plan(self, jobs: list[tuple[str, str]], first: int) -> list[list[Any]]:
        """`[item, estimate_s, latest_end]` for job `first` of `jobs` ((side, preset) pairs): an
        item may end no later than leaves time for every later item of higher priority."""
        later = [
            (tier(side, preset, item, jobs), self.estimate(side, preset, item))
            for side, preset in jobs[first + 1 :]
            for item in ITEMS[side]
        ]
        side, preset = jobs[first]
        mine = [(item, tier(side, preset, item, jobs)) for item in ITEMS[side]]
        rows = []
        for i, (item, t) in enumerate(mine):
            after = [est for tt, est in later if tt < t]
            after += [self.estimate(side, preset, it) for it, tt in mine[i + 1 :] if tt < t]
            rows.append([item, self.estimate(side, preset, item), self.deadline - sum(after)])
        # setup must leave room for at least one item after it
        ends = [end - est for _, est, end in rows[1:]]
        rows[0][2] = min(rows[0][2], max(ends))
        return rows


def tier(side: str, preset: str, item: str, jobs: list[tuple[str, str]]) -> int:
    if preset != jobs[0][1]:
        return LATER_PRESET_TIER
    return TIERS[side].get(item, OTHER_TIER)


def run_job(cmd: list[str], env: dict[str, str], spec: dict[str, Any], kill_at: float) -> list:
    """Run one worker; its records, with one `failed` record per item it never reported."""
    label = f"[{spec['side']} {spec['name']}]"
    proc = subprocess.Popen(
        [*cmd, json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(ROOT / "benchmarks" / "gpu"),
    )
    timer = threading.Timer(max(kill_at - time.time(), 1.0), proc.kill)
    timer.start()
    records = []
    try:
        for line in proc.stdout:
            if line.startswith(worker.PREFIX):
                records.append(json.loads(line[len(worker.PREFIX) :]))
                print(describe(records[-1]), flush=True)
            else:
                print(f"  {label} {line.rstrip()}", flush=True)
        proc.wait()
    finally:
        timer.cancel()
    seen = {r["item"] for r in records}
    reason = "stopped at the time budget" if proc.returncode == -9 else f"exit {proc.returncode}"
    for item, estimate, _ in spec["items"]:
        if item not in seen:
            records.append(
                {
                    "side": spec["side"],
                    "preset": spec["name"],
                    "item": item,
                    "estimate_s": estimate,
                    "status": "failed",
                    "error": f"worker ended without reporting ({reason})",
                }
            )
            print(describe(records[-1]), flush=True)
    return records


def describe(record: dict[str, Any]) -> str:
    """One progress line: what ran, how long against its estimate, or why it did not run."""
    head = f"[{record['side']} {record['preset']}] {record['item']}: {record['status']}"
    if record["status"] == "done":
        return f"{head} in {record['wall_s']:.0f} s (estimate {record['estimate_s']:.0f} s)"
    why = record.get("reason") or record.get("error")
    return f"{head} ({why}; estimate {record['estimate_s']:.0f} s)"


def side_command(side: str, args: argparse.Namespace) -> tuple[list[str], dict[str, str]] | None:
    """How to start a worker of `side`, or None where that side does not run."""
    if side == "jax":
        env = {**os.environ}
        return [sys.executable, str(SIDES["jax"])], env
    if not args.torch_python:
        return None
    # microsoft-aurora's package is also `aurora`: nothing of ours on its path.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if args.torch_path:
        env["PYTHONPATH"] = args.torch_path
    return [args.torch_python, str(SIDES["torch"])], env


def add_mfu(row: dict[str, dict[str, Any]]) -> None:
    """MFU of the bf16 forward and the train steps, where the device's peak is known."""
    device = row.get("setup", {}).get("device", "")
    peak = next((v for k, v in PEAK_BF16.items() if k in device), None)
    flops = next((r["forward_flops"] for r in row.values() if r.get("forward_flops")), None)
    if not (peak and flops):
        return
    for item, key, factor in (
        ("forward_bf16", "forward_s", 1),
        ("train_stages", "train_s", 3),
        ("train_backbone", "train_s", 3),
    ):
        if row.get(item, {}).get(key):
            row[item]["mfu"] = factor * flops / row[item][key] / peak


def verdicts(row: dict[str, dict[str, Any]], forecast_steps: int) -> list[dict[str, Any]]:
    """PASS / MISS per target for the first preset's JAX figures; N/A where not measured."""
    out = []
    for item, key, limit, unit, what in TARGETS:
        record = row.get(item, {})
        value = record.get(key)
        if item == "forecast":
            what = f"{forecast_steps}-step {what}"
        if value is not None:
            status = "PASS" if value <= limit else "MISS"
        else:
            status = "N/A"
        why = None
        if value is None:
            why = record.get("reason") or record.get("error") or "not measured on this device"
        out.append(
            {"target": what, "status": status, "value": value, "limit": limit, "unit": unit}
            | ({"why": why} if why else {})
        )
    return out


def fmt(value: Any, unit: str = "s", digits: int = 3) -> str:
    """`value` in `unit` ("GiB" below 1 in MiB), "—" if missing."""
    if value is None:
        return "—"
    if unit == "GiB" and value < 1:
        value, unit = value * 1024, "MiB"
    return f"{value:.{digits}f} {unit}"


def report(name: str, jax_row: dict, torch_row: dict) -> list[str]:
    """The printed lines of one preset."""
    setup = jax_row.get("setup", {})
    lines = [
        f"{name}: {setup.get('params', 0) / 1e6:,.1f} M parameters, "
        f"{setup.get('device', '?')} ({setup.get('backend', '?')})"
    ]

    def value(row: dict, item: str, key: str) -> float | None:
        return row.get(item, {}).get(key)

    pairs = (
        ("forward fp32", "forward_fp32", "forward_fp32", "forward_s"),
        ("forward bf16", "forward_bf16", "forward_bf16", "forward_s"),
        ("train bf16 remat=stages", "train_stages", None, "train_s"),
        ("train bf16 remat=backbone", "train_backbone", "train", "train_s"),
        ("forecast bf16", "forecast", "forecast", "forecast_s"),
    )
    lines.append(f"  {'':<26}{'JAX':>12}{'microsoft-aurora':>18}{'speed-up':>10}{'MFU':>7}")
    for label, jitem, titem, key in pairs:
        j = value(jax_row, jitem, key)
        t = value(torch_row, titem, key) if titem else None
        speedup = f"{t / j:.2f}x" if j and t else "—"
        mfu = value(jax_row, jitem, "mfu")
        lines.append(
            f"  {label:<26}{fmt(j):>12}{fmt(t):>18}{speedup:>10}{(f'{mfu:.0%}' if mfu else '—'):>7}"
        )
    for item in ("train_stages", "train_backbone"):
        r = jax_row.get(item, {})
        if "plan_peak_gib" in r:
            lines.append(
                f"  memory {item}: XLA plan {fmt(r['plan_peak_gib'], 'GiB', 1)} "
                f"(arguments {fmt(r['plan_arguments_gib'], 'GiB', 1)}, "
                f"temporaries {fmt(r['plan_temp_gib'], 'GiB', 1)}); "
                f"measured peak so far {fmt(r.get('peak_gib'), 'GiB', 1)}"
            )
    if "peak_gib" in torch_row.get("train", {}):
        lines.append(
            f"  memory microsoft-aurora train: peak {fmt(torch_row['train']['peak_gib'], 'GiB', 1)}"
        )
    compiles = [
        f"{item} {r['compile_s']:.0f} s" for item, r in jax_row.items() if r.get("compile_s")
    ]
    if compiles:
        lines.append(f"  JAX compile: {', '.join(compiles)}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="Aurora,AuroraSmall")
    parser.add_argument("--h", type=int, default=721)
    parser.add_argument("--w", type=int, default=1440)
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forecast-steps", type=int, default=40)
    parser.add_argument(
        "--torch-python", default=None, help="a Python with PyTorch and microsoft-aurora"
    )
    parser.add_argument(
        "--torch-path", default=None, help="PYTHONPATH of the microsoft-aurora side"
    )
    parser.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time budget")
    parser.add_argument("--start", type=float, default=None, help="UNIX time the budget started")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke test: " + json.dumps(SMOKE))
    results.add_out_argument(parser)
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    start = args.start or time.time()
    budget = Budget(start + args.budget_s, ESTIMATES)
    presets = args.presets.split(",")
    jobs = [(side, preset) for preset in presets for side in ("jax", "torch")]
    print(
        f"{args.h}x{args.w}, {args.levels} levels, batch 1, {args.repeats} timed calls per item; "
        f"budget {args.budget_s:.0f} s ({max(budget.deadline - time.time(), 0):.0f} s left)",
        flush=True,
    )
    rows: dict[str, dict[str, dict[str, Any]]] = {p: {"jax": {}, "torch": {}} for p in presets}
    for i, (side, preset) in enumerate(jobs):
        command = side_command(side, args)
        if command is None:
            print(f"[{side} {preset}] not run: no --torch-python", flush=True)
            continue
        spec = {
            "side": side,
            "name": preset,
            **model_spec(preset),
            "h": args.h,
            "w": args.w,
            "levels": args.levels,
            "repeats": args.repeats,
            "forecast_steps": args.forecast_steps,
            "items": budget.plan(jobs, i),
        }
        setup_s = spec["items"][0][1]
        if all(time.time() + setup_s + est > end for _, est, end in spec["items"][1:]):
            records = [
                {"side": side, "preset": preset, "item": item, "estimate_s": est}
                | {"status": "skipped", "reason": "time budget"}
                for item, est, _ in spec["items"]
            ]
            for record in records:
                print(describe(record), flush=True)
        else:
            records = run_job(*command, spec, kill_at=budget.deadline + 20)
        for record in records:
            budget.learn(record)
            rows[preset][side][record["item"]] = record
    for preset in presets:
        add_mfu(rows[preset]["jax"])
        print("\n".join(report(preset, rows[preset]["jax"], rows[preset]["torch"])), flush=True)
    checks = verdicts(rows[presets[0]]["jax"], args.forecast_steps)
    print(f"targets ({presets[0]}, one device):")
    for c in checks:
        line = f"{c['status']:<5} {c['target']}: {fmt(c['value'], c['unit'], 2)}"
        line += f" (≤ {c['limit']:g} {c['unit']})" + (f" — {c['why']}" if "why" in c else "")
        print(line, flush=True)
    skipped = [
        f"{r['side']} {p} {r['item']}"
        for p in presets
        for side in rows[p].values()
        for r in side.values()
        if r["status"] == "skipped" and r.get("reason") == "time budget"
    ]
    elapsed = time.time() - start
    print(
        f"elapsed {elapsed:.0f} s of {args.budget_s:.0f} s; "
        + (f"skipped for the time budget: {', '.join(skipped)}" if skipped else "nothing skipped"),
        flush=True,
    )
    torch_setup = next((rows[p]["torch"].get("setup") for p in presets), None) or {}
    results.write(
        "gpu_step",
        args,
        {"presets": rows, "targets": checks, "elapsed_s": elapsed, "skipped": skipped},
        extra_versions=torch_setup.get("versions"),
    )


if __name__ == "__main__":
    main()
