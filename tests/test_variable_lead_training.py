"""Training with variable lead times and output-only variables (Aurora 1.5's training side).

The data are hourly states whose normalised value is the number of hours since the first one, so a
target's value names its valid time and a prediction that is right at one lead is wrong at any
other. The pipeline draws the last target's lead per window (`Pipeline(lead_times_hours=...)`),
the strategies pass the lead between input and target to the model as traced data
(`trainers.lead_time`), and output-only variables are targets only.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from aurora.batch import Batch
from aurora.normalisation import atmos_location_scale, surf_location_scale
from aurora.rollout import advance_batch
from callbacks.writers import NoopWriter
from data_builders import pipeline
from data_builders.errors import DataError
from data_builders.pipeline import Pipeline, WeatherSource
from tests.helpers import tiny_model
from trainers.lead_time import check_lead_times
from trainers.loss import aurora_mae
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

HOUR = 3600
T0 = int(np.datetime64("2020-06-01T00", "s").astype(np.int64))
LEVELS = (500.0, 850.0)
LEADS = (1, 2, 3, 6)
OPTIM = ml_collections.ConfigDict({"learning_rate": 1e-3, "schedule": "constant"})


def hourly_source(
    hours: int = 30, skip: tuple[int, ...] = (), h: int = 4, w: int = 8, noise: float = 0.0
) -> WeatherSource:
    """States at T0 + i hours (i < `hours`, not in `skip`) whose normalised 2t, msl and t are i
    (plus `noise` times a fixed random field)."""
    rng = np.random.default_rng(0)

    def field(location, scale, shape, i):
        jitter = noise * rng.standard_normal(shape)
        return (np.asarray(location) + np.asarray(scale) * (i + jitter)).astype(np.float32)

    t_loc, t_scale = atmos_location_scale("t", LEVELS)
    level = lambda x: np.asarray(x, np.float64).reshape(-1, 1, 1)
    kept = [i for i in range(hours) if i not in skip]
    records = [
        {
            "time": T0 + i * HOUR,
            "surf": {v: field(*surf_location_scale(v), (h, w), i) for v in ("2t", "msl")},
            "atmos": {"t": field(level(t_loc), level(t_scale), (len(LEVELS), h, w), i)},
        }
        for i in kept
    ]
    return WeatherSource(
        records=records,
        lat=np.linspace(90, -90, h + 1)[:-1] if h % 4 == 0 else np.linspace(90, -90, h),
        lon=np.arange(w) * 360 / w,
        levels=LEVELS,
        times=np.array([T0 + i * HOUR for i in kept]),
        static={"lsm": np.zeros((h, w), np.float32)},
        name="hourly",
    )


def hours_of(batch: Batch, name: str = "2t") -> np.ndarray:
    """Each row's normalised `name` at its last history step (the hours since T0), `(b,)`."""
    x = np.asarray(batch.normalise().surf_vars[name], np.float64)[:, -1]
    return x.reshape(len(x), -1).mean(axis=1)


def minutes_after_t0(batch: Batch) -> np.ndarray:
    return np.asarray(batch.metadata.time, np.int64) - T0 // 60


# ---- the pipeline --------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_pipeline_puts_the_last_target_at_a_drawn_lead(k: int) -> None:
    source = hourly_source()
    kw = dict(step_hours=6, rollout_steps=k, batch_size=2, seed=5, num_epochs=2, num_threads=0)
    p = Pipeline(source, lead_times_hours=LEADS, **kw)
    fixed = Pipeline(source, **kw)
    assert p.all_windows.tolist() == fixed.all_windows.tolist()  # leads <= step need no more data
    seen: dict[int, set[int]] = {0: set(), 1: set()}
    for epoch in (0, 1):
        for i, (inputs, targets) in enumerate(p.iterator(epoch)):
            assert len(targets) == k
            now = minutes_after_t0(inputs)
            np.testing.assert_array_equal(now, p.batch_windows(i, epoch) // 60 - T0 // 60)
            for j, target in enumerate(targets[:-1], start=1):  # full steps before the last
                np.testing.assert_array_equal(minutes_after_t0(target) - now, j * 360)
            lead = minutes_after_t0(targets[-1]) - now - (k - 1) * 360
            np.testing.assert_array_equal(lead, p.batch_leads(i, epoch) // 60)
            assert set((lead // 60).tolist()) <= set(LEADS)
            for target in targets:  # each target holds the state at its valid time
                np.testing.assert_allclose(
                    hours_of(target), minutes_after_t0(target) / 60, atol=1e-3
                )
            np.testing.assert_allclose(hours_of(inputs), now / 60, atol=1e-3)
            seen[epoch] |= {int(x) for x in lead // 60}
    assert len(seen[0] | seen[1]) >= 3  # leads vary across windows and epochs
    draws = lambda pipe, e: [pipe.batch_leads(i, e).tolist() for i in range(pipe.batches_per_epoch)]
    first = draws(p, 0)
    pipeline._lead_draws.cache_clear()  # drawn again, as in another process
    assert first == draws(Pipeline(source, lead_times_hours=LEADS, **kw), 0)  # seeded
    assert first != draws(Pipeline(source, lead_times_hours=LEADS, **{**kw, "seed": 6}), 0)
    assert draws(p, 0) != draws(p, 1)  # drawn anew each epoch
    assert {x for b in draws(fixed, 0) for x in b} == {6 * HOUR}  # default: one step


def test_pipeline_resumes_with_the_same_leads() -> None:
    kw = dict(step_hours=6, batch_size=1, seed=2, num_threads=0, lead_times_hours=LEADS)
    straight = list(Pipeline(hourly_source(), **kw))
    pipeline._lead_draws.cache_clear()  # a resumed run draws again
    resumed = iter(Pipeline(hourly_source(), **kw))
    resumed.set_state({"position": 3})
    for (a_in, a_t), (b_in, b_t) in zip(straight[3:], resumed, strict=True):
        np.testing.assert_array_equal(a_in.metadata.time, b_in.metadata.time)
        np.testing.assert_array_equal(a_t[-1].metadata.time, b_t[-1].metadata.time)


def test_windows_need_the_last_target_at_every_lead() -> None:
    # Hour 14 missing: windows at now = 12 (lead 2 from 12) and now = 8 (lead 6) disappear, as do
    # those needing 14 as history or input (now = 14, 20).
    holed = hourly_source(skip=(14,))
    p = Pipeline(holed, step_hours=6, lead_times_hours=LEADS, shuffle=False, num_threads=0)
    nows = sorted((p.all_windows - T0) // HOUR)
    assert nows == [6, 7, 9, 10, 15, 16, 17, 18, 19, 21, 22, 23]
    with pytest.raises(ValueError, match="positive whole minutes"):
        Pipeline(holed, lead_times_hours=(0.5 / 60,))
    with pytest.raises(DataError, match=r"the last at leads \(30,\)"):
        Pipeline(holed, lead_times_hours=(30,))


def test_target_only_variables_are_left_out_of_the_inputs() -> None:
    p = Pipeline(hourly_source(), rollout_steps=2, target_only_surf_vars=("msl",), num_threads=0)
    inputs, targets = next(iter(p))
    assert sorted(inputs.surf_vars) == ["2t"] and sorted(inputs.atmos_vars) == ["t"]
    assert all(sorted(t.surf_vars) == ["2t", "msl"] for t in targets)
    states = p.states_at([T0 + 6 * HOUR])  # replay's ground truth: every variable
    assert sorted(states.surf_vars) == ["2t", "msl"]
    missing = Pipeline(hourly_source(), target_only_atmos_vars=("q",), num_threads=0)
    with pytest.raises(DataError, match=r"target-only variables \['q'\] are not in the data"):
        next(iter(missing))


# ---- the Trainer ---------------------------------------------------------------------------------


class LeadEcho(nn.Module):
    """A model that is exact on `hourly_source` if, and only if, it is given each target's lead:
    every normalised output is the input's normalised 2t plus the lead in hours (plus `bias`, a
    parameter starting at 0). Output-only variables in the input are refused when traced."""

    surf_vars: tuple[str, ...] = ("2t", "msl")
    atmos_vars: tuple[str, ...] = ("t",)
    output_only_surf_vars: tuple[str, ...] = ("msl",)
    variable_lead_time: bool = True
    timestep: timedelta = timedelta(hours=6)
    patch_size: int = 1

    @nn.compact
    def __call__(self, batch: Batch, lead_times: jax.Array | None = None) -> Batch:
        leaked = sorted(set(self.output_only_surf_vars) & set(batch.surf_vars))
        if leaked:
            raise ValueError(f"output-only variables {leaked} in the input")
        bias = self.param("bias", nn.initializers.zeros, ())
        b = batch.surf_vars["2t"].shape[0]
        hours = jnp.full((b,), self.timestep.total_seconds() / 3600, jnp.float32)
        if lead_times is not None:
            hours = jnp.broadcast_to(lead_times, (b,))
        value = batch.normalise().surf_vars["2t"][:, -1:] + hours[:, None, None, None] + bias
        meta = batch.metadata
        pred = Batch(
            surf_vars=dict.fromkeys(self.surf_vars, value),
            static_vars=batch.static_vars,
            atmos_vars={
                v: jnp.repeat(value[:, :, None], len(meta.atmos_levels), axis=2)
                for v in self.atmos_vars
            },
            metadata=meta.replace(
                time=meta.time + jnp.round(hours * 60).astype(jnp.int32),
                rollout_step=meta.rollout_step + 1,
            ),
        )
        return pred.unnormalise()


class Logged(NoopWriter):
    """Keeps every scalar written, by step."""

    def __init__(self) -> None:
        self.scalars: dict[int, dict[str, float]] = {}

    def write_scalars(self, step, scalars) -> None:
        self.scalars.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})


def _fit(model, data, steps: int, k: int, **kwargs):
    writer = Logged()
    trainer = Trainer(
        RolloutStrategy(model, steps=k),
        optimizer=OPTIM,
        writers=[writer],
        max_steps=steps,
        log_every_n_steps=1,
        **kwargs,
    )
    trainer.fit(data)
    return trainer, writer.scalars


@pytest.mark.parametrize("k", [1, 2])
def test_fit_meets_each_target_at_its_own_lead_and_compiles_once(k: int) -> None:
    """Loss zero at every step only if every row's step got its target's lead; the output-only
    msl is scored (`mae/msl`) and never reaches an input, not even the rollout's second one."""
    p = Pipeline(
        hourly_source(),
        rollout_steps=k,
        batch_size=2,
        lead_times_hours=LEADS,
        target_only_surf_vars=("msl",),
        seed=1,
        num_threads=0,
    )
    steps = p.batches_per_epoch
    trainer, logged = _fit(LeadEcho(), p, steps, k)
    leads = {int(x) for i in range(steps) for x in p.batch_leads(i)}
    assert len(leads) >= 3  # the steps did see different leads...
    assert trainer._compiled["train"]._cache_size() == 1  # ...in one compiled program
    assert sorted(logged) == list(range(1, steps + 1))
    for step, scalars in logged.items():
        # An hour off in one row of two costs about 0.5; `bias` drifts by the learning rate.
        assert scalars["train/loss"] < 0.02, (step, scalars)
        assert "train/mae/msl" in scalars


def test_a_fixed_step_model_still_refuses_data_at_other_leads() -> None:
    p = Pipeline(hourly_source(), lead_times_hours=(1,), num_threads=0)
    with pytest.raises(ValueError, match=r"model steps 6 h .* 1 h after"):
        _fit(LeadEcho(variable_lead_time=False), p, 1, 1)


def test_only_the_last_target_may_be_off_the_time_step() -> None:
    model = LeadEcho()
    inputs, targets = next(iter(Pipeline(hourly_source(), rollout_steps=2, num_threads=0)))
    check_lead_times(model, inputs, targets)
    early = targets[0].replace(
        metadata=targets[0].metadata.replace(time=targets[0].metadata.time - 60)
    )
    with pytest.raises(ValueError, match=r"Target 1 is \[5.0\] h after"):
        check_lead_times(model, inputs, [early, targets[1]])
    with pytest.raises(ValueError, match="must lie after its input"):
        check_lead_times(model, inputs, [targets[0], dataclasses.replace(targets[0])])


def _manual_loss(model, params, inputs: Batch, targets: list[Batch], **loss_kwargs) -> float:
    """The rollout's mean step loss, each step given its target's lead, outside the Trainer
    (variables compared after the model's `_pre_norm_hook`)."""
    batch, losses = inputs.astype(jnp.float32).crop(model.patch_size), []
    for target in targets:
        lead = (np.asarray(target.metadata.time) - np.asarray(batch.metadata.time)) / 60
        pred = model.apply({"params": params}, batch, jnp.asarray(lead, jnp.float32))
        normed = lambda b: model._pre_norm_hook(b)
        losses.append(
            aurora_mae(normed(pred), normed(target.crop(model.patch_size)), **loss_kwargs)[0]
        )
        batch = advance_batch(batch, pred)
    return float(np.mean(losses))


@pytest.mark.slow  # compiling a real model's training step: a minute or more on 2 cores
@pytest.mark.parametrize("k", [1, 2])
def test_tiny_aurora_trains_on_variable_leads_with_output_only_variables(k: int) -> None:
    """A reduced Aurora 1.5 (variable lead time, updated lead-time embedding, output-only msl):
    one compiled step for every lead, and the Trainer's first loss is the rollout's loss with
    each step at its target's lead."""
    model = tiny_model(
        surf_vars=("2t", "msl"),
        static_vars=("lsm",),
        atmos_vars=("t",),
        output_only_surf_vars=("msl",),
        variable_lead_time=True,
        use_updated_lead_time_embedding=True,
    )
    source = hourly_source(h=8, w=16, noise=0.5)
    p = Pipeline(
        source,
        rollout_steps=k,
        batch_size=2,
        lead_times_hours=LEADS,
        target_only_surf_vars=("msl",),
        seed=4,
        num_threads=0,
    )
    inputs, targets = p.dataset[0]
    params = jax.device_get(model.init(jax.random.PRNGKey(0), inputs)["params"])
    trainer, logged = _fit(model, p, 3, k, init_params=jax.tree.map(jnp.asarray, params))
    assert len({int(x) for i in range(3) for x in p.batch_leads(i)}) >= 2
    assert trainer._compiled["train"]._cache_size() == 1
    assert logged[1]["train/loss"] == pytest.approx(
        _manual_loss(model, params, inputs, targets), rel=1e-4
    )
    assert "train/mae/msl" in logged[1]


def test_config_knobs_reach_the_pipeline_and_the_model(tmp_path) -> None:
    """`config.data.lead_times_hours` and the model's output-only variables, through `run`: the
    model meets every lead and never sees msl in an input; a fixed-step model gets the same
    sub-step leads, which the Trainer refuses."""
    from configs.default import get_config
    from data_builders.registry import register_builder, unregister_builder
    from trainers.run import run

    def config(**model_kwargs):
        config = get_config()
        config.data.builder = "test_hourly_leads"
        config.data.lead_times_hours = (1, 2)
        config.data.batch_size = 2
        config.data.num_threads = 0
        config.model.preset = "tests.test_variable_lead_training:LeadEcho"
        config.model.kwargs = ml_collections.ConfigDict(model_kwargs)
        config.trainer.max_steps = 3
        config.trainer.precision = "32"
        config.trainer.remat = "none"
        config.trainer.log_every_n_steps = 1
        config.callbacks = ml_collections.ConfigDict()
        config.writers = ml_collections.ConfigDict()
        return config

    register_builder("test_hourly_leads", lambda split: hourly_source())
    try:
        metrics = run(config(), tmp_path / "variable", "fit")["metrics"]
        with pytest.raises(ValueError, match=r"model steps 6 h .* [12] h after"):
            run(config(variable_lead_time=False), tmp_path / "fixed", "fit")
    finally:
        unregister_builder("test_hourly_leads")
    assert metrics["train/loss"] < 0.02 and "train/mae/msl" in metrics


def test_the_loss_sees_scaled_variables_log_transformed_as_the_model_does() -> None:
    """Aurora 1.5's output-only precipitation `scaled_tp_1h` is normalised by statistics of its
    log transform: the loss compares it there (the model's `_pre_norm_hook`), not in metres, where
    a millimetre is a hundredth of a normalised unit."""
    from aurora.model.log_transform import log_transform
    from aurora.model.v1p5 import AuroraV1p5

    rng = np.random.default_rng(0)
    metadata = next(iter(Pipeline(hourly_source(), num_threads=0)))[1][0].metadata

    def batch() -> Batch:
        surf = {
            "scaled_tp_1h": rng.exponential(2e-3, (2, 1, 4, 8)).astype(np.float32),
            "2t": rng.normal(280, 5, (2, 1, 4, 8)).astype(np.float32),
        }
        return Batch(surf_vars=surf, static_vars={}, atmos_vars={}, metadata=metadata)

    pred, target = batch(), batch()
    _, terms = RolloutStrategy(AuroraV1p5(autocast=False)).step_loss(pred, target)
    location, scale = surf_location_scale("scaled_tp_1h")
    normalised = lambda b: (
        (np.asarray(log_transform(b.surf_vars["scaled_tp_1h"])) - location) / scale
    )
    want = np.mean(np.abs(normalised(pred) - normalised(target)))
    assert float(terms["mae/scaled_tp_1h"]) == pytest.approx(want, rel=1e-5)
    assert want > 1


def test_replay_trains_on_output_only_variables_and_keeps_them_out_of_its_buffer() -> None:
    """The replay buffer's entries are inputs: predicted output-only variables are not stored
    (its layout is the data inputs', so the model never sees msl in an input), and the truth it
    is scored against has them."""
    from trainers.strategies.replay import ReplayStrategy

    p = Pipeline(
        hourly_source(hours=48), batch_size=2, target_only_surf_vars=("msl",), num_threads=0
    )
    writer = Logged()
    strategy = ReplayStrategy(LeadEcho(), refresh_every=3, max_lead_hours=((0, 24),))
    trainer = Trainer(strategy, optimizer=OPTIM, writers=[writer], max_steps=6, log_every_n_steps=1)
    trainer.fit(p)
    logged = [writer.scalars[step] for step in range(1, 7)]
    assert max(s["train/lead_hours"] for s in logged) > 6  # predictions were fed back as inputs
    assert all(s["train/loss"] < 0.02 and "train/mae/msl" in s for s in logged)


def v1p5_source(model, hours: int = 22, h: int = 8, w: int = 16) -> WeatherSource:
    """Hourly random states with every variable of Aurora 1.5 at its normalisation statistics
    (`scaled_*` amounts non-negative, as the data hold them)."""
    from aurora.model.log_transform import log_untransform

    rng = np.random.default_rng(0)

    def surf(name: str) -> np.ndarray:
        location, scale = surf_location_scale(name)
        x = location + scale * rng.standard_normal((h, w))
        return np.asarray(log_untransform(np.abs(x)) if name.startswith("scaled_") else x)

    def atmos(name: str) -> np.ndarray:
        location, scale = atmos_location_scale(name, LEVELS)
        return location + scale * rng.standard_normal((len(LEVELS), h, w))

    records = [
        {
            "time": T0 + i * HOUR,
            "surf": {v: surf(v).astype(np.float32) for v in model.surf_vars},
            "atmos": {v: atmos(v).astype(np.float32) for v in model.atmos_vars},
        }
        for i in range(hours)
    ]
    return WeatherSource(
        records=records,
        lat=np.linspace(90, -90, h + 1)[:-1],
        lon=np.arange(w) * 360 / w,
        levels=LEVELS,
        times=np.array([T0 + i * HOUR for i in range(hours)]),
        static={v: surf(v).astype(np.float32) for v in model.static_vars},
        name="v1p5",
    )


@pytest.mark.slow  # a reduced Aurora 1.5 with its 26 surface and 36 static variables
def test_reduced_aurora_v1p5_fine_tunes_on_sub_step_leads() -> None:
    """`AuroraV1p5` (float32, reduced backbone) through `run`'s pieces: its output-only variables
    are targets only, 2-step rollouts end at drawn leads of 1, 3 or 6 h in one compiled step, and
    the Trainer's first loss is the rollout's, log-transformed precipitation included."""
    from aurora.model.v1p5 import AuroraV1p5
    from tests.helpers import TINY_KWARGS
    from trainers.run import target_only_vars

    model = AuroraV1p5(autocast=False, **TINY_KWARGS)
    p = Pipeline(
        v1p5_source(model),
        rollout_steps=2,
        lead_times_hours=(1, 3, 6),
        seed=3,
        num_threads=0,
        **target_only_vars(model),
    )
    inputs, targets = p.dataset[0]
    assert not set(model.output_only_surf_vars) & set(inputs.surf_vars)
    assert set(model.output_only_surf_vars) <= set(targets[-1].surf_vars)
    params = jax.device_get(model.init(jax.random.PRNGKey(0), inputs)["params"])
    trainer, logged = _fit(model, p, 3, 2, init_params=jax.tree.map(jnp.asarray, params))
    assert len({int(x) for i in range(3) for x in p.batch_leads(i)}) >= 2
    assert trainer._compiled["train"]._cache_size() == 1
    assert logged[1]["train/loss"] == pytest.approx(
        _manual_loss(model, params, inputs, targets), rel=1e-4
    )
    assert all(f"train/mae/{v}" in logged[1] for v in model.output_only_surf_vars)
    assert all(np.isfinite(s["train/loss"]) for s in logged.values())
