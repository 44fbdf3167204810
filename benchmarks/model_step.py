"""Forward and forward+backward time of AuroraSmall: our JAX model vs microsoft-aurora, same run.

    .venv/bin/python benchmarks/model_step.py [--h 64 --w 128 --levels 100,250,500,850]
        [--repeats 3 --mesh 1,1]

Both sides build AuroraSmallPretrained with random weights on the same grid and batch shape (1
sample, 2 history steps), run one warm-up, then report the median of `--repeats` timed calls. JAX
is jitted (compilation happens in the warm-up and is reported separately); the backward pass is
`jax.grad` of the same scalar loss as PyTorch's `.backward()` (sum of the mean of every output).
The PyTorch side runs in the reference virtualenv (see tests/reference/venv.py).

The JAX side goes through the Trainer's sharding code (`--mesh`, default one device). The `floor`
column divides XLA's FLOP count of the step by the float32 rate of one large matmul on the device:
a float32 step cannot run faster than that, whatever the framework, which puts speed-up targets
against PyTorch in proportion. Writes a result file (`benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aurora  # noqa: E402
from aurora.variables import ATMOS_VARS, STATIC_VARS, SURF_VARS  # noqa: E402
from benchmarks import results  # noqa: E402
from tests.reference.venv import python as reference_python  # noqa: E402
from trainers.sharding import example_shardings, make_mesh, put_state, state_shardings  # noqa: E402


def make_batch(h: int, w: int, levels: tuple[int, ...]) -> aurora.Batch:
    rng = np.random.default_rng(0)
    return aurora.Batch(
        surf_vars={k: rng.standard_normal((1, 2, h, w), dtype=np.float32) for k in SURF_VARS},
        static_vars={k: rng.standard_normal((h, w), dtype=np.float32) for k in STATIC_VARS},
        atmos_vars={
            k: rng.standard_normal((1, 2, len(levels), h, w), dtype=np.float32) for k in ATMOS_VARS
        },
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


def run_jax(
    h: int, w: int, levels: tuple[int, ...], repeats: int, mesh_shape: tuple[int, int]
) -> dict[str, float]:
    """Times the model through the Trainer's sharding path: parameters placed with
    `state_shardings`, the batch with `example_shardings`, both jitted with in/out shardings."""
    model = aurora.AuroraSmallPretrained()
    mesh = make_mesh(*mesh_shape)
    host_batch = make_batch(h, w, levels)
    batch_sharding = example_shardings(host_batch, mesh)
    batch = jax.device_put(host_batch, batch_sharding)
    host_params = jax.jit(model.init)(jax.random.PRNGKey(0), host_batch)["params"]
    param_sharding = state_shardings(host_params, mesh)
    params = put_state(host_params, param_sharding)

    def loss(p, b):
        pred = model.apply({"params": p}, b)
        return sum(jnp.mean(v) for v in [*pred.surf_vars.values(), *pred.atmos_vars.values()])

    shardings = (param_sharding, batch_sharding)
    forward = jax.jit(lambda p, b: model.apply({"params": p}, b), in_shardings=shardings)
    grad = jax.jit(jax.grad(loss), in_shardings=shardings, out_shardings=param_sharding)
    results: dict[str, float] = {}
    with jax.default_matmul_precision("highest"):
        for name, fn in (("forward", forward), ("forward_backward", grad)):
            compiled, results[f"{name}_compile"] = compile_timed(fn, params, batch)
            results[name] = time_calls(lambda c=compiled: c(params, batch), repeats)[1]
            results[f"{name}_flops"] = flops(compiled)
    return results


def compile_timed(fn: Any, *args: Any) -> tuple[jax.stages.Compiled, float]:
    """Ahead-of-time compilation of the jitted `fn` for `args` and the seconds it took: one
    compilation serves both the timed calls and XLA's cost analysis."""
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def flops(compiled: jax.stages.Compiled) -> float:
    """XLA's count of floating-point operations in one call."""
    analysis = compiled.cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def matmul_peak(n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of one large float32 matmul on this device: the practical ceiling for the model."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: jnp.dot(x, x, precision="highest"))
    return 2 * n**3 / time_calls(lambda: matmul(a), repeats)[1]


def run_torch(h: int, w: int, levels: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """microsoft-aurora's medians (`_torch_model_step.py` in the reference virtualenv)."""
    out = subprocess.run(
        [
            str(reference_python()),
            str(ROOT / "benchmarks" / "_torch_model_step.py"),
            str(h),
            str(w),
            ",".join(map(str, levels)),
            str(repeats),
        ],
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
    parser.add_argument("--mesh", default="1,1", help="data,fsdp mesh for the JAX side (-1 fills)")
    results.add_out_argument(parser)
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))

    device = f"{jax.devices()[0].platform} ({jax.device_count()} device(s)"
    print(
        f"AuroraSmallPretrained, batch 1, history 2, grid {args.h}x{args.w}, {len(levels)} levels, "
        f"{device}, mesh data,fsdp={args.mesh}), float32"
    )
    torch_t = run_torch(args.h, args.w, levels, args.repeats)
    torch_versions = torch_t.pop("versions", None)
    jax_t = run_jax(args.h, args.w, levels, args.repeats, mesh_shape)  # type: ignore[arg-type]
    peak = matmul_peak()
    print(
        f"{'':18} {'microsoft-aurora':>17} {'JAX':>9} {'JAX/PyTorch':>12} {'GFLOP':>7} "
        f"{'floor':>7} {'floor/PyTorch':>14}"
    )
    figures: dict[str, Any] = {
        "matmul_peak_gflops": peak / 1e9,
        "torch_threads": torch_t["threads"],
    }
    for name in ("forward", "forward_backward"):
        floor = jax_t[f"{name}_flops"] / peak
        figures[name] = {
            "torch_s": torch_t[name],
            "jax_s": jax_t[name],
            "jax_over_torch": jax_t[name] / torch_t[name],
            "jax_compile_s": jax_t[f"{name}_compile"],
            "gflop": jax_t[f"{name}_flops"] / 1e9,
            "floor_s": floor,
            "floor_over_torch": floor / torch_t[name],
        }
        print(
            f"{name:18} {torch_t[name]:>16.2f}s {jax_t[name]:>8.2f}s "
            f"{jax_t[name] / torch_t[name]:>12.2f} {jax_t[f'{name}_flops'] / 1e9:>7.0f} "
            f"{floor:>6.2f}s {floor / torch_t[name]:>14.2f}"
        )
    print(
        f"floor = XLA's FLOP count / the float32 matmul peak of this device "
        f"({peak / 1e9:.0f} GFLOP/s, 4096^2): the time a float32 implementation cannot beat on it."
    )
    print(
        f"JAX compilation (one-off): forward {jax_t['forward_compile']:.1f}s, "
        f"forward+backward {jax_t['forward_backward_compile']:.1f}s; "
        f"PyTorch threads: {torch_t['threads']}"
    )
    results.write("model_step", args, figures, extra_versions=torch_versions)


if __name__ == "__main__":
    main()
