"""`make demo`: a short Aurora rollout on a bundled real IFS HRES sample, saying what it does.

Until the trainer lands this is the project's main job: read real data with our readers, build a
`Batch`, initialise a small Aurora (random weights: no checkpoint can be downloaded here), roll it
out four 6-hour steps and score every step against the real analysis, next to persistence.
Random weights forecast badly; the point is the plumbing, end to end, on real files.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

import aurora
from data_builders.readers import open_dataset, regrid

DATA = Path(__file__).parent / "tests" / "data"
PRESSURE_LEVELS = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
STATIC = DATA / "era5_static_z_lsm_0.25deg.nc"
ATMOS_VARS = ("z", "u", "v", "t", "r")
STEPS = 4


def load_sample() -> tuple[aurora.Batch, list[aurora.Batch], dict[str, tuple[float, float]]]:
    """History (first two times), the truth for the next `STEPS` times, and stats for `r`."""
    ds = open_dataset(PRESSURE_LEVELS, variables=list(ATMOS_VARS))
    static = regrid(open_dataset(STATIC), ds.latitude.values, ds.longitude.values, method="bilinear")
    levels = tuple(float(x) for x in ds.level.values)
    # Relative humidity is not in Aurora's normalisation table: take its statistics from the data.
    r = ds["r"].values
    stats = {f"r_{int(lv)}": (float(r[:, i].mean()), float(r[:, i].std())) for i, lv in enumerate(levels)}

    def batch(times: slice) -> aurora.Batch:
        part = ds.isel(time=times)
        return aurora.Batch(
            surf_vars={},
            static_vars={"lsm": static["lsm"].values, "z": static["z_sfc"].values},
            atmos_vars={v: part[v].values[None] for v in ATMOS_VARS},
            metadata=aurora.Metadata(
                lat=ds.latitude.values,
                lon=ds.longitude.values,
                time=part.time.values[-1:],
                atmos_levels=levels,
            ),
        )

    truth = [batch(slice(k, k + 1)) for k in range(2, 2 + STEPS)]
    return batch(slice(0, 2)), truth, stats


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


def main() -> None:
    history, truth, stats = load_sample()
    print(f"Read {PRESSURE_LEVELS.name}: variables {ATMOS_VARS}, levels {history.metadata.atmos_levels} hPa,")
    print(f"  grid {history.spatial_shape[0]}x{history.spatial_shape[1]} (10 degrees), history ending {history.metadata.datetimes()[0]}")
    print(f"Static lsm and z from {STATIC.name}, regridded 0.25 -> 10 degrees")

    model = aurora.Aurora(
        surf_vars=(),
        static_vars=("lsm", "z"),
        atmos_vars=ATMOS_VARS,
        patch_size=2,
        embed_dim=64,
        num_heads=4,
        encoder_depths=(2, 2),
        encoder_num_heads=(2, 4),
        decoder_depths=(2, 2),
        decoder_num_heads=(4, 2),
        window_size=(2, 3, 6),
        use_lora=True,
        surf_stats=stats,
    )
    start = time.perf_counter()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), history)["params"]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"Initialised a small Aurora (LoRA on): {n_params:,} parameters in {time.perf_counter() - start:.1f} s")

    i500 = history.metadata.atmos_levels.index(500.0)
    print(f"\nRollout of {STEPS} x 6 h (random weights), RMSE at 500 hPa against the real analysis:")
    print(f"{'step':>4} {'valid time':>20} {'z500 model':>11} {'z500 persist':>13} {'t500 model':>11} {'t500 persist':>13}")
    start = time.perf_counter()
    for k, pred in enumerate(aurora.rollout(model, params, history, steps=STEPS)):
        target = truth[k].crop(model.patch_size)
        last = history.crop(model.patch_size)
        cells = [
            rmse(pred.atmos_vars[v][0, 0, i500], target.atmos_vars[v][0, 0, i500]) for v in ("z", "t")
        ]
        persist = [rmse(last.atmos_vars[v][0, 1, i500], target.atmos_vars[v][0, 0, i500]) for v in ("z", "t")]
        valid = pred.metadata.datetimes()[0]
        assert valid == target.metadata.datetimes()[0], "prediction and truth must be valid at the same time"
        print(f"{int(pred.metadata.rollout_step):>4} {valid!s:>20} {cells[0]:>11.1f} {persist[0]:>13.1f} {cells[1]:>11.2f} {persist[1]:>13.2f}")
    print(f"Rollout took {time.perf_counter() - start:.1f} s (one compilation serves every step).")


if __name__ == "__main__":
    main()
