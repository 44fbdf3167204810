"""What the worker processes of `benchmarks/gpu_step.py` share: the job they receive and the lines
they print. Plain Python (no JAX, no PyTorch), imported by both sides.

A worker measures one preset on one side (`jax_side.py`, `torch_side.py`). Its job is one JSON
object in `argv[1]`: `side`, `name` (the preset as printed), `preset` and `kwargs` (how to build
the model), `h`, `w`, `levels`, `repeats`, `forecast_steps`, and `items`, a list of
`[item, estimate_s, latest_end]` in the order to run them, `latest_end` a UNIX time. An item runs
only if its estimate lets it end by `latest_end` (the driver keeps the time budget), else it is
reported skipped; `setup` comes first and every other item needs it. Each item prints one line as
soon as it ends, so the driver keeps what finished even if it has to stop the worker.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

PREFIX = "GPU_STEP_RECORD "
"""Starts the lines the driver reads; anything else a worker prints (logs, warnings) is echoed."""

Item = Callable[[], dict[str, Any]]


def emit(record: dict[str, Any]) -> None:
    """Print one record for the driver."""
    print(PREFIX + json.dumps(record, default=float), flush=True)


def job() -> dict[str, Any]:
    """This worker's job (see the module docstring)."""
    return json.loads(sys.argv[1])


def model_kwargs(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The job's model keyword arguments, JSON lists back to tuples (both models want tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in spec["kwargs"].items()}


def run(spec: Mapping[str, Any], items: Mapping[str, Item]) -> None:
    """Run the job's items in order within their deadlines; one record each.

    Args:
        spec: the job.
        items: what each item name does; returns the item's figures (seconds in `_s` keys, ...).
    """
    ready = False
    for name, estimate, latest_end in spec["items"]:
        record = {
            "side": spec["side"],
            "preset": spec["name"],
            "item": name,
            "estimate_s": estimate,
        }
        if name != "setup" and not ready:
            emit({**record, "status": "skipped", "reason": "no setup"})
            continue
        if time.time() + estimate > latest_end:
            emit({**record, "status": "skipped", "reason": "time budget"})
            continue
        start = time.perf_counter()
        try:
            figures = items[name]()
        except Exception as e:  # one failed item (say, out of memory) leaves the others to run
            traceback.print_exc()
            message = f"{type(e).__name__}: {e}"
            emit({**record, "status": "failed", "error": message[:800]})
            continue
        ready = True
        emit({**record, "status": "done", "wall_s": time.perf_counter() - start, **figures})
