"""The stochastic backbone (aurora.model.noise): microsoft-aurora's noise injection and noise cache.

Parity feeds the reference's own noise to our side: tests/reference/run_stochastic.py records every
draw of the PyTorch backbone, and our rollout takes them as its `noise_source`, through our noise
cache. The rest checks what a key gives: the same member for the same key, another for another,
and noise statistics as the reference's cache defines them.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import aurora
import aurora.model.swin3d
from aurora.batch import Batch
from aurora.model.noise import NoiseSource, accumulate, key_noise, noise_shape
from aurora.rollout import ModelStep
from tests.reference.venv import RUNNER, case_dir
from tests.test_aurora_family import _tiny_batch
from tests.test_parity import (
    TINY,
    _assert_close,
    _errors,
    _load_case,
    _spec,
)
from tests.test_v1p5 import INPUT_VARS
from tests.test_v1p5 import RUNNER as V1P5_RUNNER

STOCHASTIC_RUNNER = Path(__file__).parent / "reference" / "run_stochastic.py"
TINY_KWARGS = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}


def _reference_case(spec: dict[str, Any]) -> Path:
    # The runner imports the runners beside it: their code is part of the cache key as `inputs`.
    imported = {p.name: p for p in (RUNNER, V1P5_RUNNER)}
    return case_dir(spec, runner=STOCHASTIC_RUNNER, inputs=imported)


def _replayed(draws: list[np.ndarray]) -> tuple[NoiseSource, Iterator[int]]:
    """A noise source handing out recorded draws in order, and a counter of those used."""
    used = count()

    def source(k: int) -> jax.Array:
        return jnp.stack([draws[next(used)] for _ in range(k)])

    return source, used


def _compare_with_reference_noise(spec: dict[str, Any]) -> dict[str, float]:
    out = _reference_case(spec)
    model, params, batch, ref = _load_case(spec, out)
    with np.load(out / "noise.npz") as f:
        draws = [f[str(i)] for i in range(len(f.files))]
    source, used = _replayed(draws)
    with jax.default_matmul_precision("highest"):
        predictions = aurora.rollout(
            model,
            params,
            batch,
            spec["steps"],
            fine_lead_times=spec.get("fine_lead_times"),
            use_noise_accumulation=spec.get("use_noise_accumulation", True),
            noise_source=source,
        )
        errors = _errors(predictions, ref)
    assert next(used) == len(draws)  # every reference draw was used, none invented
    return errors


@pytest.mark.reference
def test_tiny_stochastic_rollout_matches_reference_with_its_noise() -> None:
    """Fresh noise every step over three steps; odd patch grids (11x22 -> 6x11 -> 3x6), so the
    conditioning's patch merging pads as the tokens' does."""
    kwargs = {**TINY, "stochastic": True, "patch_size": 2}
    spec = _spec("AuroraPretrained", kwargs, steps=3, h=23, w=44)
    errors = _compare_with_reference_noise(spec)
    assert len(errors) == 3 * 9
    _assert_close(errors)


@pytest.mark.reference
def test_tiny_noise_accumulation_over_sub_steps_matches_reference() -> None:
    """`fine_lead_times=[3, 6]` with the noise cache: two draws at the first call, then one per
    call across sub-steps and steps (seven for six predictions)."""
    kwargs = {**TINY, "stochastic": True, "variable_lead_time": True}
    spec = {**_spec("AuroraPretrained", kwargs, steps=3), "fine_lead_times": [3.0, 6.0]}
    errors = _compare_with_reference_noise(spec)
    assert len(errors) == 6 * 9
    _assert_close(errors)


def _ensemble_spec(kwargs: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """An Aurora 1.5 ensemble case in float32, on run_v1p5.py's Aurora 1.5 batch."""
    kwargs = {"autocast": False, **kwargs}
    return _spec("AuroraV1p5Ensemble", kwargs, surf_vars=INPUT_VARS, batch_kind="v1p5", **extra)


@pytest.mark.reference
def test_tiny_v1p5_ensemble_matches_reference_with_its_noise() -> None:
    """The preset with sub-steps and the noise cache, as microsoft-aurora's rollout runs it."""
    spec = _ensemble_spec(TINY, steps=3, fine_lead_times=[3.0, 6.0])
    errors = _compare_with_reference_noise(spec)
    assert {"5/surf/scaled_tp_1h", "5/surf/insolation", "5/atmos/q"} <= set(errors)
    _assert_close(errors)


@pytest.mark.slow
@pytest.mark.reference
def test_v1p5_ensemble_full_architecture_matches_reference_small_grid() -> None:
    """AuroraV1p5Ensemble at full size (1.3 B, float32) on a small grid, three steps."""
    spec = _ensemble_spec({}, steps=3, h=49, w=96, levels=(50, 250, 500, 850))
    _assert_close(_compare_with_reference_noise(spec))


def test_accumulate_is_the_reference_fifo() -> None:
    """Cache of 3: filled with three draws, then the oldest out and one in; effective noise the
    sum over sqrt(3). A cache of one is fresh noise at every call."""
    d = [jnp.full((1, 1, 2, 1), float(10**i)) for i in range(5)]
    cache, noise = accumulate(None, jnp.concatenate(d[:3]))
    np.testing.assert_allclose(noise, jnp.full((1, 2, 1), 111 / np.sqrt(3)), rtol=1e-6)
    cache, noise = accumulate(cache, d[3])
    np.testing.assert_allclose(noise, jnp.full((1, 2, 1), 1110 / np.sqrt(3)), rtol=1e-6)
    cache, noise = accumulate(cache, d[4])
    np.testing.assert_allclose(noise, jnp.full((1, 2, 1), 11100 / np.sqrt(3)), rtol=1e-6)
    assert cache.shape == (3, 1, 2, 1)
    fresh, noise = accumulate(None, d[1])
    fresh, noise = accumulate(fresh, d[2])
    np.testing.assert_array_equal(noise, d[2][0])
    with pytest.raises(ValueError, match="one draw"):
        accumulate(cache, jnp.concatenate(d[:2]))


def test_accumulated_noise_statistics() -> None:
    """Over a cache of n: unit variance and zero mean at every call, correlation (n - k) / n
    between calls k apart, none n apart (so, with n sub-steps, fresh noise at every step)."""
    n, calls = 3, 7
    source = key_noise(jax.random.key(0), (1, 4096, 8))
    cache, noises = None, []
    for _ in range(calls):
        cache, noise = accumulate(cache, source(n if cache is None else 1))
        noises.append(np.asarray(noise).ravel())
    noises = np.stack(noises)
    np.testing.assert_allclose(noises.mean(axis=1), 0.0, atol=0.02)
    np.testing.assert_allclose(noises.var(axis=1), 1.0, atol=0.03)
    for k in range(n + 1):
        corr = np.mean([np.corrcoef(noises[i], noises[i + k])[0, 1] for i in range(calls - k)])
        assert abs(corr - (n - k) / n) < 0.02, (k, corr)


def _random_params(model: aurora.Aurora, batch: Batch, seed: int) -> Any:
    """Random weights of the model's shapes, without compiling its initialisers: kernels scaled by
    their fan-in, norm scales near one, everything else (AdaLN modulation, biases) small but not
    zero, so that the (noisy) conditioning acts."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), batch))["params"]
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        n = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "scale":
            return 1 + 0.02 * n
        if name == "kernel" and len(leaf.shape) >= 2:
            return n / np.sqrt(leaf.shape[-2])
        return 0.02 * n

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _tiny_stochastic(**kwargs: Any) -> tuple[aurora.Aurora, Any, Batch]:
    model = aurora.AuroraPretrained(**TINY_KWARGS, stochastic=True, **kwargs)
    batch = _tiny_batch(model)
    return model, _random_params(model, batch, 1), batch


def test_same_key_same_member_other_key_other_member() -> None:
    model, params, batch = _tiny_stochastic()
    step = ModelStep(model)
    member = lambda key: [
        p.atmos_vars["t"] for p in aurora.rollout(step, params, batch, 2, rng=key)
    ]
    first, again, other = (
        member(jax.random.key(1)),
        member(jax.random.key(1)),
        member(jax.random.key(2)),
    )
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - c).max() > 1.0  # kelvin
    with pytest.raises(ValueError, match="noise key"):
        step(params, batch)
    with pytest.raises(ValueError, match="rng"):
        aurora.rollout(step, params, batch, 1)
    with pytest.raises(ValueError, match="not stochastic"):
        plain = aurora.AuroraPretrained(**TINY_KWARGS)
        plain.apply({"params": params}, batch, noise=jnp.zeros(noise_shape(plain, batch)))


def test_zero_noise_mlp_is_the_deterministic_model() -> None:
    """With `noise_mlp` zero, the noise cannot act: any noise gives the deterministic model's
    prediction, once the conditioning's patch merging averages its four tokens (each token's
    conditioning is then the lead time's, at every stage)."""
    model, params, batch = _tiny_stochastic()
    backbone = dict(params["backbone"])
    for name in ("noise_mlp_0", "noise_mlp_2"):
        backbone[name] = jax.tree.map(jnp.zeros_like, backbone[name])
    eye = jnp.eye(model.embed_dim)
    backbone["context_down_layers_0"] = {"reduction": {"kernel": jnp.concatenate([eye] * 4) / 4}}
    params = {**params, "backbone": backbone}
    plain = aurora.AuroraPretrained(**TINY_KWARGS)
    shared = {k: v for k, v in backbone.items() if not k.startswith(("noise", "context"))}
    deterministic = {**params, "backbone": shared}
    expected = ModelStep(plain)(deterministic, batch).atmos_vars["t"]
    step = ModelStep(model)
    for seed in (1, 2):
        got = step(params, batch, rng=jax.random.key(seed)).atmos_vars["t"]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_rematerialised_blocks_see_each_tokens_conditioning(monkeypatch) -> None:
    """`remat` runs Swin blocks on windows, in chunks: the per-token conditioning must follow its
    tokens into the (shifted) windows. One window per chunk here."""
    model, params, batch = _tiny_stochastic()
    noise = jax.random.normal(jax.random.key(3), noise_shape(model, batch))
    expected = ModelStep(model)(params, batch, noise=noise).atmos_vars["t"]
    monkeypatch.setattr(aurora.model.swin3d, "REMAT_CHUNK_TOKENS", 16)
    remat = aurora.AuroraPretrained(**TINY_KWARGS, stochastic=True, remat=True)
    got = ModelStep(remat)(params, batch, noise=noise).atmos_vars["t"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
