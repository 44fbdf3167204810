"""microsoft-aurora side of benchmarks/gpu_step.py; runs in a Python with microsoft-aurora and
prints one JSON line: forward fp32 / bf16-autocast and train-step (autocast + activation
checkpointing) medians, the train step's peak CUDA memory, and torch's and microsoft-aurora's
versions.

    python _torch_gpu_step.py PRESET H W LEVELS REPEATS
"""

import json
import statistics
import sys
import time

import torch
from _torch_batch import random_batch  # this script's directory is on sys.path
from results import torch_versions  # benchmarks/results.py

import aurora

LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)


def main(preset: str, h: int, w: int, n_levels: int, repeats: int) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    levels = LEVELS[:n_levels]
    model = getattr(aurora, preset)().to(device)
    gen = torch.Generator().manual_seed(0)

    def batch() -> aurora.Batch:
        return random_batch(h, w, levels, gen, torch.linspace(90, -90, h)).to(device)

    x = batch()

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    out = {}
    with torch.no_grad():
        model.eval()
        out["forward_fp32_s"] = timed(lambda: model(x))
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            out["forward_bf16_s"] = timed(lambda: model(x))
    model.train()
    model.configure_activation_checkpointing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train() -> None:
        optimizer.zero_grad()
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            pred = model(x)
        loss = sum(
            v.float().abs().mean() for v in [*pred.surf_vars.values(), *pred.atmos_vars.values()]
        )
        loss.backward()
        optimizer.step()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out["train_s"] = timed(train)
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["versions"] = torch_versions()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
