"""microsoft-aurora's newer constructor arguments (docs/aurora_family.md): parity for the ported
ones on the reduced architecture of tests/test_parity.py, and loud failures for the rest."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aurora
from aurora.batch import Batch, Metadata
from aurora.model.clipping import clip_rollout_inputs
from aurora.model.positivity import clamp_prediction
from aurora.rollout import ModelStep, advance_batch
from tests.test_parity import TINY, _assert_close, _compare, _spec

# Bounds that bite on a random-weight rollout (physical units, near the normalisation locations).
CLIPPING = {
    "2t": {"min": 275.0, "max": 285.0},
    "msl": {"min": 101000.0, "max": None},
    "q": {"min": 1e-3},
    "t": {"max": 250.0},
}


@pytest.mark.reference
@pytest.mark.parametrize("at_first_step", [False, True])
def test_tiny_positive_variables_match_reference(at_first_step: bool) -> None:
    """Inputs clamped every step, predictions from step 2 (or 1): three steps cover both."""
    kwargs = {
        **TINY,
        "positive_surf_vars": ["2t", "msl"],
        "positive_atmos_vars": ["q", "t"],
        "clamp_at_first_step": at_first_step,
    }
    _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=3)))


@pytest.mark.reference
def test_tiny_updated_lead_time_embedding_matches_reference() -> None:
    """`lead_time_expansion_v3` in the encoder and the backbone's AdaLN, 6 h and 12 h steps."""
    for hours in (6, 12):
        kwargs = {**TINY, "use_updated_lead_time_embedding": True, "timestep_hours": hours}
        _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=2)))


@pytest.mark.reference
def test_tiny_rollout_input_clipping_matches_reference() -> None:
    """Yielded predictions raw, the next inputs clipped (surface and atmospheric, min and max)."""
    kwargs = {**TINY, "rollout_input_clipping": CLIPPING}
    _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=3)))


def test_clip_rollout_inputs_bounds_only_named_variables() -> None:
    x = jnp.array([270.0, 280.0, 290.0])
    pred = Batch(
        surf_vars={"2t": x, "10u": x},
        static_vars={},
        atmos_vars={"t": x},
        metadata=Metadata(
            lat=(0.0,), lon=(0.0,), time=(np.datetime64("2020-01-01"),), atmos_levels=(500,)
        ),
    )
    clipped = clip_rollout_inputs(pred, CLIPPING)
    np.testing.assert_array_equal(clipped.surf_vars["2t"], [275.0, 280.0, 285.0])
    np.testing.assert_array_equal(clipped.surf_vars["10u"], x)
    np.testing.assert_array_equal(clipped.atmos_vars["t"], [250.0, 250.0, 250.0])


@pytest.mark.parametrize(
    "step, at_first, clamped", [(1, False, False), (2, False, True), (1, True, True)]
)
def test_clamp_prediction_starts_at_the_right_step(
    step: int, at_first: bool, clamped: bool
) -> None:
    fields = {"q": jnp.array([-1.0, 1.0]), "t": jnp.array([-1.0, 1.0])}
    out = jax.jit(clamp_prediction, static_argnums=(1, 3))(fields, ("q",), step, at_first)
    np.testing.assert_array_equal(out["q"], [0.0 if clamped else -1.0, 1.0])
    np.testing.assert_array_equal(out["t"], [-1.0, 1.0])


def test_bf16_mode_switches_autocast_on_with_a_warning() -> None:
    model = aurora.Aurora(bf16_mode=True)
    assert model.uses_autocast
    with pytest.warns(UserWarning, match="bf16_mode"):
        model._check_supported()


@pytest.mark.reference
@pytest.mark.parametrize("updated", [False, True])
def test_tiny_variable_lead_time_matches_reference(updated: bool) -> None:
    """Lead time as traced data (encoded in-graph), 6 h and 12 h steps, old and new embedding."""
    for hours in (6, 12):
        kwargs = {
            **TINY,
            "variable_lead_time": True,
            "use_updated_lead_time_embedding": updated,
            "timestep_hours": hours,
        }
        _assert_close(_compare(_spec("AuroraPretrained", kwargs, steps=2)))


def _tiny_batch(model: aurora.Aurora) -> Batch:
    rng = np.random.default_rng(0)
    h, w, levels = 16, 32, (100, 500, 850)
    return Batch(
        surf_vars={v: rng.standard_normal((1, 2, h, w), np.float32) for v in model.surf_vars},
        static_vars={v: rng.standard_normal((h, w), np.float32) for v in model.static_vars},
        atmos_vars={v: rng.standard_normal((1, 2, 3, h, w), np.float32) for v in model.atmos_vars},
        metadata=Metadata(
            lat=tuple(np.linspace(90, -90, h + 1)[:-1]),
            lon=tuple(np.linspace(0, 360, w, endpoint=False)),
            time=(np.datetime64("2020-06-01T12:00"),),
            atmos_levels=levels,
        ),
    )


@pytest.mark.parametrize("updated", [False, True])
def test_variable_lead_time_below_the_time_step_matches_a_fixed_step_model(updated: bool) -> None:
    """A 6 h model asked for 3 h and 1.5 h leads computes what a model with that fixed time step
    computes (whose host-side encoding is parity-tested), advances time by the lead, and compiles
    once for both leads."""
    kwargs = {**TINY, "use_updated_lead_time_embedding": updated}
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
    variable = aurora.AuroraPretrained(**kwargs, variable_lead_time=True)
    batch = _tiny_batch(variable)
    step = ModelStep(variable)
    params = variable.init(jax.random.key(0), batch, 6.0)["params"]
    for hours in (3.0, 1.5):
        fixed = aurora.AuroraPretrained(**kwargs, timestep=timedelta(hours=hours))
        expected = fixed.apply({"params": params}, batch)
        got = step(params, batch, jnp.array([hours]))
        assert int(got.metadata.time[0] - batch.metadata.time[0]) == int(hours * 60)
        for kind in ("surf_vars", "atmos_vars"):
            for name, value in getattr(expected, kind).items():
                error = np.abs(getattr(got, kind)[name] - value).max() / np.abs(value).max()
                assert error <= 1e-5, (name, error)
    assert step._apply._cache_size() == 1


@pytest.mark.reference
@pytest.mark.parametrize("indexing_bug", [False, True])
def test_tiny_dynamic_and_atmospheric_static_channels_match_reference(indexing_bug: bool) -> None:
    """Calendar channels (a Sunday evening on the 31st), static channels on every level, with
    and without the air-pollution model's `static_z` indexing bug."""
    kwargs = {
        **TINY,
        "dynamic_vars": True,
        "atmos_static_vars": True,
        "simulate_indexing_bug": indexing_bug,
    }
    spec = _spec("AuroraPretrained", kwargs, steps=2)
    _assert_close(_compare({**spec, "time": "2023-12-31T21:00"}))


def test_static_channel_arguments_need_what_the_reference_needs() -> None:
    with pytest.raises(ValueError, match="dynamic_vars"):
        aurora.AuroraSmallPretrained(atmos_static_vars=True)._check_supported()
    with pytest.raises(ValueError, match="atmos_static_vars"):
        aurora.AuroraSmallPretrained(simulate_indexing_bug=True)._check_supported()


@pytest.mark.parametrize("missing", ["static_vars", "surf_vars"])
def test_surface_level_with_only_surface_or_only_static_variables(missing: str) -> None:
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    model = aurora.AuroraPretrained(**kwargs, **{missing: ()})
    batch = _tiny_batch(model)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))
    assert shapes["params"]["encoder"]["surf_token_embeds"]


@pytest.mark.reference
def test_tiny_separate_perceiver_and_modulation_heads_match_reference() -> None:
    """A second level Perceiver for `u` and `t` (not the last variables, so outputs interleave)
    and an extra `_mod` head for `2t`, whose prediction is compared too (given statistics: the
    air pollution model consumes it before unnormalisation)."""
    kwargs = {
        **TINY,
        "separate_perceiver": ["u", "t"],
        "modulation_heads": ["2t"],
        "surf_stats": {"2t_mod": [0.0, 1.0]},
    }
    errors = _compare(_spec("AuroraPretrained", kwargs, steps=2))
    assert {"0/surf/2t_mod", "1/surf/2t_mod"} <= set(errors)
    _assert_close(errors)


def test_rollout_with_fine_lead_times_sub_steps_from_the_same_input() -> None:
    """`fine_lead_times=[3, 6]`: the 3 h and 6 h predictions come from the same input, only the
    6 h one is fed back (so every second prediction is the plain rollout's), one compilation."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    model = aurora.AuroraPretrained(**kwargs, variable_lead_time=True)
    batch = _tiny_batch(model)
    params = model.init(jax.random.key(0), batch)["params"]
    step = ModelStep(model)
    fine = list(aurora.rollout(step, params, batch, 2, fine_lead_times=[3.0, 6.0]))
    compiled = step._apply._cache_size()
    plain = list(aurora.rollout(step, params, batch, 2))
    assert step._apply._cache_size() == compiled  # the lead is data: no new program
    start = int(batch.metadata.time[0])
    assert [int(p.metadata.time[0]) - start for p in fine] == [180, 360, 540, 720]
    assert [int(p.metadata.rollout_step) for p in fine] == [1, 1, 2, 2]
    for sub, full in zip(fine[1::2], plain):
        np.testing.assert_array_equal(sub.atmos_vars["t"], full.atmos_vars["t"])
    np.testing.assert_array_equal(
        fine[2].atmos_vars["t"], step(params, advance_batch(batch, plain[0]), 3.0).atmos_vars["t"]
    )
    with pytest.raises(ValueError, match="time step"):
        next(aurora.rollout(step, params, batch, 1, fine_lead_times=[3.0]))
    fixed = aurora.AuroraPretrained(**kwargs)
    with pytest.raises(ValueError, match="variable_lead_time"):
        next(aurora.rollout(fixed, params, batch, 1, fine_lead_times=[6.0]))


@pytest.mark.reference
def test_insolation_matches_reference() -> None:
    """Prescribed insolation from the traced time: leap and common years, year ends, minutes."""
    from aurora.batch import to_minutes
    from aurora.insolation import insolation
    from tests.reference.venv import case_dir

    times = ["2020-01-01T00:00", "2020-02-29T06:00", "2020-12-31T23:30", "2021-06-21T12:00"]
    times += ["2023-03-20T21:45", "1999-12-31T18:00", "2100-03-01T03:00"]
    spec = {"times": times, "h": 33, "w": 64}
    runner = Path(__file__).parent / "reference" / "run_insolation.py"
    with np.load(case_dir(spec, runner=runner) / "insolation.npz") as f:
        expected, lat, lon = f["sol"], f["lat"], f["lon"]
    minutes = to_minutes([np.datetime64(t) for t in times])
    got = np.asarray(jax.jit(lambda m: insolation(m, lat, lon))(minutes))
    # Insolation is O(1); a one-ulp change of the float32 hour angle (~2300 rad at the end of the
    # year) moves it by ~1e-4, so this also checks that both form the same angle.
    assert np.abs(got - expected).max() <= 1e-5
