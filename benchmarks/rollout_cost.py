"""Cost of one update for rollout training to K steps: full backprop, pushforward, replay buffer.

    .venv/bin/python benchmarks/rollout_cost.py [--preset AuroraSmall --h 32 --w 64 --ks 1,2,4,8]

Same model, grid and batch (1 sample) for every row, in one run; all train on a lead-K target.

* `all`: `RolloutStrategy(steps=K, backprop="all", average_loss=False)`, gradients through all K
  model calls, each step rematerialised; `all/no-remat`: the same without remat;
* `pushforward`: `backprop="pushforward"`, K - 1 gradient-free calls, gradients through the last;
* `replay`: `ReplayStrategy`, one model call per update on a buffer entry at rollout step K - 1.

Reported per update: median wall time of `--repeats` jitted `train_step` calls after a warm-up
(compile time apart) and XLA's memory plan (`memory_analysis()`): `temp` (scratch beyond inputs
and outputs) and `peak` = arguments + outputs + temp, an upper bound (the state is donated, so
arguments and outputs alias in practice). Writes a result file (`benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aurora  # noqa: E402
from aurora.batch import Batch  # noqa: E402
from benchmarks import results  # noqa: E402
from tests.helpers import random_batch  # noqa: E402
from trainers.strategies.base import stack_targets  # noqa: E402
from trainers.strategies.replay import ReplayStrategy  # noqa: E402
from trainers.strategies.rollout import RolloutStrategy  # noqa: E402
from trainers.trainer import _to_device_batch  # noqa: E402

OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
)
MB = 2**20
NAMES = ("all", "all/no-remat", "pushforward", "replay")


def state_batch(
    model: aurora.Aurora, args: argparse.Namespace, history: int, seed: int, minutes: int, step: int
) -> Batch:
    """Random fields with Aurora's statistics (`tests.helpers.random_batch`) at a given time and
    rollout step (`step < 0`: a scalar 0, as the data pipeline gives)."""
    batch = random_batch(
        model, batch=1, history=history, h=args.h, w=args.w, levels=args.levels, seed=seed
    )
    return batch.replace(
        metadata=batch.metadata.replace(
            time=np.array([minutes], np.int32),
            rollout_step=np.array([step], np.int32) if step >= 0 else 0,
        )
    )


def example(
    model: aurora.Aurora, args: argparse.Namespace, k: int, rollout_step: int = -1
) -> tuple[Batch, Batch]:
    """(inputs, stacked targets) on the device, as the Trainer passes them."""
    now = 26_000_000
    inputs = state_batch(model, args, 2, 0, now, rollout_step)
    targets = [
        state_batch(model, args, 1, i + 1, now + 360 * (i + 1), max(rollout_step, 0) + i + 1)
        for i in range(k)
    ]
    if rollout_step < 0:
        return _to_device_batch((inputs, targets))
    return inputs, stack_targets(targets)


def measure(strategy, batch, repeats: int, rng: jax.Array) -> dict[str, float]:
    """Compiles `strategy.train_step` for `batch`; median seconds per update and memory plan."""
    tx, _ = strategy.make_optimizer(OPTIM, None)
    state = strategy.init_state(rng, jax.tree_util.tree_map(lambda x: x, batch[0]), tx)
    controls = strategy.default_controls()
    step = jax.jit(strategy.train_step, donate_argnums=(0,))
    start = time.perf_counter()
    compiled = step.lower(state, batch, controls).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, controls)
        jax.block_until_ready(metrics["loss"])
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - start)
    peak = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    return {
        "seconds": statistics.median(times),
        "compile_s": compile_s,
        "temp_mb": memory.temp_size_in_bytes / MB,
        "peak_mb": peak / MB,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="AuroraSmall")
    parser.add_argument(
        "--depths",
        default="1,1,1",
        help="Swin blocks per stage (AuroraSmall: 2,6,2); fewer keeps compiling quick",
    )
    parser.add_argument("--h", type=int, default=32)
    parser.add_argument("--w", type=int, default=64)
    parser.add_argument("--levels", default="100,250,500,850")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    results.add_out_argument(parser)
    args = parser.parse_args()
    args.levels = tuple(int(x) for x in args.levels.split(","))
    ks = [int(k) for k in args.ks.split(",")]
    depths = tuple(int(x) for x in args.depths.split(","))
    model = aurora.PRESETS[args.preset](
        use_lora=False, encoder_depths=depths, decoder_depths=depths[::-1]
    )
    rng = jax.random.PRNGKey(0)
    print(
        f"{args.preset} with Swin depths {depths}, {args.h}x{args.w}, {len(args.levels)} levels, "
        f"batch 1, {jax.devices()[0].device_kind}"
    )

    rows = []
    for k in ks:
        for name in NAMES:
            if name == "replay":
                strategy, batch = (
                    ReplayStrategy(model, max_lead_hours=((0, 6 * max(ks)),)),
                    example(model, args, 1, rollout_step=k - 1),
                )
            else:
                backprop, remat = name.split("/")[0], not name.endswith("no-remat")
                strategy = RolloutStrategy(
                    model, steps=k, backprop=backprop, average_loss=False, remat=remat
                )
                batch = example(model, args, k)
            row = {"K": k, "strategy": name, **measure(strategy, batch, args.repeats, rng)}
            rows.append(row)
            print(
                f"K={k:<2} {name:<12} {row['seconds']:7.2f} s/update  "
                f"peak {row['peak_mb']:8.1f} MB  "
                f"(temp {row['temp_mb']:8.1f} MB, compile {row['compile_s']:.1f} s)",
                flush=True,
            )

    print(
        "\n| K | "
        + " | ".join(f"{n}: s / peak MB" for n in NAMES)
        + " |\n"
        + "|---" * (len(NAMES) + 1)
        + "|"
    )
    for k in ks:
        cells = [
            f"{r['seconds']:.2f} / {r['peak_mb']:.0f}"
            for name in NAMES
            for r in rows
            if r["K"] == k and r["strategy"] == name
        ]
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    results.write("rollout_cost", args, {"depths": list(depths), "rows": rows})


if __name__ == "__main__":
    main()
