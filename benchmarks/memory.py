"""Compiled peak memory of one training step, without running it (nothing is allocated).

    .venv/bin/python benchmarks/memory.py [--preset Aurora --h 720 --w 1440 --levels 13]
        [--data 1 --fsdp 8]

Builds the real train step (`RolloutStrategy`, one step, AdamW, the guarded update) for the preset
on the grid, lowers it on abstract inputs (`jax.ShapeDtypeStruct`) with the state donated,
compiles it for the local device and reports XLA's memory plan (`compiled.memory_analysis()`) for
each `--settings` entry: `fp32` (no remat), `bf16` (autocast, float32 master parameters),
`bf16+remat` (Swin blocks and level Perceivers rematerialised, `remat="backbone"` in the Trainer)
and `bf16+remat+stages` (also whole backbone stages, `remat="stages"`).

`peak` = arguments + outputs - aliased (donated) + temporaries: what the device holds during the
step. With `--data`/`--fsdp` the step is compiled as the Trainer compiles it on a mesh of that
shape (the state sharded by `trainers.sharding`'s FSDP rule, one batch row per device, the model's
activation sharding hints in context) and the plan is per device; on a CPU the devices are
simulated. The count of XLA's "Involuntary full rematerialization" warnings (an activation
replicated on every device, then re-split) is reported too: it should be 0.

The CPU backend's plan is only indicative: its matmuls on bf16 operands produce float32
results, so bf16 plans come out too high there. Writes a result file (`benchmarks/results.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

# The CPU backend's default scheduler orders for concurrency and keeps recomputed activations alive
# far longer than needed (remat then saved nothing); its memory-optimised scheduler is the one
# comparable with an accelerator's memory-bounded schedule. No effect on GPU.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
).strip()


def _mesh_devices(argv: list[str]) -> int:
    """data x fsdp from the command line, read before JAX starts (it fixes the device count)."""
    sizes = {"--data": 1, "--fsdp": 1}
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name in sizes:
            sizes[name] = int(value or argv[i + 1])
    return sizes["--data"] * sizes["--fsdp"]


if _mesh_devices(sys.argv) > 1 and "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""
):  # simulated CPU devices; no effect on an accelerator
    os.environ["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={_mesh_devices(sys.argv)}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aurora  # noqa: E402
from aurora.batch import Batch, Metadata  # noqa: E402
from aurora.variables import AURORA_LEVELS  # noqa: E402
from benchmarks import results  # noqa: E402
from trainers import sharding  # noqa: E402
from trainers.strategies.rollout import RolloutStrategy  # noqa: E402

OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
)
GiB = 2**30


def abstract_batch(
    model: aurora.Aurora,
    h: int,
    w: int,
    levels: tuple[int, ...],
    history: int,
    lead: int = 0,
    rows: int = 1,
) -> Batch:
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    lead_axis = (lead,) if lead else ()
    return Batch(
        surf_vars={v: f32(*lead_axis, rows, history, h, w) for v in model.surf_vars},
        static_vars={v: f32(*lead_axis, h, w) for v in model.static_vars},
        atmos_vars={v: f32(*lead_axis, rows, history, len(levels), h, w) for v in model.atmos_vars},
        metadata=Metadata(
            lat=tuple(np.linspace(90, -90, h).tolist()),
            lon=tuple(np.linspace(0, 360, w, endpoint=False).tolist()),
            time=jax.ShapeDtypeStruct((*lead_axis, rows), jnp.int32),
            atmos_levels=levels,
            rollout_step=jax.ShapeDtypeStruct(lead_axis, jnp.int32),
        ),
    )


def plan(
    preset: str,
    h: int,
    w: int,
    levels: tuple[int, ...],
    setting: str,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, float]:
    parts = setting.split("+")
    if parts[0] not in ("fp32", "bf16") or not set(parts[1:]) <= {"remat", "stages"}:
        raise ValueError(f"Unknown setting {setting!r}: fp32 or bf16, then +remat and +stages.")
    autocast, remat, stages = parts[0] == "bf16", "remat" in parts, "stages" in parts
    model = aurora.PRESETS[preset](
        use_lora=False, autocast=autocast, remat=remat or stages, remat_stages=stages
    )
    strategy = RolloutStrategy(model, steps=1)
    tx, _ = strategy.make_optimizer(OPTIM, None)
    rows = 1 if mesh is None else mesh.size
    inputs = abstract_batch(model, h, w, levels, history=2, rows=rows)
    state = jax.eval_shape(lambda: strategy.init_state(jax.random.PRNGKey(0), _zeros(inputs), tx))
    targets = abstract_batch(model, h, w, levels, history=1, lead=1, rows=rows)
    start = time.perf_counter()
    step, kwargs = strategy.train_step, {}
    if mesh is not None:  # as the Trainer compiles it on a mesh
        batch = sharding.batch_shardings((inputs, targets), mesh)
        state_shardings = sharding.state_shardings(state, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        kwargs = {
            "in_shardings": (state_shardings, batch, replicated),
            "out_shardings": (state_shardings, replicated),
        }
        step = sharding.in_mesh(step, mesh)
    with _count_involuntary_rematerialisations() as warnings:
        lowered = jax.jit(step, donate_argnums=(0,), **kwargs).lower(
            state, (inputs, targets), strategy.default_controls()
        )
        compiled = lowered.compile()
    memory = compiled.memory_analysis()
    peak = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    return {
        "params": params,
        "devices": rows,
        "arguments_gib": memory.argument_size_in_bytes / GiB,
        "temp_gib": memory.temp_size_in_bytes / GiB,
        "peak_gib": peak / GiB,
        "involuntary_rematerializations": warnings[0],
        "compile_s": time.perf_counter() - start,
    }


@contextlib.contextmanager
def _count_involuntary_rematerialisations() -> Iterator[list[int]]:
    """Count XLA's "Involuntary full rematerialization" warnings written to stderr meanwhile.

    XLA writes them from C++ to file descriptor 2, so the descriptor itself is redirected to a file
    and copied back to stderr afterwards.
    """
    count = [0]
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield count
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            text = log.read().decode(errors="replace")
            sys.stderr.write(text)
            count[0] = text.count("Involuntary full rematerialization")


def _zeros(batch: Batch) -> Batch:
    return jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="Aurora")
    parser.add_argument(
        "--h", type=int, default=720, help="latitudes after the model's crop (721 -> 720)"
    )
    parser.add_argument("--w", type=int, default=1440)
    parser.add_argument("--levels", type=int, default=13, help="the first N of Aurora's 13 levels")
    parser.add_argument("--settings", default="fp32,bf16,bf16+remat,bf16+remat+stages")
    parser.add_argument("--data", type=int, default=1, help="data-parallel mesh axis")
    parser.add_argument("--fsdp", type=int, default=1, help="FSDP mesh axis")
    results.add_out_argument(parser)
    args = parser.parse_args()
    levels = AURORA_LEVELS[: args.levels]
    device = jax.devices()[0].device_kind
    mesh = None
    where = f"batch 1, one device: {device}"
    if args.data * args.fsdp > 1:
        mesh = sharding.make_mesh(data=args.data, fsdp=args.fsdp)
        where = (
            f"batch {mesh.size}, mesh data={args.data} x fsdp={args.fsdp} of {device}, per device"
        )
    print(f"{args.preset}, {args.h}x{args.w}, {len(levels)} levels, {where}")
    rows = {}
    for setting in args.settings.split(","):
        rows[setting] = row = plan(args.preset, args.h, args.w, levels, setting, mesh)
        print(
            f"{setting:<18} params {row['params'] / 1e9:.3f} B  "
            f"arguments {row['arguments_gib']:6.2f} GiB  temp {row['temp_gib']:6.2f} GiB  "
            f"peak {row['peak_gib']:6.2f} GiB  involuntary rematerialisations "
            f"{row['involuntary_rematerializations']}  (compile {row['compile_s']:.0f} s)",
            flush=True,
        )
    results.write(
        "memory",
        args,
        {"levels": list(levels), "mesh": {"data": args.data, "fsdp": args.fsdp}, "settings": rows},
    )


if __name__ == "__main__":
    main()
