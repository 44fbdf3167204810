"""JAX side of `benchmarks/gpu_step.py`: one preset's items in one process (job: `worker.py`).

    python benchmarks/gpu/jax_side.py JOB_JSON

Items: `setup` (random parameters and a batch of 1 on the grid), `train_stages` and
`train_backbone` (the Trainer's `RolloutStrategy` step, one step, AdamW, bf16-mixed, with
`remat="stages"` / `"backbone"`, state donated), `forward_fp32` and `forward_bf16` (one forecast
step: the forward pass and the history slide), `forecast` (`forecast_steps` of them, bf16).

Every matmul runs at full float32 precision (`jax_default_matmul_precision="highest"`; the
model's own `precision` is "highest" too): no TF32 on the float32 paths, bfloat16 where
`autocast` computes in it. Times are medians of `repeats` calls after a first one, compiled ahead
of time (`compile_s` apart). The train steps report XLA's memory plan (`plan_*`) and the device's
measured peak so far (`peak_gib`, where the backend keeps statistics): `train_stages` runs first,
so its peak is its own.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import aurora  # noqa: E402
from aurora.batch import Batch  # noqa: E402
from aurora.rollout import advance_batch  # noqa: E402
from aurora.variables import AURORA_LEVELS  # noqa: E402
from benchmarks.gpu import worker  # noqa: E402
from benchmarks.model_step import compile_timed, flops, time_calls  # noqa: E402
from tests.helpers import random_batch  # noqa: E402
from trainers.state import TrainState  # noqa: E402
from trainers.strategies.rollout import RolloutStrategy  # noqa: E402
from trainers.trainer import _to_device_batch  # noqa: E402

OPTIM = ml_collections.ConfigDict(
    {"learning_rate": 1e-4, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0}
)
GiB = 2**30


def device_memory() -> dict[str, float]:
    """The device's peak and current use so far, in GiB; empty where the backend keeps none."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        return {}
    return {
        "peak_gib": stats["peak_bytes_in_use"] / GiB,
        "in_use_gib": stats.get("bytes_in_use", 0) / GiB,
        "limit_gib": stats.get("bytes_limit", 0) / GiB,
    }


def memory_plan(compiled: jax.stages.Compiled) -> dict[str, float]:
    """XLA's plan for one call: arguments, temporaries and the peak (arguments + outputs -
    donated + temporaries, as `benchmarks/memory.py`), in GiB."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return {
        "plan_arguments_gib": m.argument_size_in_bytes / GiB,
        "plan_temp_gib": m.temp_size_in_bytes / GiB,
        "plan_peak_gib": peak / GiB,
    }


class JaxSide:
    """One preset on the grid of the job; items share the parameters, the batch and the state."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.model = aurora.PRESETS[spec["preset"]](**worker.model_kwargs(spec))
        self.batch: tuple[Batch, Batch] | None = None
        self.state: TrainState | None = None
        self._params: Any = None
        self._steps: dict[bool, tuple[Any, float]] = {}
        self._forward_flops: float | None = None

    @property
    def params(self) -> Any:
        """The current parameters (the train items donate the state they started from)."""
        return self.state.params if self.state is not None else self._params

    def items(self) -> dict[str, worker.Item]:
        return {
            "setup": self.setup,
            "train_stages": lambda: self.train("stages"),
            "train_backbone": lambda: self.train("backbone"),
            "forward_fp32": lambda: self.forward(autocast=False),
            "forward_bf16": lambda: self.forward(autocast=True),
            "forecast": self.forecast,
        }

    def setup(self) -> dict[str, Any]:
        levels = AURORA_LEVELS[: self.spec["levels"]]
        h, w = self.spec["h"], self.spec["w"]
        inputs = random_batch(self.model, batch=1, h=h, w=w, levels=levels)
        target = random_batch(self.model, batch=1, history=1, h=h, w=w, levels=levels, seed=1)
        self.batch = jax.device_put(_to_device_batch((inputs, [target])))
        self._params = jax.jit(self.model.init)(jax.random.PRNGKey(0), self.batch[0])["params"]
        jax.block_until_ready(self._params)
        self.start = self.batch[0].crop(self.model.patch_size)  # as every forecast step sees it
        return {
            "params": sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self._params)),
            "device": jax.devices()[0].device_kind,
            "backend": jax.default_backend(),
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "jax": jax.__version__,
            "ml_collections_from": str(Path(ml_collections.__file__).parent),
            **device_memory(),
        }

    def forward_flops(self) -> float | None:
        """XLA's FLOP count of one forward pass (float32 model, nothing recomputed), from the
        lowered program: no compilation."""
        if self._forward_flops is None:
            fn = jax.jit(lambda p, b: self.model.apply({"params": p}, b))
            try:
                analysis = fn.lower(self.params, self.start).cost_analysis()
            except Exception as e:  # an estimate only: never worth losing a timing for
                print(f"no FLOP count of the forward pass: {e}", flush=True)
                return None
            if isinstance(analysis, list):
                analysis = analysis[0] if analysis else None
            self._forward_flops = float(analysis["flops"]) if analysis else None
        return self._forward_flops

    def train(self, remat: str) -> dict[str, Any]:
        strategy = RolloutStrategy(self.model, steps=1).with_model_options(
            precision="bf16-mixed", remat=remat
        )
        tx, _ = strategy.make_optimizer(OPTIM, None)
        if self.state is None:
            self.state = strategy.init_state(jax.random.PRNGKey(0), self.batch[0], tx, self.params)
        controls = strategy.default_controls()
        step = jax.jit(strategy.train_step, donate_argnums=(0,))
        compiled, compile_s = compile_timed(step, self.state, self.batch, controls)

        def call() -> jax.Array:
            self.state, metrics = compiled(self.state, self.batch, controls)
            return metrics["loss"]

        first_s, train_s = time_calls(call, self.spec["repeats"])
        return {
            "train_s": train_s,
            "first_call_s": first_s,
            "compile_s": compile_s,
            "train_flops_xla": flops(compiled),
            "forward_flops": self.forward_flops(),
            **memory_plan(compiled),
            **device_memory(),
        }

    def _step(self, autocast: bool) -> tuple[Any, float]:
        """One forecast step (forward pass, then the history slide) compiled for the start batch,
        and its compile time (0 once compiled)."""
        if autocast not in self._steps:
            model = self.model.clone(autocast=autocast)
            fn = jax.jit(lambda p, x: advance_batch(x, model.apply({"params": p}, x)))
            compiled, compile_s = compile_timed(fn, self.params, self.start)
            self._steps[autocast] = (compiled, compile_s)
            return compiled, compile_s
        return self._steps[autocast][0], 0.0

    def forward(self, autocast: bool) -> dict[str, Any]:
        compiled, compile_s = self._step(autocast)
        first_s, forward_s = time_calls(
            lambda: compiled(self.params, self.start), self.spec["repeats"]
        )
        return {
            "forward_s": forward_s,
            "first_call_s": first_s,
            "compile_s": compile_s,
            "forward_flops": flops(compiled),
            **device_memory(),
        }

    def forecast(self) -> dict[str, Any]:
        compiled, compile_s = self._step(autocast=True)
        params, x = self.params, self.start
        jax.block_until_ready(compiled(params, x))  # a first call, as for every other item
        start = time.perf_counter()
        for _ in range(self.spec["forecast_steps"]):
            x = compiled(params, x)
        jax.block_until_ready(x)
        return {
            "forecast_s": time.perf_counter() - start,
            "steps": self.spec["forecast_steps"],
            "compile_s": compile_s,
            **device_memory(),
        }


def main() -> None:
    jax.config.update("jax_default_matmul_precision", "highest")
    spec = worker.job()
    worker.run(spec, JaxSide(spec).items())


if __name__ == "__main__":
    main()
