"""One prepared GPU run: forward and train-step times, MFU and a 10-day forecast.

    .venv/bin/python benchmarks/gpu_step.py [--presets Aurora,AuroraSmall] [--torch-python PATH]

For each preset at 0.25° (721×1440), 13 levels, batch 1, random weights: medians of `--repeats`
calls after a warm-up (compilation apart) of the forward in float32 and with bf16 compute, of the
train step (one-step `RolloutStrategy`, AdamW, bf16, Swin blocks rematerialised) and of a
`--forecast-steps` rollout (40 = 10 days); MFU = model FLOPs / time / the card's peak bf16 FLOP/s,
with XLA's forward FLOP count (no recomputation), times 3 for the train step.

With `--torch-python` (a Python that has microsoft-aurora and CUDA PyTorch), `_torch_gpu_step.py`
times the same forward and train step there in the same run and the ratio is reported.
`--h/--w/--levels` shrink it for a CPU smoke test. Writes a result file (`benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aurora  # noqa: E402
from aurora.rollout import advance_batch  # noqa: E402
from benchmarks import results  # noqa: E402
from benchmarks.memory import AURORA_LEVELS  # noqa: E402
from benchmarks.model_step import compile_timed, flops, time_calls  # noqa: E402
from tests.helpers import random_batch  # noqa: E402
from trainers.strategies.rollout import RolloutStrategy  # noqa: E402
from trainers.trainer import _to_device_batch  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "GH200": 989e12}
OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
)


def peak_flops() -> float | None:
    """The device's peak dense bf16 FLOP/s from PEAK_BF16, None for an unknown device."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def bench(preset: str, args: argparse.Namespace) -> dict[str, float]:
    """Times one preset (forward fp32 and bf16, train step, forecast); seconds, FLOPs, MFU."""
    levels = AURORA_LEVELS[: args.levels]
    model = aurora.PRESETS[preset](use_lora=False)
    batch = random_batch(model, batch=1, h=args.h, w=args.w, levels=levels)
    target = random_batch(model, batch=1, history=1, h=args.h, w=args.w, levels=levels, seed=1)
    inputs, targets = _to_device_batch((batch, [target]))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs)["params"]
    out: dict[str, float] = {
        "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    }

    for name, autocast in (("forward_fp32", False), ("forward_bf16", True)):
        m = model.clone(autocast=autocast)
        compiled, out[f"{name}_compile_s"] = compile_timed(
            jax.jit(lambda p, b, m=m: m.apply({"params": p}, b)), params, inputs
        )
        out[f"{name}_s"] = time_calls(lambda c=compiled: c(params, inputs), args.repeats)[1]
        if name == "forward_fp32":
            out["forward_flops"] = flops(compiled)

    strategy = RolloutStrategy(model.clone(autocast=True, remat=True), steps=1)
    tx, _ = strategy.make_optimizer(OPTIM, None)
    state = strategy.init_state(jax.random.PRNGKey(0), inputs, tx, params)
    step = jax.jit(strategy.train_step, donate_argnums=(0,))
    holder = {"state": state}

    def train() -> jax.Array:
        holder["state"], metrics = step(holder["state"], (inputs, targets), {})
        return metrics["loss"]

    out["train_compile_s"], out["train_s"] = time_calls(train, args.repeats)
    peak = peak_flops()
    if peak:
        out["forward_bf16_mfu"] = out["forward_flops"] / out["forward_bf16_s"] / peak
        out["train_mfu"] = 3 * out["forward_flops"] / out["train_s"] / peak

    m = model.clone(autocast=True)
    one = jax.jit(lambda p, b: m.apply({"params": p}, b))
    x = inputs.crop(model.patch_size)
    jax.block_until_ready(one(holder["state"].params, x))  # compile
    start = time.perf_counter()
    for _ in range(args.forecast_steps):
        x = advance_batch(x, one(holder["state"].params, x))
    jax.block_until_ready(x.atmos_vars["z"])
    out["forecast_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="Aurora,AuroraSmall")
    parser.add_argument("--h", type=int, default=721)
    parser.add_argument("--w", type=int, default=1440)
    parser.add_argument("--levels", type=int, default=13)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--forecast-steps", type=int, default=40)
    parser.add_argument(
        "--torch-python", default=None, help="a Python with microsoft-aurora and CUDA PyTorch"
    )
    results.add_out_argument(parser)
    args = parser.parse_args()
    print(
        f"{jax.devices()[0].device_kind}, {args.h}x{args.w}, {args.levels} levels, batch 1",
        flush=True,
    )
    figures, torch_versions = {}, None
    for preset in args.presets.split(","):
        figures[preset] = row = bench(preset, args)
        line = (
            f"{preset}: params {row['params'] / 1e9:.3f} B | "
            f"forward fp32 {row['forward_fp32_s']:.3f} s | "
            f"forward bf16 {row['forward_bf16_s']:.3f} s | "
            f"train step bf16+remat {row['train_s']:.3f} s | "
            f"{args.forecast_steps}-step forecast {row['forecast_s']:.2f} s"
        )
        if "train_mfu" in row:
            line += f" | MFU forward {row['forward_bf16_mfu']:.1%}, train {row['train_mfu']:.1%}"
        print(line, flush=True)
        print(
            f"  compile: forward {row['forward_fp32_compile_s']:.0f} s, "
            f"train {row['train_compile_s']:.0f} s; "
            f"XLA forward FLOPs {row['forward_flops'] / 1e12:.1f} T",
            flush=True,
        )
        if args.torch_python:
            cmd = [
                os.path.abspath(args.torch_python),
                str(ROOT / "benchmarks" / "_torch_gpu_step.py"),
                preset,
                str(args.h),
                str(args.w),
                str(args.levels),
                str(args.repeats),
            ]
            ref = json.loads(
                subprocess.run(
                    cmd, check=True, capture_output=True, text=True, cwd="/"
                ).stdout.splitlines()[-1]
            )
            torch_versions = ref.pop("versions", None)
            row["torch"] = ref
            row["torch_train_over_jax_train"] = ref["train_s"] / row["train_s"]
            print(
                f"  microsoft-aurora: forward fp32 {ref['forward_fp32_s']:.3f} s, "
                f"bf16 {ref['forward_bf16_s']:.3f} s, train {ref['train_s']:.3f} s, "
                f"peak {ref.get('peak_gib', float('nan')):.1f} GiB; "
                f"JAX speed-up on the train step {ref['train_s'] / row['train_s']:.2f}x",
                flush=True,
            )
    results.write("gpu_step", args, figures, extra_versions=torch_versions)


if __name__ == "__main__":
    main()
