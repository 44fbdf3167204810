"""Forward and forward+backward time of AuroraSmall: our JAX model vs microsoft-aurora, same run.

    .venv/bin/python benchmarks/model_step.py [--h 64 --w 128 | --grids 32x64,64x128,128x256]
        [--levels 100,250,500,850 --repeats 3 --mesh 1,1 --skip-torch]

Both sides build AuroraSmallPretrained with random weights on the same grid and batch shape (1
sample, 2 history steps), run one warm-up, then report the median of `--repeats` timed calls. JAX
is jitted (compiled ahead of the warm-up, compilation reported separately); the backward pass is
`jax.grad` of the same scalar loss as PyTorch's `.backward()` (sum of the mean of every output).
The PyTorch side runs in the reference virtualenv (see tests/reference/venv.py), as a worker
process that runs one pass per request. Both sides are timed in the same rounds
(`benchmarks/timing.py`): per round, the matmul that sets the floor, our forward and
forward+backward, then microsoft-aurora's. Every ratio (JAX/PyTorch, backward/forward, floor/JAX)
is the median of the rounds' ratios, so that the machine's drift over a run does not enter it.

The JAX side goes through the Trainer's sharding code (`--mesh`, default one device). The `floor`
column divides XLA's FLOP count of the step by the float32 rate of one large matmul on the device,
timed in the same rounds: a float32 step cannot run faster than that, whatever the framework,
which puts speed-up targets against PyTorch in proportion. Writes a result file
(`benchmarks/results.py`).

Per grid it also reports the backward pass alone (forward+backward minus forward) over the
forward, and the forward+backward time per grid point: with `--grids`, several grids in one run,
so that a cost growing faster than the grid shows as a growing time per point. `--skip-torch`
times the JAX side only.

Both sides run on the allocator this process was started with (the PyTorch side inherits
`LD_PRELOAD`), and the header and the result file name it. Start it through jemalloc as `make`
does (`LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2
MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`): on glibc's allocator every step page-faults
XLA:CPU's large buffers in afresh, which is a cost of the machine's set-up, not of the model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TORCH_WORKER = ROOT / "benchmarks" / "_torch_model_step.py"
sys.path.insert(0, str(ROOT))

import aurora  # noqa: E402
from aurora.variables import ATMOS_VARS, STATIC_VARS, SURF_VARS  # noqa: E402
from benchmarks import results, timing  # noqa: E402
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


def jax_side(
    h: int, w: int, levels: tuple[int, ...], mesh_shape: tuple[int, int]
) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """The JAX side's compiled calls (`matmul_peak`, `jax_forward`, `jax_forward_backward`) and
    their compile times and FLOP counts. The model goes through the Trainer's sharding path:
    parameters placed with `state_shardings`, the batch with `example_shardings`, both jitted
    with in/out shardings."""
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
    static: dict[str, float] = {}
    calls: dict[str, Callable[[], object]] = {"matmul_peak": peak_matmul_call()}
    with jax.default_matmul_precision("highest"):
        for name, fn in (("forward", forward), ("forward_backward", grad)):
            compiled, static[f"{name}_compile"] = compile_timed(fn, params, batch)
            static[f"{name}_flops"] = flops(compiled)
            calls[f"jax_{name}"] = lambda c=compiled: jax.block_until_ready(c(params, batch))
    return calls, static


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


PEAK_MATMUL_SIZE = 4096
PEAK_MATMUL_FLOPS = 2 * PEAK_MATMUL_SIZE**3


def peak_matmul_call() -> Any:
    """One large float32 matmul on this device, blocking: its FLOP/s are the practical ceiling
    for the model."""
    n = PEAK_MATMUL_SIZE
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(lambda x: jnp.dot(x, x, precision="highest")).lower(a).compile()
    return lambda: jax.block_until_ready(matmul(a))


class TorchWorker:
    """microsoft-aurora on the same grid in the reference virtualenv (`_torch_model_step.py`),
    running one pass per request, so that its passes are timed in the same rounds as ours."""

    def __init__(self, h: int, w: int, levels: tuple[int, ...]) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in __exit__)
        self._process = subprocess.Popen(
            [
                str(reference_python()),
                str(TORCH_WORKER),
                str(h),
                str(w),
                ",".join(map(str, levels)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            cwd="/tmp",
        )
        self.info: dict[str, Any] = json.loads(self._answer())

    def _answer(self) -> str:
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            self._stderr.seek(0)
            raise RuntimeError(f"{TORCH_WORKER} exited early:\n{self._stderr.read()[-4000:]}")
        return line.strip()

    def run(self, name: str) -> None:
        """Runs the pass `name` (`forward` or `forward_backward`) and returns when it is done."""
        assert self._process.stdin is not None
        self._process.stdin.write(name + "\n")
        self._process.stdin.flush()
        if (answer := self._answer()) != "done":
            raise RuntimeError(f"{TORCH_WORKER} answered {answer!r} to {name!r}")

    def calls(self) -> dict[str, Callable[[], object]]:
        """`torch_forward` and `torch_forward_backward`, for `timing.interleaved_times`."""
        return {
            f"torch_{name}": partial(self.run, name) for name in ("forward", "forward_backward")
        }

    def __enter__(self) -> TorchWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        self._process.wait(timeout=60)
        self._stderr.close()


def parse_grids(text: str) -> list[tuple[int, int]]:
    """`"32x64,64x128"` -> `[(32, 64), (64, 128)]`."""
    return [tuple(int(n) for n in g.split("x")) for g in text.split(",")]  # type: ignore[misc]


def grid_figures(
    h: int,
    w: int,
    static: dict[str, float],
    times: dict[str, list[float]],
    torch_threads: int | None = None,
) -> dict[str, Any]:
    """The figures of one grid from its rounds: per pass (forward, forward+backward, backward
    alone) both sides' medians, the float32 floor, and the ratios between them, each the median
    of the rounds' ratios; backward/forward ratios; time per grid point; the matmul peak."""

    def rounds(side: str, name: str) -> list[float]:
        if name != "backward":
            return times[f"{side}_{name}"]
        return [
            fb - f for fb, f in zip(times[f"{side}_forward_backward"], times[f"{side}_forward"])
        ]

    torch = "torch_forward" in times
    peak = [PEAK_MATMUL_FLOPS / t for t in times["matmul_peak"]]
    flop = {name: static[f"{name}_flops"] for name in ("forward", "forward_backward")}
    flop["backward"] = flop["forward_backward"] - flop["forward"]
    figures: dict[str, Any] = {}
    for name in ("forward", "forward_backward", "backward"):
        jax_s, floor = rounds("jax", name), [flop[name] / p for p in peak]
        entry = {
            "jax_s": statistics.median(jax_s),
            "gflop": flop[name] / 1e9,
            "floor_s": statistics.median(floor),
            "floor_over_jax": timing.median_ratio(floor, jax_s),
        }
        if name != "backward":
            entry["jax_compile_s"] = static[f"{name}_compile"]
        if torch:
            torch_s = rounds("torch", name)
            entry.update(
                torch_s=statistics.median(torch_s),
                jax_over_torch=timing.median_ratio(jax_s, torch_s),
                floor_over_torch=timing.median_ratio(floor, torch_s),
            )
        figures[name] = entry
    figures["matmul_peak_gflops"] = statistics.median(peak) / 1e9
    sides = ("jax", "torch") if torch else ("jax",)
    for side in sides:
        figures[f"{side}_backward_over_forward"] = timing.median_ratio(
            rounds(side, "backward"), rounds(side, "forward")
        )
        fb_s = figures["forward_backward"][f"{side}_s"]
        figures[f"{side}_forward_backward_us_per_point"] = 1e6 * fb_s / (h * w)
    if torch:
        figures["torch_threads"] = torch_threads
    return figures


def print_grid(h: int, w: int, figures: dict[str, Any]) -> None:
    """One grid's table: passes as rows, both sides, their ratio, the floor and its ratios."""
    torch = "torch_s" in figures["forward"]
    print(f"grid {h}x{w} (matmul peak in its rounds: {figures['matmul_peak_gflops']:.0f} GFLOP/s)")
    print(
        f"  {'':18} {'microsoft-aurora':>17} {'JAX':>9} {'JAX/PyTorch':>12} {'GFLOP':>7} "
        f"{'floor':>7} {'floor/PyTorch':>14} {'floor/JAX':>10}"
    )
    for name in ("forward", "forward_backward", "backward"):
        f = figures[name]
        t = (f"{f['torch_s']:>16.2f}s", f"{f['jax_over_torch']:>12.2f}") if torch else ("-", "-")
        ratio = f"{f['floor_over_torch']:>14.2f}" if torch else f"{'-':>14}"
        print(
            f"  {name:18} {t[0]:>17} {f['jax_s']:>8.2f}s {t[1]:>12} {f['gflop']:>7.0f} "
            f"{f['floor_s']:>6.2f}s {ratio} {f['floor_over_jax']:>10.2f}"
        )
    line = f"  backward/forward (median of rounds): JAX {figures['jax_backward_over_forward']:.2f}"
    if torch:
        line += f", PyTorch {figures['torch_backward_over_forward']:.2f}"
    line += (
        f"; forward+backward per grid point: JAX "
        f"{figures['jax_forward_backward_us_per_point']:.1f} us"
    )
    if torch:
        line += f", PyTorch {figures['torch_forward_backward_us_per_point']:.1f} us"
    print(line)
    compile_s = (figures["forward"]["jax_compile_s"], figures["forward_backward"]["jax_compile_s"])
    print(f"  JAX compilation (one-off): forward {compile_s[0]:.1f}s, fwd+bwd {compile_s[1]:.1f}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--h", type=int, default=64)
    parser.add_argument("--w", type=int, default=128)
    parser.add_argument(
        "--grids",
        default=None,
        help="grids HxW to sweep, e.g. 32x64,64x128,128x256 (overrides --h/--w)",
    )
    parser.add_argument("--levels", default="100,250,500,850")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mesh", default="1,1", help="data,fsdp mesh for the JAX side (-1 fills)")
    parser.add_argument("--skip-torch", action="store_true", help="time the JAX side only")
    results.add_out_argument(parser)
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    mesh_shape = tuple(int(x) for x in args.mesh.split(","))
    grids = parse_grids(args.grids) if args.grids else [(args.h, args.w)]

    device = f"{jax.devices()[0].platform} ({jax.device_count()} device(s)"
    print(
        f"AuroraSmallPretrained, batch 1, history 2, {len(levels)} levels, {device}, "
        f"mesh data,fsdp={args.mesh}), float32, {results.allocator()} allocator"
    )
    figures: dict[str, Any] = {"grids": {}}
    torch_versions = None
    for h, w in grids:
        calls, static = jax_side(h, w, levels, mesh_shape)  # type: ignore[arg-type]
        with contextlib.ExitStack() as stack:
            torch_threads = None
            if not args.skip_torch:
                worker = stack.enter_context(TorchWorker(h, w, levels))
                calls.update(worker.calls())
                torch_versions, torch_threads = worker.info["versions"], worker.info["threads"]
            times = timing.interleaved_times(calls, args.repeats)
        grid = grid_figures(h, w, static, times, torch_threads)
        figures["grids"][f"{h}x{w}"] = grid
        print_grid(h, w, grid)
    if len(grids) == 1:  # the single-grid layout of earlier result files
        figures.update(figures.pop("grids")[f"{grids[0][0]}x{grids[0][1]}"])
    else:
        print("forward+backward per grid point (us):")
        for key, grid in figures["grids"].items():
            torch_us = grid.get("torch_forward_backward_us_per_point")
            print(
                f"  {key:>9}: JAX {grid['jax_forward_backward_us_per_point']:6.1f}"
                + (f", PyTorch {torch_us:6.1f}" if torch_us is not None else "")
            )
    print(
        f"floor = XLA's FLOP count / the float32 matmul peak of this device "
        f"({PEAK_MATMUL_SIZE}^2, timed in each grid's rounds): the time a float32 implementation "
        "cannot beat on it."
    )
    results.write("model_step", args, figures, extra_versions=torch_versions)


if __name__ == "__main__":
    main()
