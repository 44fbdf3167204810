"""microsoft-aurora side of benchmarks/model_step.py: runs inside the reference virtualenv as a
worker of its caller, so that both sides are timed in the same rounds.

It builds the model and batch, prints one JSON line (threads, versions), then reads pass names
(`forward`, `forward_backward`) from stdin, one per line, runs that pass and answers `done`. The
caller times each exchange; the pipe adds well under a millisecond to passes of a tenth of a
second and more. Anything else written to stdout goes to stderr, to keep the exchange clean.
"""

import json
import os
import sys

import torch
from _torch_batch import random_batch  # this script's directory is on sys.path
from results import torch_versions  # benchmarks/results.py

from aurora import AuroraSmallPretrained, Batch


def main(h: int, w: int, levels: tuple[int, ...]) -> None:
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    torch.set_num_threads(torch.get_num_threads())
    model = AuroraSmallPretrained()
    gen = torch.Generator().manual_seed(0)
    b = random_batch(h, w, levels, gen, torch.linspace(90, -90, h + 1)[:-1])

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

    passes = {"forward": forward, "forward_backward": forward_backward}
    info = {"threads": torch.get_num_threads(), "versions": torch_versions()}
    print(json.dumps(info), file=answers, flush=True)
    for line in sys.stdin:
        passes[line.strip()]()
        print("done", file=answers, flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), tuple(int(x) for x in sys.argv[3].split(",")))
