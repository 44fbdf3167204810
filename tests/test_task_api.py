"""The user task API: loss, optimiser and model by name (config), and a non-Aurora model trained
through `main.py` (examples/configs/custom_task.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from aurora.batch import Batch, Metadata
from configs import default
from examples.tiny_model import PerVariableConv
from tests.helpers import ROOT, run_main
from trainers.checkpointing import load_params
from trainers.data import InMemoryData
from trainers.loss import Loss, LossConfig, aurora_loss
from trainers.models import configure_model
from trainers.optim import make_optimizer
from trainers.run import build_loss, build_model, build_strategy
from trainers.strategies.replay import ReplayStrategy
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

LAT = np.array([75.0, 25.0, -25.0, -75.0])
LEVELS = (500.0, 850.0)
# Locations and scales away from (0, 1), so that a loss on unnormalised values fails the tests.
STATS = {"a": (10.0, 2.0), "b": (-3.0, 0.5), "c_500": (100.0, 4.0), "c_850": (50.0, 8.0)}


def _batch(seed: int, history: int = 1, batch: int = 2) -> Batch:
    """Surface variables a, b and the atmospheric variable c on 4 x 8 points, 2 levels."""
    rng = np.random.default_rng(seed)
    field = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return Batch(
        surf_vars={
            "a": 10 + 2 * field(batch, history, 4, 8),
            "b": -3 + field(batch, history, 4, 8),
        },
        static_vars={},
        atmos_vars={
            "c": np.array([100.0, 50.0])[:, None, None] + 8 * field(batch, history, 2, 4, 8)
        },
        metadata=Metadata(
            lat=LAT,
            lon=np.arange(8) * 45.0,
            time=(np.datetime64("2020-01-01T00:00"),) * batch,
            atmos_levels=LEVELS,
        ),
    )


def _normalised(batch: Batch) -> dict[str, np.ndarray]:
    """The fields normalised by hand, atmospheric ones `(b, t, C, h, w)`."""
    out = {v: (np.asarray(x) - STATS[v][0]) / STATS[v][1] for v, x in batch.surf_vars.items()}
    location = np.array([STATS["c_500"][0], STATS["c_850"][0]])[:, None, None]
    scale = np.array([STATS["c_500"][1], STATS["c_850"][1]])[:, None, None]
    out["c"] = (np.asarray(batch.atmos_vars["c"]) - location) / scale
    return out


def _lat_weights() -> np.ndarray:
    w = np.cos(np.deg2rad(LAT))
    return (w / w.mean())[:, None]  # (h, 1), mean 1


# --- losses ---------------------------------------------------------------------------------------
def test_the_default_loss_is_auroras_weighted_mae_computed_by_hand() -> None:
    pred, target = _batch(0), _batch(1)
    p, t = _normalised(pred), _normalised(target)
    weights = {"a": 2.0, "b": 0.5}
    level_weights = np.array([3.0, 1.0])  # c at 500 hPa weighs 3
    alpha, beta, gamma = 0.25, 1.0, 2.0
    surf = sum(w * np.abs(p[v] - t[v]).mean() for v, w in weights.items())
    atmos = (level_weights * np.abs(p["c"] - t["c"]).mean(axis=(0, 1, 3, 4))).mean()
    expected = gamma / 3 * (alpha * surf + beta * atmos)

    config = {
        "surf_weights": weights,
        "atmos_weights": {"c": {500: 3.0}},
        "alpha": alpha,
        "beta": beta,
        "gamma": gamma,
    }
    loss = Loss.from_config(config)  # no name: "aurora", the weight fields its arguments
    value, terms = loss(pred, target, STATS)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    np.testing.assert_allclose(float(terms["mae/c"]), np.abs(p["c"] - t["c"]).mean(), rtol=1e-6)
    # ... and it is today's aurora_loss, whatever route the weights take.
    legacy, _ = aurora_loss(pred, target, LossConfig(**config), STATS)
    assert float(Loss.of(LossConfig(**config))(pred, target, STATS)[0]) == float(legacy)
    assert float(legacy) == float(value)


@pytest.mark.parametrize(
    "name, error, tag", [("lat_mae", np.abs, "mae"), ("lat_mse", np.square, "mse")]
)
def test_latitude_weighted_losses_match_a_hand_computation(name, error, tag) -> None:
    pred, target = _batch(0), _batch(1)
    p, t = _normalised(pred), _normalised(target)
    lat = _lat_weights()
    per_var = {v: (lat * error(p[v] - t[v])).mean() for v in ("a", "b")}
    per_level = (lat * error(p["c"] - t["c"])).mean(axis=(0, 1, 3, 4))
    per_var["c"] = per_level.mean()
    # weights: a x 2, c at 850 hPa x 4 (500 hPa 1), b 1
    expected = (2 * per_var["a"] + per_var["b"] + (np.array([1.0, 4.0]) * per_level).mean()) / 3

    kwargs = {"surf_weights": {"a": 2.0}, "atmos_weights": {"c": {850: 4.0}}}
    value, terms = Loss.from_config({"name": name, "kwargs": kwargs})(pred, target, STATS)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)
    for v in ("a", "b", "c"):
        np.testing.assert_allclose(float(terms[f"{tag}/{v}"]), per_var[v], rtol=1e-6)
    # The poles count less than the tropics: an error only at 75 N costs less than at 25 N.
    polar, tropical = _batch(0), _batch(0)
    polar.surf_vars["a"][:, :, 0] += 1.0
    tropical.surf_vars["a"][:, :, 1] += 1.0
    lossfn = Loss.from_config({"name": name})
    assert float(lossfn(polar, target, STATS)[0]) != float(lossfn(tropical, target, STATS)[0])


def scaled_mae(pred: Batch, target: Batch, stats, *, scale: float = 1.0):
    """A user loss for `test_a_loss_by_import_path_gets_its_kwargs`."""
    error = jnp.mean(jnp.abs(pred.surf_vars["a"] - target.surf_vars["a"]))
    return scale * error, {"error": error}


def test_a_loss_by_import_path_gets_its_kwargs() -> None:
    pred, target = _batch(0), _batch(1)
    config = ml_collections.ConfigDict(
        {"name": "tests.test_task_api:scaled_mae", "kwargs": {"scale": 3.0}, "lead_weights": ()}
    )
    config.alpha = 0.1  # an "aurora" field: not passed to other losses
    loss = build_loss(ml_collections.ConfigDict({"loss": config}))
    value, terms = loss(pred, target, None)
    mae = np.abs(np.asarray(pred.surf_vars["a"]) - np.asarray(target.surf_vars["a"])).mean()
    np.testing.assert_allclose([float(value), float(terms["error"])], [3 * mae, mae], rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown config.loss.name 'mea'"):
        Loss.from_config({"name": "mea"})


def _rollout_example(k: int = 2, seed: int = 0):
    """(inputs with history 2, k targets 6 h apart) of random fields."""
    series = _batch(seed, history=2 + k, batch=1)
    take = lambda lo, hi: series.replace(
        surf_vars={v: x[:, lo:hi] for v, x in series.surf_vars.items()},
        atmos_vars={v: x[:, lo:hi] for v, x in series.atmos_vars.items()},
    )
    later = lambda i: series.metadata.replace(time=series.metadata.time + 360 * i)
    return take(0, 2), [take(2 + i, 3 + i).replace(metadata=later(i + 1)) for i in range(k)]


def test_lead_weights_weigh_the_rollout_steps() -> None:
    from trainers.trainer import _to_device_batch

    model = PerVariableConv(surf_vars=("a", "b"), atmos_vars=("c",), surf_stats=STATS)
    inputs, targets = _to_device_batch(_rollout_example())
    params = model.init(jax.random.PRNGKey(0), inputs)["params"]
    params = jax.tree_util.tree_map(lambda x: x + 0.1, params)  # not persistence
    strategy = RolloutStrategy(model, steps=2, loss=Loss(lead_weights=(1.0, 3.0)), remat=False)
    loss, metrics = strategy.loss_fn(params, inputs, targets, {})
    step1, step2 = float(metrics["loss/step1"]), float(metrics["loss/step2"])
    assert step1 != pytest.approx(step2)
    np.testing.assert_allclose(float(loss), (step1 + 3 * step2) / 4, rtol=1e-6)

    with pytest.raises(ValueError, match="2 weights for 3 rollout step"):
        RolloutStrategy(model, steps=3, loss=Loss(lead_weights=(1.0, 3.0)))
    with pytest.raises(ValueError, match="replay makes one step"):
        ReplayStrategy(model, loss=Loss(lead_weights=(1.0,)))
    with pytest.raises(ValueError, match="lead_weights must be >= 0"):
        Loss(lead_weights=(1.0, -1.0))


# --- optimisers -----------------------------------------------------------------------------------
GRADS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(3.0)}
PARAMS = {"w": jnp.zeros(3), "b": jnp.array(1.0)}


def _first_update(config: dict) -> dict:
    tx, _ = make_optimizer(ml_collections.ConfigDict(config), None)
    updates, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS)
    return updates


def test_sgd_by_name_makes_the_plain_gradient_step() -> None:
    updates = _first_update({"name": "sgd", "learning_rate": 0.1, "schedule": "constant"})
    for k in GRADS:
        np.testing.assert_array_equal(np.asarray(updates[k]), -0.1 * np.asarray(GRADS[k]))


def test_the_default_optimiser_is_adamw_with_the_configs_numbers() -> None:
    config = {"learning_rate": 0.1, "schedule": "constant", "b1": 0.8, "weight_decay": 0.5}
    expected = optax.adamw(0.1, b1=0.8, b2=0.999, eps=1e-8, weight_decay=0.5)
    want, _ = expected.update(GRADS, expected.init(PARAMS), PARAMS)
    got = _first_update(config)
    for k in GRADS:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6)
    # kwargs reach optax's optimiser: Nesterov momentum changes sgd's first step.
    nesterov = _first_update(
        {"name": "sgd", "learning_rate": 0.1, "kwargs": {"momentum": 0.9, "nesterov": True}}
    )
    np.testing.assert_allclose(np.asarray(nesterov["b"]), -0.1 * 1.9 * 3.0, rtol=1e-6)


def halved_sgd(learning_rate, *, factor: float = 0.5) -> optax.GradientTransformation:
    """A user optimiser for `test_an_optimiser_by_import_path`."""
    return optax.sgd(lambda count: factor * learning_rate(count))


def test_an_optimiser_by_import_path() -> None:
    updates = _first_update(
        {"name": "tests.test_task_api:halved_sgd", "learning_rate": 0.1, "kwargs": {"factor": 0.25}}
    )
    np.testing.assert_allclose(np.asarray(updates["b"]), -0.025 * 3.0, rtol=1e-6)
    with pytest.raises(ValueError, match="optax has no such optimiser"):
        _first_update({"name": "sgdd", "learning_rate": 0.1})


# --- models ---------------------------------------------------------------------------------------
class Persistence(nn.Module):
    """The barest model: the last state plus a learned bias per variable; no Aurora attributes
    (no patch_size, timestep, surf_stats, dtype or remat)."""

    @nn.compact
    def __call__(self, batch: Batch) -> Batch:
        shift = lambda v, x: x[:, -1:] + self.param(v, nn.initializers.zeros, ())
        return batch.replace(
            surf_vars={v: shift(v, x) for v, x in batch.surf_vars.items()},
            atmos_vars={v: shift(v, x) for v, x in batch.atmos_vars.items()},
            metadata=batch.metadata.replace(
                time=batch.metadata.time + 360, rollout_step=batch.metadata.rollout_step + 1
            ),
        )


def test_a_model_without_auroras_attributes_trains_and_refuses_precision_it_cannot_take(
    tmp_path,
) -> None:
    data = InMemoryData([_rollout_example(seed=s) for s in range(2)], shuffle=False)
    strategy = RolloutStrategy(Persistence(), steps=2, loss="lat_mse", stats=STATS)
    optim = ml_collections.ConfigDict({"name": "sgd", "learning_rate": 0.5})
    trainer = Trainer(strategy, optimizer=optim, workdir=tmp_path, max_steps=4)
    trainer.fit(data)
    assert trainer.global_step == 4
    assert abs(float(trainer.state.params["a"])) > 0  # the bias trained
    (preds,) = list(trainer.predict(InMemoryData(data.examples[:1]), steps=2))
    inputs = data.examples[0][0]
    bias = float(trainer.state.params["a"])
    np.testing.assert_allclose(
        preds[1].surf_vars["a"], inputs.surf_vars["a"][:, -1:] + 2 * bias, rtol=1e-6
    )

    with pytest.raises(ValueError, match="precision='bf16-mixed' needs a model with"):
        Trainer(strategy, optimizer=optim, max_steps=1, precision="bf16-mixed")
    with pytest.raises(ValueError, match="remat='backbone' needs a model with a boolean"):
        Trainer(strategy, optimizer=optim, max_steps=1, remat="backbone")


def test_configure_model_sets_flax_dtype_and_auroras_flags() -> None:
    conv = configure_model(PerVariableConv(), precision="bf16-mixed")
    assert conv.dtype == jnp.bfloat16
    assert configure_model(PerVariableConv()) == PerVariableConv()
    with pytest.raises(ValueError, match="remat='backbone' needs"):
        configure_model(PerVariableConv(), remat="backbone")


def test_a_model_by_import_path_gets_its_kwargs_and_the_datasets_statistics() -> None:
    config = ml_collections.ConfigDict(
        {
            "model": {
                "preset": "examples.tiny_model:PerVariableConv",
                "kwargs": {"atmos_vars": ("c",), "features": 3},
            }
        }
    )
    data_stats = {"c_500": (100.0, 4.0), "z_500": (0.0, 1.0)}
    model = build_model(config, data_stats)
    assert isinstance(model, PerVariableConv) and model.features == 3
    assert model.surf_stats == {"c_500": (100.0, 4.0)}  # only what Aurora's table lacks
    # A model without `surf_stats`: the strategy keeps the statistics for the loss instead.
    run_config = default.get_config()
    assert build_strategy(run_config, Persistence(), data_stats).stats == {"c_500": (100.0, 4.0)}
    assert build_strategy(run_config, model, data_stats).stats == {"c_500": (100.0, 4.0)}
    config.model.preset = "examples.tiny_model:NoSuchModel"
    with pytest.raises(AttributeError, match="NoSuchModel"):
        build_model(config)


# --- the example, through main.py -----------------------------------------------------------------
def test_the_custom_task_example_trains_through_main(tmp_path: Path) -> None:
    """examples/configs/custom_task.py: a non-Aurora model, a user loss and optax's Adam by name
    train on the bundled sample, lower the loss and write a checkpoint."""
    result = run_main(
        f"--config={ROOT / 'examples' / 'configs' / 'custom_task.py'}",
        f"--workdir={tmp_path}",
        "--config.trainer.max_steps=12",
        "--config.trainer.val_check_interval=12",
        "--config.callbacks.checkpoint.every_n_steps=12",
    )
    summary = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert summary["global_step"] == 12
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    losses = {int(r["step"]): float(r["value"]) for r in rows if r["tag"] == "train/loss"}
    assert sorted(losses) == list(range(1, 13))
    assert losses[12] < 0.75 * losses[1], losses
    assert {"train/huber/z", "val/huber/z"} <= {r["tag"] for r in rows}  # the loss's own metrics
    params = load_params(tmp_path / "checkpoints" / "12")
    assert set(params) >= {"atmos_z", "atmos_z_out"}
    assert np.any(np.asarray(params["atmos_z_out"]["kernel"]) != 0)  # it started at zero


@pytest.mark.slow
def test_the_custom_task_example_is_scored_and_forecasts_through_main(tmp_path: Path) -> None:
    """`--mode=test` (WeatherBench2 scores) and `--mode=predict` (forecast files) read the
    example model's variables and time step as they read Aurora's."""
    config = f"--config={ROOT / 'examples' / 'configs' / 'custom_task.py'}"
    steps = ("--config.trainer.max_steps=2", "--config.trainer.val_check_interval=2")
    run_main(
        config, f"--workdir={tmp_path}", *steps, "--config.callbacks.checkpoint.every_n_steps=2"
    )
    for mode in ("test", "predict"):
        run_main(config, f"--workdir={tmp_path}", f"--mode={mode}")
    assert (tmp_path / "eval" / "scores.csv").stat().st_size > 0
    assert (tmp_path / "predictions" / "forecast.nc").stat().st_size > 0
