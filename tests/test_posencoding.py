"""Bit-exactness of the host-side sines, Fourier expansions and position/scale encodings.

The fixtures in tests/data were made with PyTorch and microsoft-aurora by
tests/reference/make_posenc_fixtures.py (see there to regenerate), so these tests need no torch.
Tests that need Intel MKL's runtime (the library MKL-built PyTorch takes sines and square roots
from) are skipped without it; the others replace those two functions by look-ups into the values
PyTorch computed, so that everything else is still checked bit for bit.
"""

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from aurora.model import posencoding, trig
from aurora.model.fourier import (
    _min_patch_area,
    absolute_time_expansion,
    fourier_expansion,
    lead_time_expansion,
    lead_time_expansion_v3,
    levels_expansion,
    pos_expansion,
    scale_expansion,
)
from aurora.model.mkl import mkl_available
from aurora.model.posencoding import patch_root_area, pos_scale_encoding
from aurora.model.sleef import fma_f32, sleef_sin_f32

DATA = Path(__file__).parent / "data"
needs_mkl = pytest.mark.skipif(not mkl_available(), reason="no Intel MKL runtime (libmkl_rt)")


@pytest.fixture(scope="module")
def sin_table():
    with np.load(DATA / "torch_sin_f32.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "reference_posenc.npz") as z:
        return {k: z[k] for k in z.files}


def bits(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.int32)


def assert_same_bits(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    mismatch = bits(actual) != bits(expected)
    assert not mismatch.any(), f"{mismatch.sum()} of {mismatch.size} values differ"


# --- sines -----------------------------------------------------------------------------------


def test_sleef_port_matches_sleef(sin_table):
    expected = (bits(sin_table["torch_sin"]) + sin_table["sleef_minus_torch_ulp"]).view(np.float32)
    assert_same_bits(sleef_sin_f32(sin_table["x"]), expected)


@needs_mkl
def test_mkl_sin_matches_torch(sin_table):
    assert_same_bits(trig.sin_f32(sin_table["x"], backend="mkl"), sin_table["torch_sin"])


@needs_mkl
def test_mkl_sqrt_matches_torch(sin_table):
    assert_same_bits(trig.sqrt_f32(sin_table["sqrt_x"], backend="mkl"), sin_table["torch_sqrt"])


def test_sleef_port_special_values():
    x = np.array([0.0, -0.0, 1e-30, -1e-45, 124.99], np.float32)
    y = sleef_sin_f32(x)
    assert bits(y[:2]).tolist() == bits(x[:2]).tolist()  # Signed zeros are kept.
    assert y[2] == np.float32(1e-30) and y[3] == np.float32(-1e-45)
    assert abs(float(y[4]) - np.sin(124.99)) < 1e-5
    assert sleef_sin_f32(x.reshape(5, 1)).shape == (5, 1)


@pytest.mark.parametrize("bad", [125.0, -200.0, np.inf, np.nan])
def test_sleef_port_rejects_slow_path(bad):
    with pytest.raises(ValueError, match="fast path"):
        sleef_sin_f32(np.array([0.5, bad], np.float32))


def nearest_f32(q: Fraction) -> np.float32:
    """The float32 nearest to the rational `q`, ties to even."""
    g = np.float32(float(q))
    candidates = [np.nextafter(g, np.float32(-np.inf)), g, np.nextafter(g, np.float32(np.inf))]
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - q), int(bits(c)) & 1))


def test_fma_f32_is_correctly_rounded():
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal(2000).astype(np.float32) for _ in range(3))
    # (1 + 2^-12)^2 = 1 + 2^-11 + 2^-24 lies halfway between two float32 numbers; adding a tiny
    # c in float64 is lost, so a naive float64 evaluation rounds the tie to even, i.e. wrongly.
    a[:2] = b[:2] = np.float32(1 + 2**-12)
    c[:2] = np.array([2**-60, -(2**-60)], np.float32)
    naive = (a[:1].astype(np.float64) * b[:1] + c[:1]).astype(np.float32)
    got = fma_f32(a, b, c)
    assert got[0] != naive[0]
    for ai, bi, ci, gi in zip(a, b, c, got):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        assert bits(gi) == bits(nearest_f32(exact))


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("AURORA_SIN_BACKEND", "sleef")
    assert trig.sin_backend() == "sleef"
    x = np.array([0.3, 1.2], np.float32)
    assert_same_bits(trig.sin_f32(x), sleef_sin_f32(x))
    assert_same_bits(trig.sqrt_f32(x), np.sqrt(x))
    monkeypatch.setenv("AURORA_SIN_BACKEND", "nonsense")
    with pytest.raises(ValueError):
        trig.sin_backend()


# --- Fourier expansions ----------------------------------------------------------------------


def test_min_patch_area(ref):
    assert _min_patch_area == float(ref["min_patch_area"])


@pytest.mark.parametrize(
    "expansion, key, source, dtype",
    [
        (levels_expansion, "levels", "levels_in", np.int64),
        (lead_time_expansion, "lead", "lead_in", np.float32),
        (lead_time_expansion_v3, "lead_v3", "lead_in", np.float32),
        (absolute_time_expansion, "time", "time_in", np.float32),
    ],
)
def test_expansions_match_reference(ref, expansion, key, source, dtype):
    x = ref[f"expansion/{source}"]
    assert x.dtype == dtype
    assert_same_bits(expansion(x, 512), ref[f"expansion/{key}"])


def test_expansion_range_and_dimension_checks():
    with pytest.raises(ValueError, match="range"):
        pos_expansion(np.array([0.001], np.float32), 8)
    with pytest.raises(ValueError, match="range"):
        levels_expansion(np.array([2e5]), 8)
    with pytest.raises(ValueError, match="multiple of two"):
        fourier_expansion(np.array([1.0]), 7, 0.1, 10.0)
    # Zeros are allowed; float32 inputs are compared in float32, like PyTorch does.
    assert pos_expansion(np.array([0.0, np.float32(0.01)], np.float32), 8).shape == (2, 8)
    assert absolute_time_expansion(np.array([1e9]), 4).dtype == np.float32


# --- position and scale encodings --------------------------------------------------------------


def grids(ref, full_only=False):
    names = [str(n) for n in ref["grids"]]
    return [n for n in names if f"{n}/pos" in ref] if full_only else names


@pytest.fixture
def torch_math(monkeypatch, ref):
    """Replace `sin_f32` and `sqrt_f32` in posencoding by look-ups of PyTorch's values."""

    def lookup(kind):
        keys = [k for k in ref if k.endswith(f"/{kind}_in")]
        x = np.concatenate([ref[k] for k in keys])
        y = np.concatenate([ref[k[: -len("_in")] + "_out"] for k in keys])
        order = np.argsort(bits(x))
        table_x, table_y = bits(x)[order], y[order]

        def f(v, backend=None):
            v = np.asarray(v, np.float32)
            i = np.searchsorted(table_x, bits(v))
            assert np.all(table_x[np.minimum(i, len(table_x) - 1)] == bits(v)), "value not in table"
            return table_y[i]

        return f

    monkeypatch.setattr(posencoding, "sin_f32", lookup("sin"))
    monkeypatch.setattr(posencoding, "sqrt_f32", lookup("sqrt"))


def encode(ref, name):
    lat, lon = ref[f"{name}/lat"], ref[f"{name}/lon"]
    return pos_scale_encoding(lat, lon, int(ref[f"{name}/patch_size"]), int(ref[f"{name}/dim"]))


def test_position_encoding_matches_reference(ref):
    for name in grids(ref, full_only=True):
        pos, _ = encode(ref, name)
        assert_same_bits(pos, ref[f"{name}/pos"])


def test_scale_encoding_matches_reference_given_torch_math(ref, torch_math):
    for name in grids(ref, full_only=True):
        _, scale = encode(ref, name)
        assert_same_bits(scale, ref[f"{name}/scale"])


def root_area_of(ref, name):
    lat, lon, p = ref[f"{name}/lat"], ref[f"{name}/lon"], int(ref[f"{name}/patch_size"])
    lat_grid = np.broadcast_to(lat[:, None], (lat.size, lon.size))
    lon_grid = np.broadcast_to(lon[None, :], (lat.size, lon.size))
    pool_max = posencoding._max_pool
    pool_min = posencoding._min_pool
    return posencoding.patch_root_area(
        pool_min(lat_grid, p), pool_min(lon_grid, p), pool_max(lat_grid, p), pool_max(lon_grid, p)
    ).reshape(-1)


def test_root_areas_match_reference_given_torch_math(ref, torch_math):
    for name in grids(ref):
        assert_same_bits(root_area_of(ref, name), ref[f"{name}/root_area"])


@needs_mkl
def test_encodings_match_reference_with_mkl(ref, monkeypatch):
    monkeypatch.delenv("AURORA_SIN_BACKEND", raising=False)
    for name in grids(ref):
        assert_same_bits(root_area_of(ref, name), ref[f"{name}/root_area"])
    for name in grids(ref, full_only=True):
        pos, scale = encode(ref, name)
        assert_same_bits(pos, ref[f"{name}/pos"])
        assert_same_bits(scale, ref[f"{name}/scale"])


def test_encoding_shapes_and_errors():
    lat = np.linspace(90, -90, 9)
    lon = np.linspace(0, 360, 16, endpoint=False)
    pos, scale = pos_scale_encoding(lat, lon, 4, 8)  # The 9th latitude is ignored.
    assert pos.shape == scale.shape == (2 * 4, 8)
    assert pos.dtype == scale.dtype == np.float32
    with pytest.raises(ValueError, match="multiple of four"):
        pos_scale_encoding(lat, lon, 4, 6)
    with pytest.raises(ValueError, match="vectors"):
        pos_scale_encoding(lat[:, None], lon, 4, 8)
    with pytest.raises(ValueError, match="span latitudes"):
        pos_scale_encoding(lat, lon, 1, 8)
    with pytest.raises(ValueError, match="360"):
        patch_root_area(np.array([0.0]), np.array([350.0]), np.array([1.0]), np.array([370.0]))
    with pytest.raises(ValueError, match="range"):  # Centre latitude 0.005 is below 0.01 degrees.
        pos_scale_encoding(np.array([0.01, 0.0]), np.array([0.0, 1.0]), 2, 8)
    assert scale_expansion.lower == _min_patch_area
