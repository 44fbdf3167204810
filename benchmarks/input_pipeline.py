"""Input pipeline throughput at Aurora's 0.25 degree size: batches per second, data wait, bytes.

    python benchmarks/input_pipeline.py [--times 6] [--batch-size 1] [--rollout-steps 1]
        [--codec none|zstd|lz4] [--num-workers 0 1 2] [--build-workers 1 2] [--no-zarr]

Writes ``--times`` 6-hourly states (721 x 1440, 4 surface and 5 atmospheric variables on 13
levels, plus statics) with the `era5` builder's own writing path, once per ``--build-workers``
count (time per time step); the fields are **synthetic** (smooth patterns with realistic
magnitudes plus 0.2 % noise, so the low mantissa bits are as incompressible as real data's). The
same fields are also written as a zarr store in WeatherBench2's layout (long names, one chunk per
time and variable, south-to-north latitude) and read by the streaming `zarr` source, locally and
over a loopback HTTP server: decoded MB/s per wall second and per CPU second of this process.
Then reads one epoch of the built dataset with `Pipeline` without prefetch
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
import functools
import resource
import shutil
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
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
from data_builders.zarr_source import ZarrBuilder

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

    def _source_times(self) -> np.ndarray:
        """A year of 6-hourly times from START; the splits select the ones built."""
        return np.arange(START, START + np.timedelta64(365, "D"), np.timedelta64(6, "h")).astype(
            "datetime64[ns]"
        )

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
        z = np.maximum(smooth_field(2000.0, 5000.0, 2.0, lat, lon, rng), 0) * lsm * 9.80665
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


def build(
    workdir: Path, n_times: int, codec: str = "none", build_workers: int = 1
) -> tuple[Any, float]:
    """Write the dataset with the real builder; returns (builder, seconds)."""
    end = str(_all_times(n_times)[-1])
    builder = SyntheticEra5(
        data_dir=workdir,
        paths=["<synthetic>"],
        resolution=0.25,
        splits={"train": (str(START), end)},
        chunk_hours=6,
        codec=codec,
        build_workers=build_workers,
    )
    t = time.perf_counter()
    builder.download_and_prepare()
    return builder, time.perf_counter() - t


def decode_rate(records: Any, repeats: int = 3) -> dict[str, float]:
    """Decoded MB/s of reading every record in turn in this process, per wall and CPU second.

    Fields are touched (summed) so that lazily mapped bytes count as read.
    """
    nbytes, wall, cpu = 0, time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for i in range(len(records)):
            ex = records[i]
            for g in ("surf", "atmos"):
                for x in ex.get(g, {}).values():
                    nbytes += x.nbytes
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "mb_per_s": nbytes / wall / 1e6,
        "mb_per_cpu_s": nbytes / cpu / 1e6,
        "s_per_record": wall / (repeats * len(records)),
    }


_WB2_NAMES = {
    "2t": ("2m_temperature", "K"),
    "10u": ("10m_u_component_of_wind", "m s**-1"),
    "10v": ("10m_v_component_of_wind", "m s**-1"),
    "msl": ("mean_sea_level_pressure", "Pa"),
    "z": ("geopotential", "m**2 s**-2"),
    "u": ("u_component_of_wind", "m s**-1"),
    "v": ("v_component_of_wind", "m s**-1"),
    "t": ("temperature", "K"),
    "q": ("specific_humidity", "kg kg**-1"),
    "lsm": ("land_sea_mask", "(0 - 1)"),
    "slt": ("soil_type", "~"),
    "z_sfc": ("geopotential_at_surface", "m**2 s**-2"),
}


def write_wb2_store(builder: Any, path: Path, n_times: int) -> float:
    """The synthetic fields as a zarr store in WeatherBench2's layout; returns MB on disk."""
    for i, t in enumerate(_all_times(n_times)):
        ds = builder._read_dynamic(slice(t, t))
        if i == 0:
            ds = ds.merge(builder._read_static())
        ds = ds.rename({k: _WB2_NAMES[k][0] for k in ds.data_vars}).isel(
            latitude=slice(None, None, -1)
        )
        for k in ds.data_vars:
            ds[k].attrs["units"] = next(u for n, u in _WB2_NAMES.values() if n == k)
        ds = ds.assign_coords(level=ds["level"].astype(np.int64))
        if i == 0:
            enc: dict[str, Any] = {
                v: {"chunks": tuple(1 if d == "time" else ds.sizes[d] for d in ds[v].dims)}
                for v in ds.data_vars
            }
            # WeatherBench2's time encoding (a first time of 0 would be a fill-value chunk)
            enc["time"] = {"units": "hours since 1959-01-01", "dtype": "int64"}
            ds.to_zarr(path, mode="w", zarr_format=2, consolidated=True, encoding=enc)
        else:
            timed = ds[[k for k in ds.data_vars if "time" in ds[k].dims]]
            timed.to_zarr(path, mode="a", append_dim="time", consolidated=True)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def zarr_rates(workdir: Path, store: Path) -> dict[str, dict[str, float]]:
    """Decoded MB/s of the streaming zarr source, local and over loopback HTTP."""

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(store.parent))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = {}
    try:
        urls = {
            "local": str(store),
            "http": f"http://127.0.0.1:{server.server_port}/{store.name}",
        }
        for name, url in urls.items():
            b = ZarrBuilder(
                url,
                static_vars=("lsm", "slt", "z"),
                data_dir=workdir / f"zarr_{name}",
                read_ahead=0,
                splits={"train": (None, None)},
            )
            b.download_and_prepare()
            records = b.as_data_source("train").records
            records[0]  # opens the store
            out[name] = decode_rate(records, repeats=1)
    finally:
        server.shutdown()
        server.server_close()
    return out


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
    ap.add_argument(
        "--build-workers", type=int, nargs="*", default=[1, 2], help="build worker counts to time"
    )
    ap.add_argument("--no-zarr", action="store_true", help="skip the zarr store measurements")
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
        "written by the real era5 builder path (record format 3)"
    )
    builds = {}
    for n in sorted(args.build_workers, reverse=True):  # the last one built is read below
        builder, build_s = build(workdir / f"build{n}", args.times, args.codec, n)
        builds[n] = build_s
        print(
            f"build with {n} worker(s): {build_s:.1f} s "
            f"({build_s / args.times:.1f} s per time step)"
        )
    build_s = builds[min(builds)]
    source = open_source(builder, "train")
    disk = sum(f.stat().st_size for f in builder.blob_root().glob("*.bin"))
    raw = (len(SURF) + len(ATMOS) * len(AURORA_LEVELS)) * 721 * 1440 * 4
    print(
        f"grid 721x1440, {len(SURF)} surface + {len(ATMOS)}x{len(AURORA_LEVELS)} atmospheric "
        f"fields; {args.times} times; record {raw / 1e6:.0f} MB float32, "
        f"{disk / args.times / 1e6:.0f} MB on disk (codec {args.codec}, "
        f"ratio {disk / (raw * args.times):.2f})"
    )
    zarr: dict[str, Any] = {}
    if not args.no_zarr:
        store = workdir / "src" / "wb2.zarr"
        store.parent.mkdir(parents=True, exist_ok=True)
        zarr["store_mb_per_time"] = write_wb2_store(builder, store, args.times) / args.times
        zarr.update(zarr_rates(workdir, store))
        for name in ("local", "http"):
            r = zarr[name]
            print(
                f"zarr store ({name}, WeatherBench2 layout, {zarr['store_mb_per_time']:.0f} MB "
                f"per time on disk): {r['s_per_record']:.2f} s per record, "
                f"{r['mb_per_s']:.0f} MB/s decoded, {r['mb_per_cpu_s']:.0f} MB per CPU-second"
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
    rate = decode_rate(source.records)
    decoded_mb_s = rate["mb_per_s"]
    print(
        f"built records: {rate['s_per_record']:.3f} s per record, {decoded_mb_s:.0f} MB/s "
        f"decoded in one process, {rate['mb_per_cpu_s']:.0f} MB per CPU-second"
    )
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
        "build_s_per_time_step_by_workers": {n: s / args.times for n, s in builds.items()},
        "zarr": zarr,
        "decoded_mb_per_cpu_s": rate["mb_per_cpu_s"],
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
