"""Input pipeline throughput at Aurora's 0.25 degree size: batches per second, data wait, bytes.

    python benchmarks/input_pipeline.py [--times 6] [--batch-size 1] [--rollout-steps 1]
        [--codec none|zstd|lz4] [--num-workers 0 1 2]

Writes ``--times`` 6-hourly states (721 x 1440, 4 surface and 5 atmospheric variables on 13
levels, plus statics) as array_record with the `era5` builder's own writing path; the fields are
**synthetic** (smooth patterns with realistic magnitudes plus 0.2 % noise, so the low mantissa
bits are as incompressible as real data's). Then reads one epoch with `Pipeline` without prefetch
(``num_threads=0``) and with prefetch, with and without a consumer that "trains" (a ``--step-s``
sleep standing in for an accelerator step, by default 1.1 x the time to load a batch), and reports
batches/s, the consumer's wait in ``next()`` (first batch and later ones) and the bytes read per
batch (decoded float32 and on disk). Then the decoded MB/s of reading records one after the other
in this process (one core), and a consumer that does not wait with each ``--num-workers`` count
(0: prefetch threads; the steady-state latency is the mean wait after the first batch). Writes a
result file (`benchmarks/results.py`).

microsoft-aurora has no input pipeline, so there is no reference side. Each time step is ~290 MB of
float32 (about 1 GB of peak memory per in-flight batch with K = 1): keep ``--times`` small.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import tensorflow_datasets as tfds

from aurora.variables import ATMOS_VARS as ATMOS
from aurora.variables import SURF_VARS as SURF
from benchmarks import results
from data_builders.builders import AURORA_LEVELS, Era5, global_grid
from data_builders.pipeline import Pipeline, WeatherSource, open_source

START = np.datetime64("2020-01-01T00", "s")
_MEAN_AMP = {
    "2t": (278.0, 25.0),
    "10u": (0.0, 8.0),
    "10v": (0.0, 6.0),
    "msl": (101000.0, 1500.0),
    "u": (10.0, 15.0),
    "v": (0.0, 8.0),
}


def level_mean_amp(var: str, p: float) -> tuple[float, float]:
    """Typical mean and amplitude of an atmospheric variable at pressure level p (hPa)."""
    if var == "z":
        mean = 9.80665 * 44330.8 * (1 - (p / 1013.25) ** 0.190263)
        return mean, 0.03 * mean + 300.0
    if var == "t":
        return max(288.0 - 0.09 * (1000.0 - p), 215.0), 15.0
    if var == "q":
        scale = 0.012 * (p / 1000.0) ** 3
        return scale / 2, scale / 2
    return _MEAN_AMP[var]


def smooth_field(
    mean: float,
    amp: float,
    phase: float,
    lat: np.ndarray,
    lon: np.ndarray,
    rng: np.random.Generator,
) -> np.ndarray:
    """mean + amp * (zonal structure + travelling waves + 0.2 % noise), float32 (lat, lon)."""
    phi, lam = np.deg2rad(lat)[:, None], np.deg2rad(lon)[None, :]
    pattern = 0.6 * np.cos(2 * phi) + 0.3 * np.cos(phi) * np.sin(3 * lam + phase)
    pattern = pattern + 0.1 * np.cos(phi) ** 2 * np.sin(7 * lam - 0.7 * phase)
    noise = rng.standard_normal(pattern.shape, dtype=np.float32) * np.float32(0.002)
    return (mean + amp * (pattern + noise)).astype(np.float32)


class SyntheticEra5(Era5, skip_registration=True):
    """The real `era5` builder with its two reading hooks replaced by the fields above."""

    name = "synthetic_era5"

    def _read_dynamic(self, time: slice) -> xr.Dataset | None:
        lat, lon = global_grid(0.25)
        lo, hi = np.datetime64(time.start, "s"), np.datetime64(time.stop, "s")
        first = START + np.timedelta64(-(-(lo - START) // np.timedelta64(6, "h")) * 6, "h")
        times = list(np.arange(first, hi + np.timedelta64(1, "s"), np.timedelta64(6, "h")))
        if not times:
            return None
        data: dict[str, Any] = {}
        for v in SURF:
            data[v] = (
                ("time", "latitude", "longitude"),
                np.stack(
                    [smooth_field(*_MEAN_AMP[v], _phase(t, v), lat, lon, _rng(t, v)) for t in times]
                ),
            )
        for v in ATMOS:
            data[v] = (
                ("time", "level", "latitude", "longitude"),
                np.stack(
                    [
                        np.stack(
                            [
                                smooth_field(
                                    *level_mean_amp(v, p),
                                    _phase(t, v) + p / 300,
                                    lat,
                                    lon,
                                    _rng(t, v, p),
                                )
                                for p in AURORA_LEVELS
                            ]
                        )
                        for t in times
                    ]
                ),
            )
        coords = {
            "time": np.array(times, "datetime64[ns]"),
            "level": list(AURORA_LEVELS),
            "latitude": lat,
            "longitude": lon,
        }
        return xr.Dataset(data, coords=coords)

    def _read_static(self) -> xr.Dataset:
        lat, lon = global_grid(0.25)
        rng = np.random.default_rng(0)
        lsm = (smooth_field(0.5, 0.8, 1.0, lat, lon, rng) > 0.5).astype(np.float32)
        z = np.maximum(smooth_field(2000.0, 5000.0, 2.0, lat, lon, rng), 0) * lsm
        slt = np.round(smooth_field(3.0, 4.0, 3.0, lat, lon, rng)).clip(0, 7) * lsm
        dims = ("latitude", "longitude")
        return xr.Dataset(
            {"lsm": (dims, lsm), "z_sfc": (dims, z), "slt": (dims, slt)},
            coords={"latitude": lat, "longitude": lon},
        )


def _all_times(n: int) -> list[np.datetime64]:
    return [START + np.timedelta64(6 * i, "h") for i in range(n)]


def _phase(t: np.datetime64, v: str) -> float:
    hours = float((t - START) / np.timedelta64(1, "h"))
    return hours / 6.0 * 0.4 + (sum(map(ord, v)) % 7)


def _rng(t: np.datetime64, v: str, p: float = 0.0) -> np.random.Generator:
    return np.random.default_rng([int(t.astype(np.int64)), sum(map(ord, v)), int(p)])


class CountingRecords:
    """Records proxy: counts the records read and their decoded bytes (totals only)."""

    def __init__(self, records: Any) -> None:
        self.records, self.count, self.nbytes = records, 0, 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Any:
        ex = self.records[i]
        self.count += 1
        self.nbytes += sum(x.nbytes for g in ("surf", "atmos") for x in ex.get(g, {}).values())
        return ex


def build(workdir: Path, n_times: int, codec: str = "none") -> tuple[Any, float]:
    """Write the dataset with the real builder; returns (builder, seconds)."""
    end = str(_all_times(n_times)[-1])
    builder = SyntheticEra5(
        data_dir=workdir,
        paths=["<synthetic>"],
        resolution=0.25,
        splits={"train": (str(START), end)},
        chunk_hours=6,
        codec=codec,
    )
    t = time.perf_counter()
    builder.download_and_prepare()
    return builder, time.perf_counter() - t


def decode_rate(source: WeatherSource, repeats: int = 3) -> float:
    """Decoded MB/s of reading every record in turn in this process (one core)."""
    nbytes, t = 0, time.perf_counter()
    for _ in range(repeats):
        for i in range(len(source.records)):
            ex = source.records[i]
            nbytes += sum(x.nbytes for g in ("surf", "atmos") for x in ex.get(g, {}).values())
    return nbytes / (time.perf_counter() - t) / 1e6


def measure_workers(source: WeatherSource, args: argparse.Namespace, workers: int) -> dict:
    """Batch latency seen by a consumer that does not wait, over `--epochs` epochs."""
    p = Pipeline(
        source,
        rollout_steps=args.rollout_steps,
        batch_size=args.batch_size,
        seed=0,
        num_epochs=args.epochs,
        num_threads=args.threads,
        prefetch_buffer_size=args.prefetch,
        num_workers=workers,
    )
    it = iter(p)
    waits = []
    while True:
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t)
    if hasattr(it, "close"):
        it.close()
    return {
        "num_workers": workers,
        "batches": len(waits),
        "first_wait_s": waits[0],
        "steady_s_per_batch": float(np.mean(waits[1:])) if len(waits) > 1 else float("nan"),
    }


def measure(source: WeatherSource, args: argparse.Namespace, threads: int, step_s: float) -> dict:
    """Iterate one epoch; time per batch as seen by the consumer (which sleeps `step_s`)."""
    counting = CountingRecords(source.records)
    src = dataclasses.replace(source, records=counting)
    p = Pipeline(
        src,
        rollout_steps=args.rollout_steps,
        batch_size=args.batch_size,
        seed=0,
        num_threads=threads,
        prefetch_buffer_size=args.prefetch if threads else 0,
    )
    it = iter(p)
    waits, n = [], 0
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        try:
            _inputs, _targets = next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t)
        n += 1
        if step_s:
            time.sleep(step_s)  # the accelerator step this batch would feed
    total = time.perf_counter() - start
    return {
        "batches": n,
        "total_s": total,
        "batches_per_s": n / total,
        "mean_wait_s": float(np.mean(waits)),
        "first_wait_s": waits[0],
        "steady_wait_s": float(np.mean(waits[1:])) if n > 1 else float("nan"),
        "steady_s_per_batch": float(np.mean(waits[1:])) + step_s if n > 1 else float("nan"),
        "records_per_batch": counting.count / n,
        "decoded_bytes_per_batch": counting.nbytes / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--times", type=int, default=6, help="6-hourly time steps to write")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--rollout-steps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="prefetch threads")
    ap.add_argument("--prefetch", type=int, default=2, help="batches prefetched")
    ap.add_argument(
        "--step-s",
        type=float,
        default=None,
        help="simulated accelerator step in s (default: 1.1 x the measured time to "
        "load one batch without prefetch)",
    )
    ap.add_argument("--codec", default="none", choices=("none", "zstd", "lz4"))
    ap.add_argument(
        "--num-workers", type=int, nargs="*", default=[0, 1, 2], help="worker counts to time"
    )
    ap.add_argument("--epochs", type=int, default=3, help="epochs per worker-count run")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    results.add_out_argument(ap)
    args = ap.parse_args()
    tfds.disable_progress_bar()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="aurora_input_bench_"))
    try:
        figures = run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results.write("input_pipeline", args, figures)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Builds the dataset, measures every reading setting, prints and returns the figures."""
    print(
        "Input pipeline benchmark: SYNTHETIC smooth fields (realistic magnitudes, 0.2 % noise) "
        "written by the real era5 builder path to array_record"
    )
    builder, build_s = build(workdir, args.times, args.codec)
    source = open_source(builder, "train")
    files = sorted(Path(builder.data_dir).glob("*.array_record-*"))
    disk = sum(f.stat().st_size for f in files)
    raw = (len(SURF) + len(ATMOS) * len(AURORA_LEVELS)) * 721 * 1440 * 4
    print(
        f"grid 721x1440, {len(SURF)} surface + {len(ATMOS)}x{len(AURORA_LEVELS)} atmospheric "
        f"fields; {args.times} times; record {raw / 1e6:.0f} MB float32, "
        f"{disk / args.times / 1e6:.0f} MB on disk (codec {args.codec}, "
        f"ratio {disk / (raw * args.times):.2f}); build {build_s:.1f} s "
        f"({build_s / args.times:.1f} s per time step)"
    )
    print(
        f"batch size {args.batch_size}, history 2 + {args.rollout_steps} target(s); "
        f"{2 + args.rollout_steps} records per window; machine: {results.cpu_count()} CPU cores"
    )
    rows = []
    runs = [
        ("no prefetch", 0, 0.0),
        (f"prefetch {args.threads} thr", args.threads, 0.0),
        ("no prefetch", 0, None),
        ("prefetch 1 thr", 1, None),
        (f"prefetch {args.threads} thr", args.threads, None),
    ]
    print(
        f"  {'':<16} {'step s':>6} {'batches':>7} {'batches/s':>9} {'s/batch':>7} "
        f"{'steady s/batch':>14} {'wait first':>10} {'wait later':>10}"
    )
    for label, threads, step in runs:
        if step is None:
            step = args.step_s if args.step_s is not None else 1.1 / rows[0][3]["batches_per_s"]
        r = measure(source, args, threads, step)
        rows.append((label, threads, step, r))
        print(
            f"  {label:<16} {step:6.2f} {r['batches']:7d} {r['batches_per_s']:9.3f} "
            f"{1 / r['batches_per_s']:7.2f} {r['steady_s_per_batch']:14.2f} "
            f"{r['first_wait_s']:10.2f} {r['steady_wait_s']:10.2f}"
        )
    r = rows[0][3]
    per_record_disk = disk / args.times
    print(
        f"bytes read per batch: {r['records_per_batch']:.2f} records, "
        f"{r['decoded_bytes_per_batch'] / 1e6:.0f} MB decoded float32, "
        f"{r['records_per_batch'] * per_record_disk / 1e6:.0f} MB from disk"
    )
    decoded_mb_s = decode_rate(source)
    print(f"decoded {decoded_mb_s:.0f} MB/s reading records in one process (one core)")
    worker_runs = []
    for n in args.num_workers:
        w = measure_workers(source, args, n)
        worker_runs.append(w)
        print(
            f"  {n} worker(s): {w['batches']} batches, first {w['first_wait_s']:.2f} s, "
            f"steady {w['steady_s_per_batch']:.2f} s per batch"
        )
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"peak RSS {peak_rss_gb:.2f} GB (this process; workers not included)")
    return {
        "record_mb_float32": raw / 1e6,
        "record_mb_on_disk": per_record_disk / 1e6,
        "compression_ratio": disk / (raw * args.times),
        "build_s": build_s,
        "build_s_per_time_step": build_s / args.times,
        "records_per_batch": r["records_per_batch"],
        "decoded_mb_per_batch": r["decoded_bytes_per_batch"] / 1e6,
        "disk_mb_per_batch": r["records_per_batch"] * per_record_disk / 1e6,
        "peak_rss_gb": peak_rss_gb,
        "codec": args.codec,
        "decoded_mb_per_s_per_core": decoded_mb_s,
        "worker_runs": worker_runs,
        "runs": [{"label": label, "threads": t, "step_s": step, **r} for label, t, step, r in rows],
    }


if __name__ == "__main__":
    main()
