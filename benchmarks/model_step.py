"""Forward and forward+backward time of AuroraSmall: our JAX model vs microsoft-aurora, same run.

    .venv/bin/python benchmarks/model_step.py [--h 64 --w 128 --levels 100,250,500,850 --repeats 3]

Both sides build AuroraSmallPretrained with random weights on the same grid and batch shape (1
sample, 2 history steps), run one warm-up, then report the median of `--repeats` timed calls. JAX
is jitted (compilation happens in the warm-up and is reported separately); the backward pass is
`jax.grad` of the same scalar loss as PyTorch's `.backward()` (sum of the mean of every output).
The PyTorch side runs in `.venv-ref` (see tests/reference/venv.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aurora  # noqa: E402
from tests.reference.venv import python as reference_python  # noqa: E402


def make_batch(h: int, w: int, levels: tuple[int, ...]) -> aurora.Batch:
    rng = np.random.default_rng(0)
    return aurora.Batch(
        surf_vars={k: rng.standard_normal((1, 2, h, w), dtype=np.float32) for k in ("2t", "10u", "10v", "msl")},
        static_vars={k: rng.standard_normal((h, w), dtype=np.float32) for k in ("lsm", "z", "slt")},
        atmos_vars={k: rng.standard_normal((1, 2, len(levels), h, w), dtype=np.float32) for k in ("z", "u", "v", "t", "q")},
        metadata=aurora.Metadata(
            lat=np.linspace(90, -90, h + 1)[:-1],
            lon=np.linspace(0, 360, w, endpoint=False),
            time=(np.datetime64("2020-06-01T12:00"),),
            atmos_levels=levels,
        ),
    )


def time_calls(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, median of the next `repeats` calls), in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def run_jax(h: int, w: int, levels: tuple[int, ...], repeats: int) -> dict[str, float]:
    model = aurora.AuroraSmallPretrained()
    batch = make_batch(h, w, levels)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"]

    def loss(p):
        pred = model.apply({"params": p}, batch)
        return sum(jnp.mean(v) for v in [*pred.surf_vars.values(), *pred.atmos_vars.values()])

    forward = jax.jit(lambda p: model.apply({"params": p}, batch))
    grad = jax.jit(jax.grad(loss))
    with jax.default_matmul_precision("highest"):
        fwd_first, fwd = time_calls(lambda: forward(params), repeats)
        bwd_first, bwd = time_calls(lambda: grad(params), repeats)
    return {"forward": fwd, "forward_backward": bwd, "forward_compile": fwd_first - fwd, "forward_backward_compile": bwd_first - bwd}


def run_torch(h: int, w: int, levels: tuple[int, ...], repeats: int) -> dict[str, float]:
    out = subprocess.run(
        [str(reference_python()), str(ROOT / "benchmarks" / "_torch_model_step.py"), str(h), str(w), ",".join(map(str, levels)), str(repeats)],
        check=True,
        capture_output=True,
        text=True,
        cwd="/tmp",
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h", type=int, default=64)
    parser.add_argument("--w", type=int, default=128)
    parser.add_argument("--levels", default="100,250,500,850")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))

    print(f"AuroraSmallPretrained, batch 1, history 2, grid {args.h}x{args.w}, {len(levels)} levels, "
          f"{jax.devices()[0].platform} ({jax.device_count()} device(s)), float32")
    torch_t = run_torch(args.h, args.w, levels, args.repeats)
    jax_t = run_jax(args.h, args.w, levels, args.repeats)
    print(f"{'':18} {'microsoft-aurora':>17} {'JAX':>9} {'JAX/PyTorch':>12}")
    for name in ("forward", "forward_backward"):
        print(f"{name:18} {torch_t[name]:>16.2f}s {jax_t[name]:>8.2f}s {jax_t[name] / torch_t[name]:>12.2f}")
    print(f"JAX compilation (one-off): forward {jax_t['forward_compile']:.1f}s, "
          f"forward+backward {jax_t['forward_backward_compile']:.1f}s; PyTorch threads: {torch_t['threads']}")


if __name__ == "__main__":
    main()
