"""The job end to end: `trainers.run.run` (what `main.py` calls) on the bundled real sample."""

from __future__ import annotations

import csv

import pytest

from configs import demo
from trainers.run import run


@pytest.fixture()
def config():
    config = demo.get_config()
    config.trainer.max_steps = 4
    config.trainer.val_check_interval = 2
    config.trainer.log_every_n_steps = 1
    config.callbacks.checkpoint.every_n_steps = 2
    # A user-written callback, added through the config only (examples/rmse_callback.py).
    config.callbacks.z500_rmse = {
        "type": "examples.rmse_callback:RmseCallback",
        "variable": "z",
        "level": 500,
        "every_n_steps": 2,
    }
    return config


def test_demo_config_trains_validates_checkpoints_and_resumes(config, tmp_path) -> None:
    summary = run(config, tmp_path, "fit")
    assert summary["global_step"] == 4
    assert summary["metrics"]["val/loss"] > 0
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    tags = {r["tag"] for r in rows}
    assert {"train/loss", "val/loss", "train/rmse_z500", "lr"} <= tags
    assert sorted({int(r["step"]) for r in rows if r["tag"] == "train/loss"}) == [1, 2, 3, 4]

    config.trainer.max_steps = 6
    resumed = run(config, tmp_path, "fit")
    assert resumed["global_step"] == 6
    with open(tmp_path / "metrics.csv") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r["tag"] == "train/loss"]
    assert steps == [1, 2, 3, 4, 5, 6], "a resumed run logs no duplicated or missing steps"

    test = run(config, tmp_path, "test")
    assert test["global_step"] == 6 and test["metrics"]["test/loss"] > 0

    # --mode=test also scores rollouts from every initial time against the truth, with baselines.
    evaluation = test["evaluation"]
    assert evaluation["checkpoint_step"] == 6 and evaluation["model_preset"] == "Aurora"
    assert "train" in evaluation["climatology_source"], (
        "the climatology comes from the training period"
    )
    with open(evaluation["scores"]) as f:
        scores = list(csv.DictReader(f))
    assert {r["model"] for r in scores} == {"aurora", "persistence", "climatology"}
    assert {r["lead_time_h"] for r in scores} == {"6"}  # 12 UTC init of the held-back day
    assert all(p.endswith(".png") for p in evaluation["figures"]) and evaluation["figures"]

    # --mode=predict writes one CF netCDF forecast, readable by plain xarray.
    import xarray as xr

    config.eval.figures = False
    predicted = run(config, tmp_path, "predict")
    with xr.open_dataset(predicted["forecast"]) as ds:
        assert (
            ds.sizes["prediction_timedelta"] == 2
            and "z" in ds
            and ds.attrs["Conventions"].startswith("CF")
        )
