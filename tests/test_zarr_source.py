"""Offline tests of `data_builders.zarr_source`: streaming from zarr stores, no network.

Two tiny stores are written with xarray in the layouts of the public ones (names, dimension
order, latitude order, one time per chunk, NaN fill value, zarr v2 with consolidated metadata):

* WeatherBench2 ERA5: 6-hourly, 13 levels ascending, latitude ascending (-90 -> 90), static
  fields without a time axis;
* ARCO-ERA5: hourly, 37 levels, latitude descending, time in hours since 1900, static fields
  with a time axis.

They are read from the local path, a ``file://`` URL and a loopback HTTP server that can fail
on demand (404, 500, a given number of times per chunk).
"""

from __future__ import annotations

import functools
import pickle
import threading
import time
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr

from aurora.variables import AURORA_LEVELS
from data_builders.builders import global_grid
from data_builders.download.catalog import ERA5_LEVELS
from data_builders.errors import DataError
from data_builders.pipeline import Pipeline, WeatherSource
from data_builders.readers import _std_geopotential, open_dataset, regrid
from data_builders.stats import RunningStats
from data_builders.zarr_source import PRESETS, ZarrBuilder
from data_builders.zarr_source import records as records_mod

LAT = np.linspace(-90.0, 90.0, 9)  # 22.5 degrees, ascending as WeatherBench2 stores it
LON = np.arange(16) * 22.5
UNITS = {
    "2m_temperature": "K",
    "mean_sea_level_pressure": "Pa",
    "geopotential": "m**2 s**-2",
    "temperature": "K",
    "relative_humidity": "%",
    "land_sea_mask": "(0 - 1)",
    "geopotential_at_surface": "m**2 s**-2",
}
SPLITS = {"train": ("2020-01-01", "2020-01-02T18"), "val": ("2020-01-03", "2020-01-03T18")}
KW = dict(
    surf_vars=("2t", "msl"),
    atmos_vars=("z", "t", "r"),
    static_vars=("lsm", "z"),
    levels=(500, 850),
    splits=SPLITS,
    retry_wait=0.01,
)


def _field(rng: np.random.Generator, name: str, shape: tuple[int, ...], levels: Any = None):
    x = rng.random(shape)
    if name == "geopotential":
        std = np.array([_std_geopotential(float(p)) for p in levels])
        return std[None, :, None, None] * (1 + 0.02 * x)
    scale = {
        "2m_temperature": (250, 50),
        "temperature": (220, 60),
        "mean_sea_level_pressure": (99000, 3000),
        "relative_humidity": (0, 100),
        "land_sea_mask": (0, 1),
        "geopotential_at_surface": (-500, 50000),
    }[name]
    return scale[0] + scale[1] * x


def _dataset(times: np.ndarray, levels: Any, lat: np.ndarray, static_time: bool) -> xr.Dataset:
    rng = np.random.default_rng(0)
    nt, nl, grid = len(times), len(levels), (len(lat), len(LON))
    data = {}
    for name in ("2m_temperature", "mean_sea_level_pressure"):
        data[name] = (("time", "latitude", "longitude"), _field(rng, name, (nt, *grid)))
    for name in ("geopotential", "temperature", "relative_humidity"):
        dims = ("time", "level", "latitude", "longitude")
        data[name] = (dims, _field(rng, name, (nt, nl, *grid), levels))
    for name in ("land_sea_mask", "geopotential_at_surface"):
        x = _field(rng, name, grid)
        if static_time:  # ARCO-ERA5 repeats the static fields every hour
            data[name] = (("time", "latitude", "longitude"), np.broadcast_to(x, (nt, *grid)))
        else:
            data[name] = (("latitude", "longitude"), x)
    ds = xr.Dataset(
        {k: (d, np.asarray(v, np.float32), {"units": UNITS[k]}) for k, (d, v) in data.items()},
        coords={
            "time": times,
            "level": np.asarray(levels, np.int64),
            "latitude": lat,
            "longitude": LON,
        },
    )
    return ds


def _write(
    ds: xr.Dataset,
    path: Path,
    time_units: str | None = None,
    *,
    zarr_format: int = 2,
    consolidated: bool = True,
    chunks: dict[str, int] | None = None,
) -> Path:
    """One time (and lead) per chunk; `chunks` caps other dimensions (spatial chunking)."""
    sizes = {"time": 1, "prediction_timedelta": 1, **(chunks or {})}
    enc: dict[str, Any] = {
        v: {"chunks": tuple(min(sizes.get(d, ds.sizes[d]), ds.sizes[d]) for d in ds[v].dims)}
        for v in ds.data_vars
    }
    if time_units:
        enc["time"] = {"units": time_units, "dtype": "int64"}
    ds.to_zarr(path, mode="w", zarr_format=zarr_format, consolidated=consolidated, encoding=enc)
    return path


def wb2_like() -> xr.Dataset:
    times = np.arange("2020-01-01T00", "2020-01-04T00", 6, dtype="datetime64[h]")
    return _dataset(times.astype("datetime64[ns]"), AURORA_LEVELS, LAT, static_time=False)


def arco_like() -> xr.Dataset:
    times = np.arange("2020-01-01T00", "2020-01-02T13", 1, dtype="datetime64[h]")
    return _dataset(times.astype("datetime64[ns]"), ERA5_LEVELS, LAT[::-1], static_time=True)


@pytest.fixture
def wb2(tmp_path: Path) -> Path:
    return _write(wb2_like(), tmp_path / "src" / "wb2.zarr")


@pytest.fixture
def arco(tmp_path: Path) -> Path:
    return _write(arco_like(), tmp_path / "src" / "arco.zarr", "hours since 1900-01-01")


# --------------------------------------------------------------------------------------------
# A loopback HTTP server that fails on demand
# --------------------------------------------------------------------------------------------


class _Handler(SimpleHTTPRequestHandler):
    faults: dict[str, list[int]]
    hits: Counter
    delay: dict[str, float]  # {"chunk": seconds}: slow chunk answers, to see them overlap
    lock = threading.Lock()

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        with self.lock:
            self.hits[path] += 1
            plan = self.faults.get(path)
            status = (plan.pop(0) if len(plan) > 1 else plan[0]) if plan else 200
        if status != 200:
            self.send_error(status)
            return
        wait = self.delay.get("chunk", 0.0) if path.rsplit("/", 1)[-1][0].isdigit() else 0.0
        if wait:
            with self.lock:
                self.hits["in flight"] += 1
                self.hits["most in flight"] = max(
                    self.hits["most in flight"], self.hits["in flight"]
                )
            time.sleep(wait)
            with self.lock:
                self.hits["in flight"] -= 1
        super().do_GET()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http(tmp_path: Path):
    """Serves tmp_path/src on 127.0.0.1; ``faults[path]`` is a list of statuses to answer with
    (the last one repeats; 200 serves the file); ``hits[path]`` counts requests."""
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    (tmp_path / "src").mkdir(exist_ok=True)
    faults: dict[str, list[int]] = {}
    hits: Counter = Counter()
    delay: dict[str, float] = {}
    attrs = {"faults": faults, "hits": hits, "delay": delay, "lock": threading.Lock()}
    handler_cls = type("H", (_Handler,), attrs)
    handler = functools.partial(handler_cls, directory=str(tmp_path / "src"))
    server_cls = type("S", (ThreadingHTTPServer,), {"request_queue_size": 64})  # not 5
    server = server_cls(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", faults, hits, delay
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _source(url: str, split: str = "train", **kw: Any) -> WeatherSource:
    builder = ZarrBuilder(url, **{**KW, **kw})
    builder.download_and_prepare()
    return builder.as_data_source(split)


def _reference(path: Path, **kw: Any) -> xr.Dataset:
    return open_dataset(path, variables=["2t", "msl", "z", "t", "r"], levels=[500, 850], **kw)


def _assert_records_equal(src: WeatherSource, ref: xr.Dataset) -> None:
    seconds = ref["time"].values.astype("datetime64[s]").astype(np.int64)
    for i in range(len(src.records)):
        rec = src.records[i]
        t = int(np.flatnonzero(seconds == rec["time"])[0])
        for group, keys in (("surf", ("2t", "msl")), ("atmos", ("z", "t", "r"))):
            for k in keys:
                assert rec[group][k].dtype == np.float32
                np.testing.assert_array_equal(rec[group][k], ref[k].values[t], err_msg=k)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def test_local_store_equals_open_dataset(wb2: Path, tmp_path: Path) -> None:
    src = _source(str(wb2), data_dir=tmp_path / "work")
    ref = _reference(wb2)
    assert np.all(np.diff(src.lat) < 0) and src.lat[0] == 90  # flipped from WB2's ascending
    np.testing.assert_array_equal(src.lat, ref["latitude"].values)
    np.testing.assert_array_equal(src.lon, ref["longitude"].values)
    assert src.levels == (500.0, 850.0)
    assert len(src.records) == 8
    np.testing.assert_array_equal(
        src.times, ref["time"].values[:8].astype("datetime64[s]").astype(np.int64)
    )
    _assert_records_equal(src, ref)
    static = open_dataset(wb2, variables=["lsm", "z_sfc"])
    np.testing.assert_array_equal(src.static["lsm"], static["lsm"].values)
    np.testing.assert_array_equal(src.static["z"], static["z_sfc"].values)
    assert set(src.stats) == {"r_500", "r_850"}  # only what Aurora's table lacks
    assert str(wb2) in src.name


def test_file_url_and_http_read_the_same_records(wb2: Path, http: Any) -> None:
    root, *_ = http
    ref = _reference(wb2)
    for url in (f"file://{wb2}", f"{root}/wb2.zarr"):
        src = _source(url, split="val", read_ahead=0)
        assert len(src.records) == 4
        _assert_records_equal(src, ref)


def test_arco_layout_hourly_with_step_and_static_time_axis(arco: Path) -> None:
    splits = {"train": ("2020-01-01", "2020-01-01T23"), "val": ("2020-01-02", None)}
    b = ZarrBuilder(str(arco), **{**KW, "splits": splits, "step_hours": 6})
    b.download_and_prepare()
    src = b.as_data_source("train")
    hours = (src.times % 86400) // 3600
    assert hours.tolist() == [0, 6, 12, 18]
    assert len(b.as_data_source("val").records) == 3  # 00, 06, 12 of the 2nd day
    ref = _reference(arco)
    _assert_records_equal(src, ref)
    static = open_dataset(arco, variables=["lsm", "z_sfc"])  # identical every hour
    np.testing.assert_array_equal(src.static["lsm"], static["lsm"].values)
    assert np.all(np.diff(src.lat) < 0)


def test_presets_name_the_public_stores() -> None:
    assert PRESETS["weatherbench2"].url.endswith(
        "1959-2023_01_10-wb13-6h-1440x721_with_derived_variables.zarr"
    )
    assert "gcp-public-data-arco-era5/ar/full_37-1h-0p25deg-chunk-1.zarr-v3" in (
        PRESETS["arco-era5"].url
    )
    b = ZarrBuilder(preset="weatherbench2")  # nothing is opened before it is needed
    assert b.url == PRESETS["weatherbench2"].url and b.splits == ("train",)
    with pytest.raises(DataError, match="unknown preset"):
        ZarrBuilder(preset="nope")


def test_split_by_time_ranges(wb2: Path) -> None:
    splits = {"train": [("2020-01-01T00", "2020-01-01T06"), ("2020-01-02", "2020-01-02T06")]}
    b = ZarrBuilder(str(wb2), **{**KW, "splits": splits})
    src = b.as_data_source("train")
    got = src.times.astype("datetime64[s]").astype(str).tolist()
    assert got == [
        "2020-01-01T00:00:00",
        "2020-01-01T06:00:00",
        "2020-01-02T00:00:00",
        "2020-01-02T06:00:00",
    ]
    assert b.splits == ("train",)
    with pytest.raises(DataError, match="no split 'test'"):
        b.as_data_source("test")
    with pytest.raises(DataError, match="overlaps"):
        ZarrBuilder(str(wb2), splits={"a": ("2020-01-01", "2020-01-02"), "b": ("2020-01-02", None)})


def test_regrid_on_the_fly(wb2: Path) -> None:
    src = _source(str(wb2), resolution=30, stats={"r_500": (50, 30), "r_850": (50, 30)})
    lat, lon = global_grid(30)  # not nested in the 22.5 degree source grid
    np.testing.assert_array_equal(src.lat, lat)
    np.testing.assert_array_equal(src.lon, lon)
    ref = regrid(_reference(wb2), lat, lon)
    _assert_records_equal(src, ref)
    static = regrid(open_dataset(wb2, variables=["lsm", "z_sfc"]), lat, lon)
    np.testing.assert_array_equal(src.static["z"], static["z_sfc"].values)
    assert src.records[0]["atmos"]["t"].shape == (2, 7, 12)


def test_static_fields_from_another_store(wb2: Path, tmp_path: Path) -> None:
    other = wb2_like()[["land_sea_mask", "geopotential_at_surface"]]
    other["land_sea_mask"] = 1 - other["land_sea_mask"]
    store = _write(other, tmp_path / "static.zarr")
    src = _source(str(wb2), static_url=str(store), stats={"r_500": (0, 1), "r_850": (0, 1)})
    ref = open_dataset(store, variables=["lsm"])
    np.testing.assert_array_equal(src.static["lsm"], ref["lsm"].values)
    assert not np.array_equal(src.static["lsm"], open_dataset(wb2, variables=["lsm"])["lsm"])


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_stats_computed_once_then_read_from_the_cache(
    wb2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = Counter()
    real = records_mod.Reader.read

    def counting(self: Any, t: int) -> Any:
        reads[t] += 1
        return real(self, t)

    monkeypatch.setattr(records_mod.Reader, "read", counting)
    work = tmp_path / "work"
    b = ZarrBuilder(str(wb2), **KW, data_dir=work, stats_samples=3)
    b.download_and_prepare()
    assert sorted(reads) == [0, 4, 7]  # evenly over the 8 train times
    acc = RunningStats()
    src = b.as_data_source("train")
    for i in (0, 4, 7):
        rec = src.records[i]
        acc.add_example({}, {"r": rec["atmos"]["r"]}, src.levels)
    expected = acc.result()
    for k in ("r_500", "r_850"):
        np.testing.assert_allclose(b.stats()[k], expected[k], rtol=1e-12)
    (cache,) = work.glob("zarr_stats_*.json")
    mtime = cache.stat().st_mtime_ns
    reads.clear()
    again = ZarrBuilder(str(wb2), **KW, data_dir=work, stats_samples=3)
    again.download_and_prepare()
    assert not reads and cache.stat().st_mtime_ns == mtime
    assert again.stats() == b.stats()
    given = ZarrBuilder(str(wb2), **KW, data_dir=tmp_path / "w2", stats={"r_500": (1, 2)})
    given.download_and_prepare()
    assert given.stats()["r_500"] == (1.0, 2.0) and "r_850" in given.stats()


# --------------------------------------------------------------------------------------------
# Damaged stores and failing servers
# --------------------------------------------------------------------------------------------


def test_missing_chunk_names_variable_and_time(wb2: Path) -> None:
    (wb2 / "temperature" / "3.0.0.0").unlink()  # 2020-01-01T18
    src = _source(str(wb2), stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=0)
    src.records[2]  # neighbours are fine
    with pytest.raises(
        DataError,
        match=r"temperature \(t\) at time 2020-01-01T18.*missing.*allow_missing_chunks=True",
    ):
        src.records[3]
    lenient = _source(str(wb2), stats={"r_500": (0, 1), "r_850": (0, 1)}, allow_missing_chunks=True)
    with pytest.raises(
        DataError, match=r"temperature \(t\) has \d+ NaN values at time 2020-01-01T18"
    ):
        lenient.records[3]


def test_truncated_chunk_names_variable_and_time(wb2: Path, http: Any) -> None:
    chunk = wb2 / "geopotential" / "1.0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:40])
    root, *_ = http
    for url in (str(wb2), f"{root}/wb2.zarr"):
        src = _source(url, stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=0)
        with pytest.raises(
            DataError,
            match=r"wb2.zarr: cannot read variable geopotential \(z\) at time 2020-01-01T06",
        ):
            src.records[1]


def test_http_404_for_one_chunk(wb2: Path, http: Any) -> None:
    root, faults, *_ = http
    faults["/wb2.zarr/relative_humidity/2.0.0.0"] = [404]
    src = _source(f"{root}/wb2.zarr", stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=0)
    with pytest.raises(DataError, match=r"relative_humidity \(r\) at time 2020-01-01T12.*missing"):
        src.records[2]


def test_http_500_is_retried_then_succeeds(wb2: Path, http: Any) -> None:
    root, faults, hits, _ = http
    key = "/wb2.zarr/temperature/5.0.0.0"
    faults[key] = [500, 500, 200]
    src = _source(f"{root}/wb2.zarr", stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=0)
    rec = src.records[5]
    assert hits[key] == 3
    np.testing.assert_array_equal(rec["atmos"]["t"], _reference(wb2)["t"].values[5])


def test_http_500_that_persists_fails_after_the_retries(wb2: Path, http: Any) -> None:
    root, faults, hits, _ = http
    key = "/wb2.zarr/mean_sea_level_pressure/6.0.0"
    faults[key] = [500]
    src = _source(
        f"{root}/wb2.zarr", stats={"r_500": (0, 1), "r_850": (0, 1)}, retries=2, read_ahead=0
    )
    with pytest.raises(DataError, match=r"mean_sea_level_pressure \(msl\) at time 2020-01-02T12"):
        src.records[6]
    assert hits[key] == 3


# --------------------------------------------------------------------------------------------
# Validation, read-ahead, the pipeline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"atmos_vars": ("z", "w")}, r"wb2.zarr: variable 'w'.*not in the store"),
        ({"levels": (500, 777)}, r"wb2.zarr: variable .* has no level 777 hPa"),
        ({"splits": {"train": ("2021-01-01", None)}}, r"split train .* selects no times"),
        ({"static_vars": ("slt",)}, r"wb2.zarr: variable 'slt'.*not in the store"),
    ],
)
def test_bad_config_names_store_and_variable(wb2: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ZarrBuilder(str(wb2), **{**KW, **kwargs}).download_and_prepare()


def test_wrong_units_are_refused_like_readers_do(tmp_path: Path) -> None:
    ds = wb2_like()
    ds["geopotential"] = (ds["geopotential"] / 9.80665).assign_attrs(units="m")
    store = _write(ds, tmp_path / "height.zarr")
    with pytest.raises(DataError, match=r"height.zarr: variable geopotential \(z\) has units 'm'"):
        ZarrBuilder(str(store), **KW).download_and_prepare()


def test_variables_are_sorted_into_surface_and_atmosphere(wb2: Path) -> None:
    kw = {k: v for k, v in KW.items() if k not in ("surf_vars", "atmos_vars")}
    src = _source(str(wb2), variables=("2t", "relative_humidity"), **kw)
    rec = src.records[0]
    assert set(rec["surf"]) == {"2t"} and set(rec["atmos"]) == {"r"}
    assert rec["atmos"]["r"].shape == (2, 9, 16)


def test_missing_store(tmp_path: Path, http: Any) -> None:
    with pytest.raises(DataError, match="no such zarr store"):
        ZarrBuilder(str(tmp_path / "nope.zarr"), **KW).download_and_prepare()
    with pytest.raises(DataError, match="nope.zarr: cannot open zarr store"):
        ZarrBuilder(f"{http[0]}/nope.zarr", **KW).download_and_prepare()


def test_next_records_are_read_ahead(wb2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = _source(str(wb2), stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=2)
    records = src.records
    records[0]
    assert sorted(records._ahead) == [1, 2]
    records._ahead[1].result()
    monkeypatch.setattr(records.reader, "read", lambda t: pytest.fail("record 1 read again"))
    assert records[1]["time"] == src.times[1]


def test_chunks_of_a_record_are_fetched_concurrently(wb2: Path, http: Any) -> None:
    root, _, hits, delay = http
    src = _source(f"{root}/wb2.zarr", stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=0)
    delay["chunk"] = 0.3
    src.records[1]
    assert hits["most in flight"] == 5  # the 5 variables' chunks at once


def test_gs_without_gcsfs_says_what_to_install() -> None:
    try:
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed")
    except ImportError:
        pass
    with pytest.raises(DataError, match=r"gcsfs.*pip install aurora-jax\[gcs\]"):
        ZarrBuilder("gs://weatherbench2/datasets/x.zarr", **KW).download_and_prepare()


def test_registered_as_zarr(wb2: Path, tmp_path: Path) -> None:
    from data_builders.registry import load_source

    src = load_source("zarr", "val", url=str(wb2), data_dir=tmp_path / "work", **KW)
    assert len(src.records) == 4 and set(src.stats) == {"r_500", "r_850"}


def test_pipeline_over_a_zarr_source(wb2: Path) -> None:
    src = _source(str(wb2), stats={"r_500": (0, 1), "r_850": (0, 1)})
    pipe = Pipeline(src, step_hours=6, rollout_steps=1, batch_size=2, shuffle=False)
    batches = list(pipe)
    assert len(batches) == 3  # 6 windows of 3 times among 8
    inputs, targets = batches[0]
    assert inputs.atmos_vars["r"].shape == (2, 2, 2, 9, 16)
    assert inputs.surf_vars["2t"].shape == (2, 2, 9, 16)
    assert set(inputs.static_vars) == {"lsm", "z"}
    np.testing.assert_array_equal(targets[0].atmos_vars["t"][0, 0], src.records[2]["atmos"]["t"])
    np.testing.assert_array_equal(inputs.surf_vars["msl"][1, 0], src.records[1]["surf"]["msl"])


# --------------------------------------------------------------------------------------------
# Worker processes: records pickle without their store and threads
# --------------------------------------------------------------------------------------------


def _batch_arrays(batch: Any) -> list[np.ndarray]:
    inputs, targets = batch
    out = []
    for b in (inputs, *targets):
        for group in (b.surf_vars, b.atmos_vars, b.static_vars):
            out += [group[k] for k in sorted(group)]
        out.append(np.asarray(b.metadata.time))
    return out


def test_records_pickle_without_store_or_threads_and_reopen(wb2: Path, http: Any) -> None:
    root, *_ = http
    src = _source(f"{root}/wb2.zarr", stats={"r_500": (0, 1), "r_850": (0, 1)}, read_ahead=2)
    records = src.records
    first = records[0]  # starts the read-ahead threads
    assert records._pool is not None and records.reader._pool is not None
    copy = pickle.loads(pickle.dumps(records))
    assert copy.reader._store is None and copy.reader._arrays is None
    assert copy._pool is None and copy.reader._pool is None
    ref = _reference(wb2)
    for rec in (copy[0], copy[1]):  # opens its own store on the first read
        i = int(np.flatnonzero(src.times == rec["time"])[0])
        np.testing.assert_array_equal(rec["atmos"]["t"], ref["t"].values[i])
    assert copy.reader._store is not records.reader._store
    np.testing.assert_array_equal(copy[0]["surf"]["msl"], first["surf"]["msl"])
    for r in (records, copy):
        r.close()
        assert r._pool is None and r.reader._pool is None and not r._ahead
        assert r[2]["time"] == src.times[2]  # reads again after close
        r.close()
    assert copy.reader._store is None  # the store it opened itself is closed
    assert records.reader._store is not None  # the builder's own store stays open


def test_worker_process_gives_the_same_batches(wb2: Path, http: Any) -> None:
    root, *_ = http
    src = _source(f"{root}/wb2.zarr", stats={"r_500": (0, 1), "r_850": (0, 1)})
    kw = dict(step_hours=6, rollout_steps=1, batch_size=2, seed=3)
    in_process = list(Pipeline(src, num_threads=0, **kw))
    it = iter(Pipeline(src, num_workers=1, **kw))
    in_worker = list(it)
    it.close()
    assert len(in_worker) == len(in_process) == 3
    for a, b in zip(in_worker, in_process):
        for x, y in zip(_batch_arrays(a), _batch_arrays(b), strict=True):
            np.testing.assert_array_equal(x, y)


# --------------------------------------------------------------------------------------------
# NaNs: refused, or filled as readers.open_dataset fills them
# --------------------------------------------------------------------------------------------


def sst_store(path: Path) -> Path:
    """WeatherBench2's layout plus a sea-surface temperature that is NaN over land (as ERA5's
    is) and one NaN in the surface geopotential."""
    ds = wb2_like()
    land = ds["land_sea_mask"].values > 0.5
    sst = 271 + 30 * np.random.default_rng(1).random((ds.sizes["time"], *land.shape))
    sst[:, land] = np.nan
    ds["sea_surface_temperature"] = (
        ("time", "latitude", "longitude"),
        sst.astype(np.float32),
        {"units": "K"},
    )
    ds["geopotential_at_surface"][3, 5] = np.nan
    return _write(ds, path)


@pytest.mark.parametrize(
    "fill_nan, reference_fill",
    [
        ("mean", "mean"),
        (0.0, 0.0),
        ({"sea_surface_temperature": 280.5, "geopotential_at_surface": "zero"}, None),
        ({"sea_surface_temperature": "zero", "z_sfc": "mean"}, None),
    ],
)
def test_fill_nan_like_open_dataset(tmp_path: Path, fill_nan: Any, reference_fill: Any) -> None:
    store = sst_store(tmp_path / "sst.zarr")
    sst = "sea_surface_temperature"
    kw = {**KW, "surf_vars": ("2t", sst), "stats": {"r_500": (0, 1), "r_850": (0, 1)}}
    b = ZarrBuilder(str(store), **kw, fill_nan=fill_nan)
    b.download_and_prepare()
    src = b.as_data_source("train")
    if reference_fill is None:  # the mapping, by the dataset keys open_dataset uses
        by_key = {
            "sea_surface_temperature": sst,
            "z_sfc": "z_sfc",
            "geopotential_at_surface": "z_sfc",
        }
        reference_fill = {by_key[k]: v for k, v in fill_nan.items()}
    ref = open_dataset(store, variables=["2t", sst, "z_sfc"], fill_nan=reference_fill)
    for i in (0, 5):
        np.testing.assert_array_equal(src.records[i]["surf"][sst], ref[sst].values[i])
        np.testing.assert_array_equal(src.records[i]["surf"]["2t"], ref["2t"].values[i])
    np.testing.assert_array_equal(src.static["z"], ref["z_sfc"].values)
    mean, std = b.stats()[sst]
    assert np.isfinite(mean) and std > 0


def test_nans_are_refused_unless_filled(tmp_path: Path) -> None:
    store = sst_store(tmp_path / "sst.zarr")
    sst = "sea_surface_temperature"
    kw = {**KW, "surf_vars": ("2t", sst), "stats": {"r_500": (0, 1), "r_850": (0, 1)}}
    with pytest.raises(DataError, match=r"geopotential_at_surface \(z_sfc\) has 1 NaN.*fill_nan="):
        ZarrBuilder(str(store), **kw).download_and_prepare()
    kw["stats"] = {**kw["stats"], sst: (285, 10)}  # nothing read before records[0]
    b = ZarrBuilder(str(store), **kw, fill_nan={"z_sfc": 0.0}, read_ahead=0)
    src = b.as_data_source("train")
    with pytest.raises(
        DataError,
        match=r"sea_surface_temperature .* NaN values at time "
        r"2020-01-01T00:00:00.*pass fill_nan=",
    ):
        src.records[0]
    with pytest.raises(DataError, match=r"fill_nan names \['sst'\], which are not read"):
        ZarrBuilder(str(store), **kw, fill_nan={"sst": 0.0, "z_sfc": 0.0}).download_and_prepare()
    with pytest.raises(DataError, match=r"fill_nan='median'; use 'zero', 'mean' or a number"):
        ZarrBuilder(str(store), **kw, fill_nan={sst: "median"})


# --------------------------------------------------------------------------------------------
# Layouts: zarr v3, forecast stores, spatial chunks
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Consolidated metadata is currently not part")
@pytest.mark.filterwarnings("ignore:Failed to open Zarr store with consolidated metadata")
@pytest.mark.parametrize("consolidated", [True, False])
def test_zarr_v3_stores_read_like_open_dataset(
    tmp_path: Path, http: Any, consolidated: bool
) -> None:
    """ARCO-ERA5's store is zarr v3 (``zarr.json`` metadata, ``c/...`` chunk keys)."""
    root, faults, hits, _ = http
    path = tmp_path / "src" / "v3.zarr"
    _write(arco_like(), path, "hours since 1900-01-01", zarr_format=3, consolidated=consolidated)
    assert (path / "zarr.json").exists() and (path / "temperature" / "c").is_dir()
    splits = {"train": ("2020-01-01T00", "2020-01-01T12")}
    ref = _reference(path)
    faults["/v3.zarr"] = faults["/v3.zarr/"] = [404]  # folder listings, as on a bucket
    if not consolidated:
        with pytest.raises(DataError, match=r"v3.zarr: the store shows no variables; without"):
            ZarrBuilder(f"{root}/v3.zarr", **KW).download_and_prepare()
    for url in [str(path)] + ([f"{root}/v3.zarr"] if consolidated else []):
        src = _source(url, splits=splits, step_hours=6, stats={"r_500": (0, 1), "r_850": (0, 1)})
        assert src.times.size == 3
        _assert_records_equal(src, ref)
        static = open_dataset(path, variables=["lsm", "z_sfc"])
        np.testing.assert_array_equal(src.static["z"], static["z_sfc"].values)
    if consolidated:
        assert any("/c/" in key for key in hits)


def forecast_like(inits: int) -> xr.Dataset:
    """WeatherBench2's forecast layout: ``time`` is the init, ``prediction_timedelta`` the
    lead (0..24 h every 6 h), inits 12 h apart, so valid times overlap."""
    ds = wb2_like().drop_vars(["land_sea_mask", "geopotential_at_surface"])
    leads = np.arange(0, 25, 6).astype("timedelta64[h]").astype("timedelta64[ns]")
    parts = []
    for i in range(inits):
        part = ds.isel(time=slice(2 * i, 2 * i + len(leads)))
        part = part.assign_coords(time=leads).rename(time="prediction_timedelta")
        parts.append(part.expand_dims(time=[ds["time"].values[2 * i]]))
    return xr.concat(parts, "time")


def test_forecast_store_streams_one_init_by_valid_time(tmp_path: Path, http: Any) -> None:
    root, _, hits, _ = http
    path = _write(forecast_like(3), tmp_path / "src" / "hres.zarr")
    kw = {**KW, "static_vars": (), "splits": {"train": (None, None)}}
    kw["stats"] = {"r_500": (0, 1), "r_850": (0, 1)}
    with pytest.raises(
        DataError,
        match=r"hres.zarr: a forecast store \(3 init times 2020-01-01T00:00:00\.\.2020-01-02T00"
        r".*5 leads along 'prediction_timedelta'\); pass init_time=",
    ):
        ZarrBuilder(str(path), **kw).download_and_prepare()
    init = "2020-01-01T12"
    ref = _reference(path, init_time=init)
    hits.clear()
    b = ZarrBuilder(f"{root}/hres.zarr", **kw, init_time=init, read_ahead=0)
    b.download_and_prepare()
    src = b.as_data_source("train")
    data = [k for k in hits if k.split("/")[2] in UNITS]
    assert len(data) == 5 and all(k.endswith(".1.0.0") or "/1.0." in k for k in data), data
    hours = (src.times - src.times[0]) // 3600
    assert src.times[0] == np.datetime64(init, "s").astype(np.int64)
    assert hours.tolist() == [0, 6, 12, 18, 24]
    _assert_records_equal(src, ref)
    one = _write(forecast_like(1), tmp_path / "one.zarr")  # a single init needs no init_time
    assert len(_source(str(one), **{**kw, "static_vars": ()}).records) == 5


def test_spatially_chunked_store_reads_its_chunks_concurrently(tmp_path: Path, http: Any) -> None:
    """Chunks of one level and part of the grid, as (1, 1, 361, 720) tiles a 0.25 degree field."""
    root, _, hits, delay = http
    path = _write(
        wb2_like().isel(time=slice(0, 4)),
        tmp_path / "src" / "tiles.zarr",
        chunks={"level": 1, "latitude": 5, "longitude": 8},
    )
    assert len(list((path / "temperature").glob("3.*"))) == 13 * 2 * 2  # per time
    ref = _reference(path)
    kw: dict[str, Any] = {"splits": {"train": (None, None)}, "read_ahead": 0}
    src = _source(str(path), **kw, stats={"r_500": (0, 1), "r_850": (0, 1)})
    _assert_records_equal(src, ref)
    one = _source(
        f"{root}/tiles.zarr", **kw, surf_vars=(), atmos_vars=("t",), static_vars=(), stats={}
    )
    delay["chunk"] = 0.3
    rec = one.records[3]
    assert hits["most in flight"] == 8  # 2 levels x 4 tiles at once
    np.testing.assert_array_equal(rec["atmos"]["t"], ref["t"].values[3])
