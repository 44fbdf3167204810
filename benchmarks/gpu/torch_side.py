"""microsoft-aurora side of `benchmarks/gpu_step.py`: one preset's items in one process (job:
`worker.py`). Runs in a Python with PyTorch and microsoft-aurora, whose top-level package is also
called `aurora`: the repository root must not be on its path.

    python benchmarks/gpu/torch_side.py JOB_JSON

Items: `setup` (the model built on the device with random weights, a batch of 1), `forward_bf16`
and `forward_fp32` (the model's own `autocast`, which covers the backbone only, on and off),
`forecast` (`aurora.rollout`, bf16) and `train` (bf16, activation checkpointing, AdamW; a loss
over every output). Float32 matmuls run at full precision (`allow_tf32 = False`), as on the JAX
side. Times are medians of `repeats` calls after a first one; `train` reports the peak CUDA memory.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _torch_batch, results

import torch
import worker  # this script's directory
from _torch_batch import random_batch
from results import torch_versions

import aurora  # microsoft-aurora

LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)  # Aurora's 13
GiB = 2**30


class TorchSide:
    """One preset on the grid of the job; items share the model and the batch."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def items(self) -> dict[str, worker.Item]:
        return {
            "setup": self.setup,
            "forward_bf16": lambda: self.forward(bf16=True),
            "forward_fp32": lambda: self.forward(bf16=False),
            "forecast": self.forecast,
            "train": self.train,
        }

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _timed(self, fn: Callable[[], Any]) -> tuple[float, float]:
        """(first call, median of the next `repeats` calls), in seconds."""
        times = []
        for _ in range(1 + self.spec["repeats"]):
            self._sync()
            start = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - start)
        return times[0], statistics.median(times[1:])

    def _autocast(self, on: bool) -> None:
        self.model.autocast = self.model.autocast_backbone = on

    def setup(self) -> dict[str, Any]:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        with torch.device(self.device):  # initialise on the device: no host copy of the weights
            model = getattr(aurora, self.spec["preset"])(**worker.model_kwargs(self.spec))
        self.model = model.to(self.device)  # whatever was made elsewhere
        h = self.spec["h"]
        levels = LEVELS[: self.spec["levels"]]
        gen = torch.Generator().manual_seed(0)
        x = random_batch(h, self.spec["w"], levels, gen, torch.linspace(90, -90, h))
        self.x = x.to(self.device)
        self._sync()
        return {
            "params": sum(p.numel() for p in self.model.parameters()),
            "device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "versions": torch_versions(),
            "microsoft_aurora_from": str(Path(aurora.__file__).parent),
        }

    def forward(self, bf16: bool) -> dict[str, Any]:
        self.model.eval()
        self._autocast(bf16)
        with torch.inference_mode():
            first_s, forward_s = self._timed(lambda: self.model(self.x))
        return {"forward_s": forward_s, "first_call_s": first_s}

    def forecast(self) -> dict[str, Any]:
        self.model.eval()
        self._autocast(True)
        steps = self.spec["forecast_steps"]
        with torch.inference_mode():
            self.model(self.x)  # a first call, as for every other item
            self._sync()
            start = time.perf_counter()
            for _ in aurora.rollout(self.model, self.x, steps=steps):
                pass
            self._sync()
        return {"forecast_s": time.perf_counter() - start, "steps": steps}

    def train(self) -> dict[str, Any]:
        self.model.train()
        self._autocast(True)
        self.model.configure_activation_checkpointing()
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

        def step() -> None:
            optimizer.zero_grad()
            pred = self.model(self.x)
            outputs = [*pred.surf_vars.values(), *pred.atmos_vars.values()]
            loss = sum(v.float().abs().mean() for v in outputs)
            loss.backward()
            optimizer.step()

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        first_s, train_s = self._timed(step)
        figures = {"train_s": train_s, "first_call_s": first_s}
        if self.device == "cuda":
            figures["peak_gib"] = torch.cuda.max_memory_allocated() / GiB
        return figures


def main() -> None:
    spec = worker.job()
    worker.run(spec, TorchSide(spec).items())


if __name__ == "__main__":
    main()
