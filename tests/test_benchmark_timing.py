"""benchmarks/timing.py: calls timed in alternating rounds, ratios taken round by round."""

from __future__ import annotations

from benchmarks import timing


def test_calls_alternate_round_by_round_after_one_warm_up_round():
    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("peak", "forward", "backward")}

    times = timing.interleaved_times(calls, repeats=3)

    assert order == ["peak", "forward", "backward"] * 4  # warm-up round + 3 timed rounds
    assert {name: len(t) for name, t in times.items()} == {"peak": 3, "forward": 3, "backward": 3}
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_ratio_is_the_median_of_the_rounds_ratios():
    # The machine four times slower in the second round: two of three rounds give 2, while the
    # ratio of the medians would be 5 / 1.5.
    backward, forward = [2.0, 8.0, 5.0], [1.0, 4.0, 1.5]
    assert timing.median_ratio(backward, forward) == 2.0
