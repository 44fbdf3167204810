"""benchmarks/model_step.py: microsoft-aurora as a worker timed in the same rounds as our model,
and figures whose ratios are taken round by round."""

from __future__ import annotations

import pytest

from benchmarks import model_step


def test_microsoft_aurora_worker_runs_each_pass_on_request():
    with model_step.TorchWorker(16, 32, (100, 850)) as worker:
        assert worker.info["threads"] >= 1
        assert "microsoft-aurora" in worker.info["versions"]
        for call in worker.calls().values():
            call()  # returns once the worker has answered `done`
        with pytest.raises(RuntimeError, match="KeyError: 'sideways'"):
            worker.run("sideways")


def test_ratios_are_taken_round_by_round():
    # The machine is twice as slow in the second round, and microsoft-aurora's forward has a
    # hiccup in the third. Per round, every ratio but the third round's is the same, so each
    # median of them is that ratio; the ratio of the medians would mix rounds (jax / torch
    # forward: 1.1 / 4.0).
    times = {
        "matmul_peak": [1.0, 2.0, 1.1],
        "jax_forward": [1.0, 2.0, 1.1],
        "jax_forward_backward": [3.0, 6.0, 3.3],
        "torch_forward": [2.0, 4.0, 5.0],
        "torch_forward_backward": [4.0, 8.0, 7.0],
    }
    flops = model_step.PEAK_MATMUL_FLOPS
    static = {"forward_flops": flops / 2, "forward_backward_flops": 3 * flops / 2}
    static |= {"forward_compile": 1.0, "forward_backward_compile": 2.0}

    figures = model_step.grid_figures(10, 20, static, times, torch_threads=2)

    assert figures["forward"]["jax_over_torch"] == pytest.approx(0.5)
    assert figures["forward_backward"]["jax_over_torch"] == pytest.approx(0.75)
    assert figures["backward"]["jax_over_torch"] == pytest.approx(1.0)
    assert figures["jax_backward_over_forward"] == pytest.approx(2.0)
    assert figures["torch_backward_over_forward"] == pytest.approx(1.0)
    assert figures["forward"]["floor_over_jax"] == pytest.approx(0.5)
    assert figures["forward_backward"]["floor_over_torch"] == pytest.approx(0.375)
    assert figures["matmul_peak_gflops"] == pytest.approx(flops / 1.1 / 1e9)
    assert figures["jax_forward_backward_us_per_point"] == pytest.approx(1e6 * 3.3 / 200)
