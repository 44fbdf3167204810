"""Timing several calls against each other on a machine whose speed drifts.

A shared or virtualised machine speeds up and slows down over minutes (other tenants, memory
reclaim, frequency scaling). Timing all repeats of one call and then all repeats of the next lets
that drift into their ratio: the backward/forward ratio of a model, or a model's time over the
matmul peak, moves with the machine rather than with the code. Timing the calls in rounds, each
call once per round, puts every pair of measurements a few seconds apart; the median over rounds
of a per-round ratio is then a figure of the code.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping


def interleaved_times(
    calls: Mapping[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of each call in each of `repeats` rounds, after one untimed warm-up round.

    Args:
        calls: name -> a call that returns only once its work is done (for JAX, one that blocks
            until its result is ready).
        repeats: Timed rounds.

    Returns:
        dict[str, list[float]]: name -> its time in each round, in round order.
    """
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of `numerators[i] / denominators[i]`."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))
