"""Generate the fixtures of tests/test_posencoding.py from PyTorch and microsoft-aurora.

Writes

* ``tests/data/torch_sin_f32.npz``: ``float32`` inputs with PyTorch's CPU ``torch.sin`` of them
  (Intel MKL's ``vmsSin`` in MKL-built PyTorch), the offset in ULPs of SLEEF's
  ``Sleef_sinf16_u10`` (or ``Sleef_sinf8_u10`` on CPUs without AVX-512) from it, as shipped inside
  PyTorch and called through a small C shim compiled with gcc, and ``torch.sqrt`` of positive
  ``float32`` values;
* ``tests/data/reference_posenc.npz``: microsoft-aurora's position and scale encodings
  (``pos_scale_enc``) for a few small grids, the patch root areas of a few larger grids, some
  Fourier expansions, and, per grid, the ``torch.sin``/``torch.sqrt`` values that the reference
  computed on the way (so that the tests can check everything else without MKL).

Regenerate (needs the reference virtualenv, see ``tests/reference/venv.py``, and gcc) from the
repository root with::

    $(python -m tests.reference.venv) tests/reference/make_posenc_fixtures.py

Run it as a script, not with ``-m``: the reference package is also called ``aurora``, and the
script's own folder, not the repository root, must come first on ``sys.path``.
"""

import ctypes
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import aurora
from aurora.model.fourier import (
    _min_patch_area,
    absolute_time_expansion,
    lead_time_expansion,
    lead_time_expansion_v3,
    levels_expansion,
    pos_expansion,
    scale_expansion,
)
from aurora.model.posencoding import lat_lon_meshgrid, patch_root_area, pos_scale_enc

if "site-packages" not in aurora.__file__:
    sys.exit(f"Imported the wrong `aurora` ({aurora.__file__}); run this file as a script.")

DATA = Path(__file__).resolve().parents[1] / "data"
RESOLUTIONS = [0.1, 0.25, 0.5, 1, 1.5, 2, 2.5, 3, 5, 5.625, 10]

SHIM = r"""
#include <immintrin.h>
#include <dlfcn.h>
#include <stdint.h>
__attribute__((target("avx512f")))
static int run16(void *f, const float *in, float *out, int64_t n) {
  __m512 (*g)(__m512) = (__m512 (*)(__m512))f;
  for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(out + i, g(_mm512_loadu_ps(in + i)));
  return 0;
}
__attribute__((target("avx2,fma")))
static int run8(void *f, const float *in, float *out, int64_t n) {
  __m256 (*g)(__m256) = (__m256 (*)(__m256))f;
  for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(out + i, g(_mm256_loadu_ps(in + i)));
  return 0;
}
int call_sleef(const char *lib, const char *sym, int width, const float *in, float *out,
               int64_t n) {
  void *h = dlopen(lib, RTLD_NOW | RTLD_GLOBAL);
  if (!h) return -1;
  void *f = dlsym(h, sym);
  if (!f) return -2;
  return width == 16 ? run16(f, in, out, n) : run8(f, in, out, n);
}
"""


def sleef_sin(x: np.ndarray) -> tuple[np.ndarray, str]:
    """SLEEF's u10 float sine from inside libtorch_cpu, on `x` (length a multiple of 16)."""
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        sym, width = "Sleef_sinf16_u10", 16
    else:
        sym, width = "Sleef_sinf8_u10avx2", 8
    lib = str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")
    with tempfile.TemporaryDirectory() as tmp:
        src, so = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        src.write_text(SHIM)
        cmd = ["gcc", "-O2", "-shared", "-fPIC", str(src), "-o", str(so), "-ldl"]
        subprocess.run(cmd, check=True)
        shim = ctypes.CDLL(str(so))
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty_like(x)
        rc = shim.call_sleef(
            lib.encode(),
            sym.encode(),
            ctypes.c_int(width),
            x.ctypes.data_as(ctypes.c_void_p),
            out.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_int64(x.size),
        )
    if rc != 0:
        sys.exit(f"Calling {sym} from {lib} failed ({rc}).")
    return out, sym


def grid_latitudes() -> np.ndarray:
    """Latitudes of regular global grids at several resolutions, built in two common ways."""
    lats = []
    for res in RESOLUTIONS:
        n = round(180 / res) + 1
        lats.append(np.linspace(90, -90, n).astype(np.float32))
        lats.append(np.float32(90) - np.float32(res) * np.arange(n, dtype=np.float32))
    return np.unique(np.concatenate(lats))


def make_sin_table() -> None:
    rng = np.random.default_rng(20240601)
    random = rng.uniform(-np.pi / 2, np.pi / 2, 150_000).astype(np.float32)
    grid = torch.deg2rad(torch.from_numpy(grid_latitudes())).numpy()
    x = np.concatenate([grid, random])
    x = np.concatenate([x, np.zeros((-x.size) % 16, np.float32)])
    y = torch.sin(torch.from_numpy(x)).numpy()
    sleef, sym = sleef_sin(x)
    offset = sleef.view(np.int32).astype(np.int64) - y.view(np.int32).astype(np.int64)
    assert np.all(np.abs(offset) <= 1) and np.all(np.sign(sleef) == np.sign(y))
    sqrt_x = np.exp(rng.uniform(np.log(1e-3), np.log(1e9), 20_000)).astype(np.float32)
    np.savez_compressed(
        DATA / "torch_sin_f32.npz",
        x=x,
        torch_sin=y,
        sleef_minus_torch_ulp=offset.astype(np.int8),
        sqrt_x=sqrt_x,
        torch_sqrt=torch.sqrt(torch.from_numpy(sqrt_x)).numpy(),
        info=np.array(
            f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}, "
            f"mkl {torch.backends.mkl.is_available()}, sleef symbol {sym}"
        ),
    )
    print(
        f"torch_sin_f32.npz: {x.size} sines ({len(grid)} grid latitudes), "
        f"{(offset != 0).mean():.2%} differ from {sym}"
    )


def crop(lat: np.ndarray, p: int) -> np.ndarray:
    """Drop the last latitude when one too many, as `Batch.crop` does."""
    return lat[:-1] if lat.size % p == 1 else lat


def reference_parts(lat: np.ndarray, lon: np.ndarray, p: int) -> dict[str, np.ndarray]:
    """Root areas and the sines and square roots the reference computed for them."""
    grid = lat_lon_meshgrid(torch.from_numpy(lat), torch.from_numpy(lon))[None]
    lat_max = F.max_pool2d(grid[:, 0], (p, p))
    lat_min = -F.max_pool2d(-grid[:, 0], (p, p))
    lon_max = F.max_pool2d(grid[:, 1], (p, p))
    lon_min = -F.max_pool2d(-grid[:, 1], (p, p))
    root_area = patch_root_area(lat_min, lon_min, lat_max, lon_max).reshape(-1)
    sin_in = torch.unique(
        torch.cat([torch.deg2rad(lat_max).reshape(-1), torch.deg2rad(lat_min).reshape(-1)])
    )
    # The areas under the square root, evaluated as `patch_root_area` evaluates them.
    sin_span = torch.sin(torch.deg2rad(lat_max)) - torch.sin(torch.deg2rad(lat_min))
    area = 6371**2 * torch.pi * sin_span * (torch.deg2rad(lon_max) - torch.deg2rad(lon_min))
    area = area.reshape(-1)
    assert torch.equal(torch.sqrt(area), root_area)
    sqrt_in = torch.unique(area)
    return {
        "root_area": root_area.numpy(),
        "sin_in": sin_in.numpy(),
        "sin_out": torch.sin(sin_in).numpy(),
        "sqrt_in": sqrt_in.numpy(),
        "sqrt_out": torch.sqrt(sqrt_in).numpy(),
    }


def make_posenc_table() -> None:
    f32 = np.float32
    full = {  # name: (lat, lon, patch size, dim); encodings stored in full
        "g32x64_p4_d256": (np.linspace(90, -90, 32), np.arange(64) * 5.625, 4, 256),
        "g17x32_p4_d128": (np.linspace(90, -90, 17), np.arange(32) * 11.25, 4, 128),
        "g3deg_p10_d512": (90 - 3.0 * np.arange(61), 3.0 * np.arange(120), 10, 512),
        "g18x36_p2_d64": (np.linspace(85, -85, 18), 10.0 * np.arange(36), 2, 64),
        "regional_p2_d128": (
            np.arange(80, 19, -10.0),
            np.concatenate([np.arange(0, 41, 10.0), np.arange(290, 351, 10.0)]),
            2,
            128,
        ),
    }
    areas_only = {  # name: (lat, lon, patch size); only root areas stored
        "g025_p4": (np.linspace(90, -90, 721), np.linspace(0, 360, 1440, endpoint=False), 4),
        "g025_p10": (np.linspace(90, -90, 721), np.linspace(0, 360, 1440, endpoint=False), 10),
        "g1p5_p2": (np.linspace(90, -90, 121), 1.5 * np.arange(240), 2),
    }
    out: dict[str, np.ndarray] = {"min_patch_area": np.array(_min_patch_area)}
    names = []
    for name, (lat, lon, p, dim) in full.items():
        lat, lon = crop(np.asarray(lat).astype(f32), p), np.asarray(lon).astype(f32)
        pos, scale = pos_scale_enc(
            dim, torch.from_numpy(lat), torch.from_numpy(lon), p, pos_expansion, scale_expansion
        )
        out.update(
            {
                f"{name}/lat": lat,
                f"{name}/lon": lon,
                f"{name}/patch_size": np.array(p),
                f"{name}/dim": np.array(dim),
                f"{name}/pos": pos.numpy(),
                f"{name}/scale": scale.numpy(),
            }
        )
        out.update({f"{name}/{k}": v for k, v in reference_parts(lat, lon, p).items()})
        names.append(name)
    for name, (lat, lon, p) in areas_only.items():
        lat, lon = crop(np.asarray(lat).astype(f32), p), np.asarray(lon).astype(f32)
        out.update({f"{name}/lat": lat, f"{name}/lon": lon, f"{name}/patch_size": np.array(p)})
        out.update({f"{name}/{k}": v for k, v in reference_parts(lat, lon, p).items()})
        names.append(name)
    out["grids"] = np.array(names)

    # Other expansions, with the dtypes microsoft-aurora's encoder feeds them.
    levels = torch.tensor([50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000])
    lead = torch.tensor([1 / 60, 1.0, 6.0, 12.0, 504.0], dtype=torch.float32)
    hours = torch.tensor([0.0, 1.5, 420768.0, 473352.5], dtype=torch.float32)
    out.update(
        {
            "expansion/levels_in": levels.numpy(),
            "expansion/levels": levels_expansion(levels, 512).numpy(),
            "expansion/lead_in": lead.numpy(),
            "expansion/lead": lead_time_expansion(lead, 512).numpy(),
            "expansion/lead_v3": lead_time_expansion_v3(lead, 512).numpy(),
            "expansion/time_in": hours.numpy(),
            "expansion/time": absolute_time_expansion(hours, 512).numpy(),
        }
    )
    np.savez_compressed(DATA / "reference_posenc.npz", **out)
    print(f"reference_posenc.npz: {len(names)} grids")


if __name__ == "__main__":
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    DATA.mkdir(parents=True, exist_ok=True)
    make_sin_table()
    make_posenc_table()
