"""microsoft-aurora side of benchmarks/model_step.py: runs inside the reference virtualenv and
prints one JSON line (forward and forward+backward medians, threads, versions) to its caller."""

import json
import statistics
import sys
import time

import torch
from _torch_batch import random_batch  # this script's directory is on sys.path
from results import torch_versions  # benchmarks/results.py

from aurora import AuroraSmallPretrained, Batch


def main(h: int, w: int, levels: tuple[int, ...], repeats: int) -> None:
    torch.set_num_threads(torch.get_num_threads())
    model = AuroraSmallPretrained()
    gen = torch.Generator().manual_seed(0)

    def batch() -> Batch:
        return random_batch(h, w, levels, gen, torch.linspace(90, -90, h + 1)[:-1])

    def loss(pred: Batch) -> torch.Tensor:
        return sum(v.mean() for v in [*pred.surf_vars.values(), *pred.atmos_vars.values()])

    def forward() -> None:
        with torch.inference_mode():
            model(b)

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        loss(model(b)).backward()

    b = batch()
    results = {}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
        model.eval() if name == "forward" else model.train()
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results[name] = statistics.median(times)
    results["threads"] = torch.get_num_threads()
    results["versions"] = torch_versions()
    print(json.dumps(results))


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        tuple(int(x) for x in sys.argv[3].split(",")),
        int(sys.argv[4]),
    )
