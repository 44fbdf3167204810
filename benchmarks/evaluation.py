"""Evaluation at 0.25°: host memory, reads per record and seconds per forecast of scoring and
writing 40-step (10-day) forecasts from several 00/12 UTC inits.

The data are generated on read (a smooth field per variable and level, shifted by the time), so
the source itself holds one state and every read is counted; the model is a cheap stand-in
(its newest input state plus a constant) with Aurora's patch size, so the figures are the
evaluation code's own, not a model's. Scoring uses a climatology that is a function of valid
time (as WB2's day-of-year one). Peak host memory is the process's peak resident set size,
compared with one forecast's worth (``steps`` states on the model's grid).

    python benchmarks/evaluation.py                      # 721 x 1440, 13 levels, 3 inits
    python benchmarks/evaluation.py --inits 2 --steps 8  # quicker
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aurora.batch import Batch
from aurora.variables import AURORA_LEVELS
from benchmarks import results
from data_builders.pipeline import WeatherSource
from trainers.evaluation import job_uses, predict
from trainers.evaluation.scoring import evaluate_with_examples
from trainers.evaluation.states import SourceStates

HOUR = 3600


class GeneratedRecords:
    """States made on read: a smooth base field plus a time-dependent offset; reads counted."""

    def __init__(self, times: np.ndarray, shape: tuple[int, int], levels: int, surf, atmos) -> None:
        h, w = shape
        lat, lon = np.meshgrid(
            np.linspace(0, np.pi, h), np.linspace(0, 2 * np.pi, w), indexing="ij"
        )
        self.base = (np.sin(lat) * np.cos(lon)).astype(np.float32)
        self.times, self.levels, self.surf, self.atmos = times, levels, surf, atmos
        self.reads: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.times)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = int(self.times[i])
        self.reads[t] = self.reads.get(t, 0) + 1
        shift = np.float32(t / 86400)
        return {
            "time": t,
            "surf": dict.fromkeys(self.surf, self.base + shift),
            "atmos": {
                k: np.stack([self.base + shift + j for j in range(self.levels)]) for k in self.atmos
            },
        }


class StandIn:
    """A cheap model with Aurora's interface: the newest input state plus 0.1."""

    static_vars = ()
    patch_size = 4
    timestep_minutes = 360

    def __init__(self, surf: tuple[str, ...], atmos: tuple[str, ...]) -> None:
        self.surf_vars, self.atmos_vars = surf, atmos

    def apply(self, variables: Any, batch: Batch) -> Batch:
        last = lambda d: {k: v[:, -1:] + 0.1 for k, v in d.items()}
        meta = batch.metadata
        return Batch(
            surf_vars=last(batch.surf_vars),
            static_vars={},
            atmos_vars=last(batch.atmos_vars),
            metadata=meta.replace(time=meta.time + 360, rollout_step=meta.rollout_step + 1),
        )


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=float, default=0.25)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--inits", type=int, default=3, help="00/12 UTC inits")
    parser.add_argument("--surf", default="2t")
    parser.add_argument("--atmos", default="z")
    parser.add_argument("--levels", type=int, default=len(AURORA_LEVELS))
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--skip-predict", action="store_true")
    results.add_out_argument(parser)
    args = parser.parse_args()
    surf = tuple(v for v in args.surf.split(",") if v)
    atmos = tuple(v for v in args.atmos.split(",") if v)
    h, w = round(180 / args.resolution) + 1, round(360 / args.resolution)
    t0 = int(np.datetime64("2022-01-01T00", "s").astype(np.int64))
    n_times = 1 + 2 * (args.inits - 1) + args.steps + 1  # history, inits 12 h apart, leads
    times = t0 - 6 * HOUR + 6 * HOUR * np.arange(n_times, dtype=np.int64)
    records = GeneratedRecords(times, (h, w), args.levels, surf, atmos)
    levels = tuple(float(x) for x in AURORA_LEVELS[: args.levels])
    source = WeatherSource(
        records=records,
        lat=np.linspace(90, -90, h),
        lon=np.arange(w) * args.resolution,
        levels=levels,
        times=times,
        name=f"generated {h}x{w}",
    )
    model = StandIn(surf, atmos)
    rows = h // model.patch_size * model.patch_size
    state_bytes = (len(surf) + len(atmos) * args.levels) * rows * w * 4
    forecast_gib = args.steps * state_bytes / 2**30
    clim_base = {
        "surf": dict.fromkeys(surf, records.base),
        "atmos": {k: np.stack([records.base] * args.levels) for k in atmos},
    }

    def climatology(t: int) -> dict[str, dict[str, np.ndarray]]:  # a new array per valid time
        s = np.float32((t % (365 * 86400)) / 86400)
        return {g: {k: v + s for k, v in d.items()} for g, d in clim_base.items()}

    print(
        f"{h}x{w}, {len(levels)} levels, {surf}+{atmos}: {state_bytes / 2**20:.0f} MiB a state, "
        f"{forecast_gib:.2f} GiB a {args.steps}-step forecast; {args.inits} inits",
        flush=True,
    )
    base_rss = peak_rss_gib()
    lead_steps = list(range(1, args.steps + 1))
    inits = t0 + 12 * HOUR * np.arange(args.inits)
    states = SourceStates(source, surf, atmos, job_uses(source, inits, 6 * HOUR, lead_steps))
    start = time.perf_counter()
    scored, _ = evaluate_with_examples(
        model, {}, source, steps=args.steps, step_hours=6, climatology=climatology,  # type: ignore[arg-type]
        batch_size=args.batch_size, name="stand-in", map_lead_steps=(), states=states, inits=inits,
    )  # fmt: skip
    jax.effects_barrier()
    score_s = time.perf_counter() - start
    score_rss = peak_rss_gib()
    reads = dict(records.reads)
    figures: dict[str, Any] = {
        "grid": [h, w],
        "levels": len(levels),
        "variables": [*surf, *atmos],
        "state_mib": state_bytes / 2**20,
        "forecast_gib": forecast_gib,
        "inits": args.inits,
        "steps": args.steps,
        "baseline_rss_gib": base_rss,
        "score": {
            "seconds": score_s,
            "seconds_per_forecast": score_s / args.inits,
            "peak_rss_gib": score_rss,
            "peak_rss_forecasts": (score_rss - base_rss) / forecast_gib,
            "reads_per_record_max": max(reads.values()),
            "records_read": len(reads),
            "records": len(times),
            "most_states_kept": states.most_kept,
            "rows": len(scored),
        },
    }
    print(
        f"score: {score_s:.1f} s ({score_s / args.inits:.1f} s/forecast), peak RSS "
        f"{score_rss:.2f} GiB ({figures['score']['peak_rss_forecasts']:.2f} forecasts above "
        f"{base_rss:.2f}), reads/record max {max(reads.values())}, kept {states.most_kept}",
        flush=True,
    )
    if not args.skip_predict:
        records.reads.clear()
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            paths = predict(
                model, {}, source, steps=args.steps, out_dir=tmp, formats=("zarr",), inits=inits
            )  # type: ignore[arg-type]
            predict_s = time.perf_counter() - start
            disk = sum(p.stat().st_size for p in Path(paths["zarr"]).rglob("*") if p.is_file())
        rss = peak_rss_gib()
        figures["predict_zarr"] = {
            "seconds": predict_s,
            "seconds_per_forecast": predict_s / args.inits,
            "peak_rss_gib": rss,
            "reads_per_record_max": max(records.reads.values()),
            "disk_gib": disk / 2**30,
            "disk_gib_per_forecast": disk / 2**30 / args.inits,
        }
        print(
            f"predict (zarr): {predict_s:.1f} s ({predict_s / args.inits:.1f} s/forecast), "
            f"{disk / 2**30:.2f} GiB on disk, peak RSS {rss:.2f} GiB, reads/record max "
            f"{max(records.reads.values())}",
            flush=True,
        )
    results.write("evaluation", args, figures)


if __name__ == "__main__":
    main()
