"""microsoft-aurora side of benchmarks/model_step.py: runs inside the reference virtualenv and
prints one JSON line (forward and forward+backward medians, their backward/forward ratio as the
median of the rounds', threads, versions) to its caller."""

import json
import statistics
import sys

import torch
from _torch_batch import random_batch  # this script's directory is on sys.path
from results import torch_versions  # benchmarks/results.py
from timing import interleaved_times, median_ratio  # benchmarks/timing.py

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
        model.eval()
        with torch.inference_mode():
            model(b)

    def forward_backward() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        loss(model(b)).backward()

    b = batch()
    times = interleaved_times({"forward": forward, "forward_backward": forward_backward}, repeats)
    results = {name: statistics.median(t) for name, t in times.items()}
    backward = [fb - f for fb, f in zip(times["forward_backward"], times["forward"])]
    results["backward_over_forward"] = median_ratio(backward, times["forward"])
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
