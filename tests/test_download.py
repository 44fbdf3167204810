"""Offline tests of `data_builders.download`: no network, only local stand-ins.

* The CDS is replaced by `FakeCds`, injected where `cdsapi.Client()` would be. Like the real
  service it writes a netCDF file per request, in the new-CDS layout (`valid_time`,
  `pressure_level`, `number`, `expver`), from real fields of the samples in tests/data. It also
  records every request and can fail on demand.
* WeatherBench2 stores are written into tmp_path from a real sample netCDF, renamed to
  WeatherBench2's long names with latitude ascending, as WeatherBench2 stores are. They are read
  from the local path, and also over a loopback HTTP server when aiohttp is installed.
"""

from __future__ import annotations

import copy
import functools
import io
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr

from data_builders import download as dl
from data_builders.download import (
    DataError,
    cds_file_problem,
    download_era5,
    download_static,
    download_zarr,
    main,
    month_spans,
    plan_era5,
    plan_zarr,
    run_cds_requests,
)
from data_builders.readers import G, open_dataset

DATA = Path(__file__).parent / "data"
HRES_PL = DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"
WB1 = DATA / "weatherbench1_era5_static_5.625deg.nc"


# --------------------------------------------------------------------------------------------
# A stand-in for cdsapi.Client
# --------------------------------------------------------------------------------------------


@functools.cache
def _sample_pl() -> xr.Dataset:
    with xr.open_dataset(HRES_PL) as ds:
        return ds.drop_vars(["forecast_reference_time", "lead_time"]).load()


@functools.cache
def _sample_static() -> xr.Dataset:
    with xr.open_dataset(WB1) as ds:
        return ds.load()


def _surface_fields(pl: xr.Dataset) -> dict[str, xr.DataArray]:
    """Surface fields from the real 1000 hPa fields (the samples have no global surface file).

    msl is 1000 hPa plus rho * geopotential(1000 hPa) with rho = 1.2 kg m**-3: the hydrostatic
    pressure difference, so values and units are those of a real msl field.
    """
    at = pl.sel(level=1000, drop=True)
    return {
        "t2m": at["t"].assign_attrs(units="K", long_name="2 metre temperature"),
        "u10": at["u"].assign_attrs(units="m s**-1", long_name="10 metre U wind component"),
        "v10": at["v"].assign_attrs(units="m s**-1", long_name="10 metre V wind component"),
        "msl": (100000.0 + 1.2 * at["z"])
        .astype(np.float32)
        .assign_attrs(units="Pa", long_name="Mean sea level pressure"),
    }


def _pressure_fields(pl: xr.Dataset) -> dict[str, xr.DataArray]:
    q = (pl["r"].clip(0, 100) * 1e-4).astype(np.float32)  # 0..0.01 kg/kg from relative humidity
    return {
        "z": pl["z"],
        "t": pl["t"],
        "u": pl["u"],
        "v": pl["v"],
        "r": pl["r"],
        "q": q.assign_attrs(units="kg kg**-1", long_name="Specific humidity"),
    }


def _static_fields() -> dict[str, xr.DataArray]:
    """The real WeatherBench static fields, taken at the nearest points of the 10 deg grid of
    the other fields, so that static and dynamic files of one download share a grid."""
    grid = _sample_pl()
    st = _sample_static().sel(
        latitude=grid["latitude"], longitude=grid["longitude"], method="nearest"
    )
    st = st.assign_coords(latitude=grid["latitude"], longitude=grid["longitude"])
    z = (
        (st["orography"] * G)
        .astype(np.float32)
        .assign_attrs(units="m**2 s**-2", long_name="Geopotential")
    )
    return {"lsm": st["lsm"], "slt": st["slt"], "z": z}


_SHORT = {  # CDS long name -> short name in the file
    "2m_temperature": "t2m",
    "10m_u_component_of_wind": "u10",
    "10m_v_component_of_wind": "v10",
    "mean_sea_level_pressure": "msl",
    "geopotential": "z",
    "temperature": "t",
    "u_component_of_wind": "u",
    "v_component_of_wind": "v",
    "specific_humidity": "q",
    "relative_humidity": "r",
    "land_sea_mask": "lsm",
    "soil_type": "slt",
}


class FakeCds:
    """Records requests and writes a real netCDF (new-CDS layout) to `target` for each.

    `fail_first` calls raise after writing a partial file (a dropped connection); `interrupt_at`
    (a call index) writes half a file and raises KeyboardInterrupt; `drop` lists short names left
    out of every file (a service returning less than asked); `as_zip` wraps the file in a zip.
    """

    def __init__(
        self,
        *,
        fail_first: int = 0,
        interrupt_at: int | None = None,
        drop: tuple[str, ...] = (),
        as_zip: bool = False,
    ) -> None:
        self.calls: list[tuple[str, dict[str, Any], str]] = []
        self.fail_first = fail_first
        self.interrupt_at = interrupt_at
        self.drop = drop
        self.as_zip = as_zip

    def retrieve(self, name: str, request: dict[str, Any], target: str | None = None) -> None:
        assert target is not None
        self.calls.append((name, copy.deepcopy(request), target))
        data = self._netcdf_bytes(name, request)
        n = len(self.calls) - 1
        if n < self.fail_first:
            Path(target).write_bytes(data[: len(data) // 3])
            raise RuntimeError("503 Service Unavailable (fake)")
        if n == self.interrupt_at:
            Path(target).write_bytes(data[: len(data) // 2])
            raise KeyboardInterrupt
        if self.as_zip:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                z.writestr("data_stream-oper_stepType-instant.nc", data)
            data = buf.getvalue()
        Path(target).write_bytes(data)

    def _netcdf_bytes(self, name: str, request: dict[str, Any]) -> bytes:
        year, month = int(request["year"][0]), int(request["month"][0])
        times = [
            np.datetime64(f"{year:04d}-{month:02d}-{d}T{t}", "ns")
            for d in request["day"]
            for t in request["time"]
        ]
        if "land_sea_mask" in request["variable"] or "soil_type" in request["variable"]:
            fields = _static_fields()
        elif name == dl.ERA5_PRESSURE:
            fields = _pressure_fields(_sample_pl())
        else:
            fields = _surface_fields(_sample_pl())
        ds = xr.Dataset()
        for long_name in request["variable"]:
            short = _SHORT[long_name]
            if short in self.drop:
                continue
            ds[short] = self._over_times(fields[short], times, request)
        ds = ds.assign_coords(
            number=np.int64(0), expver=("valid_time", np.array(["0001"] * len(times)))
        )
        ds.attrs = {"Conventions": "CF-1.7", "institution": "fake CDS for tests"}
        return ds.to_netcdf(engine="netcdf4")

    @staticmethod
    def _over_times(da: xr.DataArray, times: list, request: dict[str, Any]) -> xr.DataArray:
        """The sample's fields cycled over the requested valid times (and levels)."""
        if "time" in da.dims:
            idx = [i % da.sizes["time"] for i in range(len(times))]
            da = da.isel(time=idx)
        else:
            da = da.expand_dims(time=len(times))
        da = da.assign_coords(time=times).rename(time="valid_time")
        if "level" in da.dims:
            levels = [float(x) for x in request["pressure_level"]]
            have = [float(x) for x in da["level"].values]
            if not set(levels) <= set(have):
                raise RuntimeError(f"fake CDS: levels {levels} not in sample {have}")
            da = da.sel(level=sorted(levels, reverse=True)).rename(level="pressure_level")
            da = da.assign_coords(pressure_level=da["pressure_level"].astype(np.float64))
        return da


def _files(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir())


def _era5(out: Path, client: FakeCds, **kw: Any) -> list[Path]:
    args: dict[str, Any] = dict(
        start="2024-01-30",
        end="2024-02-02",
        variables=["2t", "msl", "z", "t", "q"],
        levels=[500, 850],
        hours=["00", "12"],
        retry_wait_s=0.0,
        echo=lambda s: None,
    )
    return download_era5(out, client=client, **{**args, **kw})


# --------------------------------------------------------------------------------------------
# ERA5 / CDS: plan
# --------------------------------------------------------------------------------------------


def test_month_spans_cover_the_range_inclusive() -> None:
    assert month_spans("2023-12-30", "2024-02-02") == [
        (2023, 12, [30, 31]),
        (2024, 1, list(range(1, 32))),
        (2024, 2, [1, 2]),
    ]
    assert month_spans("2024-02-01", "2024-02-29")[0][2][-1] == 29  # leap day


def test_plan_splits_by_month_and_group(tmp_path: Path) -> None:
    plan = plan_era5(
        tmp_path,
        start="2024-01-30",
        end="2024-03-02",
        variables=["2t", "z", "t"],
        levels=[850, 500],
        hours=["00", "6", "12:00", "18"],
        grid=[1.0],
        area=[90, 0, -90, 359],
        product="reanalysis",
    )
    names = [r.target.name for r in plan]
    assert names == [
        "era5_static.nc",
        "era5_surface_2024-01.nc",
        "era5_pressure_2024-01.nc",
        "era5_surface_2024-02.nc",
        "era5_pressure_2024-02.nc",
        "era5_surface_2024-03.nc",
        "era5_pressure_2024-03.nc",
    ]
    static, sfc_jan, pl_jan, _, pl_feb, *_ = plan
    assert static.dataset == dl.ERA5_SINGLE
    assert static.request["variable"] == ["land_sea_mask", "geopotential", "soil_type"]
    assert static.request["time"] == ["00:00"] and len(static.times) == 1
    assert sfc_jan.dataset == dl.ERA5_SINGLE and sfc_jan.request["variable"] == ["2m_temperature"]
    assert "pressure_level" not in sfc_jan.request
    assert pl_jan.dataset == dl.ERA5_PRESSURE
    assert pl_jan.request["variable"] == ["geopotential", "temperature"]
    assert pl_jan.request["pressure_level"] == ["500", "850"]
    assert pl_jan.request["day"] == ["30", "31"] and pl_jan.request["month"] == ["01"]
    assert pl_jan.request["time"] == ["00:00", "06:00", "12:00", "18:00"]
    assert len(pl_jan.times) == 2 * 4
    assert pl_feb.request["day"] == [f"{d:02d}" for d in range(1, 30)]
    for r in plan:
        assert r.request["grid"] == [1.0, 1.0]
        assert r.request["area"] == [90.0, 0.0, -90.0, 359.0]
        assert r.request["product_type"] == ["reanalysis"]
        assert r.request["data_format"] == "netcdf"


def test_plan_accepts_cds_long_names_and_no_static(tmp_path: Path) -> None:
    plan = plan_era5(
        tmp_path,
        start="2024-01-01",
        end="2024-01-01",
        variables=["2m_temperature", "geopotential"],
        levels=[500],
        static_variables=[],
    )
    assert [r.group for r in plan] == ["surface", "pressure"]
    assert plan[0].variables == ("2t",) and plan[1].variables == ("z",)


def test_dry_run_prints_plan_and_calls_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    fake = FakeCds()
    out = tmp_path / "era5"
    rc = main(
        [
            "era5",
            "--out",
            str(out),
            "--start",
            "2024-01-31",
            "--end",
            "2024-02-01",
            "--variables",
            "2t",
            "z",
            "--levels",
            "500",
            "--hours",
            "00",
            "12",
            "--dry-run",
        ],
        client=fake,
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 + 4 + 1  # static, 2 months x 2 groups, summary
    pl = next(line for line in lines if "era5_pressure_2024-01.nc" in line)
    assert pl.startswith(dl.ERA5_PRESSURE)
    assert "variables=geopotential" in pl and "levels=500" in pl
    assert "dates=2024-01-31 (1 day)" in pl and "hours=00,12" in pl and "[todo]" in pl
    assert "dry run" in lines[-1]
    assert fake.calls == [] and not out.exists()


# --------------------------------------------------------------------------------------------
# ERA5 / CDS: downloading and resuming
# --------------------------------------------------------------------------------------------


def test_download_writes_files_that_readers_open(tmp_path: Path) -> None:
    fake = FakeCds()
    files = _era5(tmp_path, fake)
    assert len(fake.calls) == 5 and all(f.exists() for f in files)
    assert _files(tmp_path) == [
        "era5_pressure_2024-01.nc",
        "era5_pressure_2024-02.nc",
        "era5_static.nc",
        "era5_surface_2024-01.nc",
        "era5_surface_2024-02.nc",
    ]
    ds = open_dataset(
        [
            tmp_path / "era5_surface_2024-01.nc",
            tmp_path / "era5_pressure_2024-01.nc",
            tmp_path / "era5_static.nc",
        ]
    )
    assert set(ds.data_vars) == {"2t", "msl", "z", "t", "q", "lsm", "slt", "z_sfc"}
    assert [str(t)[:13] for t in ds["time"].values] == [
        "2024-01-30T00",
        "2024-01-30T12",
        "2024-01-31T00",
        "2024-01-31T12",
    ]
    assert list(ds["level"].values) == [500.0, 850.0]
    feb = open_dataset([tmp_path / "era5_pressure_2024-02.nc"])
    assert feb.sizes["time"] == 4


def test_rerun_skips_complete_files(tmp_path: Path) -> None:
    _era5(tmp_path, FakeCds())
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = FakeCds()
    _era5(tmp_path, again)
    assert again.calls == []
    assert {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "missing_time"])
def test_damaged_file_is_downloaded_again(tmp_path: Path, damage: str) -> None:
    _era5(tmp_path, FakeCds())
    target = tmp_path / "era5_pressure_2024-01.nc"
    if damage == "garbage":
        target.write_bytes(b"<html>504 Gateway Time-out</html>")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    else:  # a readable file that lacks the last time
        with xr.open_dataset(target) as ds:
            short = ds.isel(valid_time=slice(0, -1)).load()
        short.to_netcdf(target)
    req = next(
        r
        for r in plan_era5(
            tmp_path,
            start="2024-01-30",
            end="2024-02-02",
            variables=["2t", "msl", "z", "t", "q"],
            levels=[500, 850],
            hours=["00", "12"],
        )
        if r.target == target
    )
    assert cds_file_problem(target, req) is not None
    fake = FakeCds()
    _era5(tmp_path, fake)
    assert [Path(c[2]).name for c in fake.calls] == ["era5_pressure_2024-01.nc.part"]
    assert cds_file_problem(target, req) is None
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_leftover_part_file_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "era5_static.nc.part").write_bytes(b"half a download")
    _era5(tmp_path, FakeCds(), start="2024-01-30", end="2024-01-30")
    assert "era5_static.nc.part" not in _files(tmp_path)
    assert open_dataset(tmp_path / "era5_static.nc")["lsm"].ndim == 2


def test_static_file_of_another_date_is_kept(tmp_path: Path) -> None:
    _era5(tmp_path, FakeCds(), start="2024-01-30", end="2024-01-30")
    later = FakeCds()
    _era5(tmp_path, later, start="2024-02-01", end="2024-02-01")
    assert [Path(c[2]).name for c in later.calls] == [
        "era5_surface_2024-02.nc.part",
        "era5_pressure_2024-02.nc.part",
    ]


def test_interrupted_download_leaves_no_final_file(tmp_path: Path) -> None:
    fake = FakeCds(interrupt_at=1)  # the static request succeeds, the next is cut short
    with pytest.raises(KeyboardInterrupt):
        _era5(tmp_path, fake)
    assert _files(tmp_path) == ["era5_static.nc"]  # neither a final file nor a .part
    resumed = FakeCds()
    _era5(tmp_path, resumed)
    assert len(resumed.calls) == 4  # the static file was complete and is skipped


def test_transient_failures_are_retried(tmp_path: Path) -> None:
    fake = FakeCds(fail_first=2)
    _era5(tmp_path, fake, start="2024-01-30", end="2024-01-30", static_variables=[], retries=2)
    assert len(fake.calls) == 2 + 2  # surface: 2 failures then success; pressure: first try
    assert _files(tmp_path) == ["era5_pressure_2024-01.nc", "era5_surface_2024-01.nc"]


def test_persistent_failure_names_the_request(tmp_path: Path) -> None:
    fake = FakeCds(fail_first=100)
    with pytest.raises(DataError, match=r"era5_static\.nc: failed after 3 attempt"):
        _era5(tmp_path, fake, retries=2)
    assert len(fake.calls) == 3 and _files(tmp_path) == []


def test_file_without_a_requested_variable_is_refused(tmp_path: Path) -> None:
    fake = FakeCds(drop=("q",))
    with pytest.raises(
        DataError,
        match=r"era5_pressure_2024-01\.nc.*variable q "
        r"\(specific_humidity\) missing",
    ):
        _era5(tmp_path, fake, static_variables=[], retries=0)
    assert not (tmp_path / "era5_pressure_2024-01.nc").exists()


def test_zipped_response_is_unpacked(tmp_path: Path) -> None:
    _era5(tmp_path, FakeCds(as_zip=True), start="2024-01-30", end="2024-01-30", static_variables=[])
    assert open_dataset(tmp_path / "era5_surface_2024-01.nc").sizes["time"] == 2


def test_static_from_cds(tmp_path: Path) -> None:
    fake = FakeCds()
    path = download_static(tmp_path, client=fake, grid=[5.625], echo=lambda s: None)
    assert path == tmp_path / "era5_static.nc"
    assert fake.calls[0][1]["grid"] == [5.625, 5.625]
    ds = open_dataset(path)
    assert set(ds.data_vars) == {"lsm", "slt", "z_sfc"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variables": ["2t", "tcc"]}, r"unknown ERA5 variable\(s\) \['tcc'\]"),
        ({"variables": ["lsm"]}, r"static fields go in --static-variables"),
        ({"levels": [500, 555]}, r"level\(s\) \[555\] hPa are not ERA5 pressure levels"),
        ({"static_variables": ["lsm", "orography"]}, r"unknown static variable 'orography'"),
        ({"start": "2024-02-01", "end": "2024-01-01"}, r"end date 2024-01-01 is before"),
        ({"hours": ["25"]}, r"bad hour '25'"),
        ({"area": [90, 0, -90]}, r"area must be 4 numbers"),
    ],
)
def test_plan_errors_name_the_problem(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"start": "2024-01-01", "end": "2024-01-02", **kwargs}
    with pytest.raises(DataError, match=message):
        plan_era5(tmp_path, **args)


def test_cli_reports_errors_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        [
            "era5",
            "--out",
            str(tmp_path),
            "--start",
            "2024-01-01",
            "--end",
            "2024-01-01",
            "--variables",
            "2t",
            "tcc",
            "--dry-run",
        ],
        client=FakeCds(),
    )
    assert rc == 2
    assert "unknown ERA5 variable(s) ['tcc']" in capsys.readouterr().err


def test_run_without_work_needs_no_client(tmp_path: Path) -> None:
    plan = plan_era5(
        tmp_path,
        start="2024-01-30",
        end="2024-01-30",
        variables=["2t"],
        static_variables=[],
        hours=["00"],
    )
    run_cds_requests(plan, FakeCds())
    run_cds_requests(plan, None)  # everything complete: cdsapi.Client() is never created


# --------------------------------------------------------------------------------------------
# WeatherBench2 / HRES zarr stores
# --------------------------------------------------------------------------------------------

_WB2 = {
    "t": "temperature",
    "u": "u_component_of_wind",
    "v": "v_component_of_wind",
    "z": "geopotential",
    "r": "relative_humidity",
}


def _wb2_like(offset: float = 0.0) -> xr.Dataset:
    """The HRES sample laid out like a WeatherBench2 store: long names, latitude ascending,
    integer levels ascending, a surface field; `offset` makes a recognisably different copy."""
    pl = _sample_pl()
    ds = pl.rename(_WB2).sortby("latitude").sortby("level")
    ds["2m_temperature"] = ds["temperature"].sel(level=1000, drop=True)
    ds = ds.assign_coords(level=ds["level"].astype(np.int64))
    return ds + offset if offset else ds


def _write_store(ds: xr.Dataset, path: Path) -> Path:
    ds.drop_encoding().to_zarr(
        path,
        mode="w",
        zarr_format=2,
        consolidated=True,
        encoding={v: {"chunks": (1, *ds[v].shape[1:])} for v in ds.data_vars},
    )
    return path


@pytest.fixture
def wb2_store(tmp_path: Path) -> Path:
    return _write_store(_wb2_like(), tmp_path / "src" / "wb2.zarr")


def _read(path: Path) -> xr.Dataset:
    with xr.open_zarr(path, chunks=None) as ds:
        return ds.load()


def test_zarr_subset_selects_variables_levels_times(wb2_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "hres.zarr"
    download_zarr(
        str(wb2_store),
        out,
        variables=["2t", "z", "t"],
        levels=[850, 500],
        start="2024-06-03T06",
        end="2024-06-04",
        stride=2,
        chunk_times=3,
    )
    got, src = _read(out), _wb2_like()
    assert sorted(got.data_vars) == ["2m_temperature", "geopotential", "temperature"]
    assert list(got["level"].values) == [500, 850]
    want_t = src["time"].values[1::2]
    np.testing.assert_array_equal(got["time"].values, want_t)
    expect = src[["2m_temperature", "geopotential", "temperature"]].sel(
        time=want_t, level=[500, 850]
    )
    xr.testing.assert_equal(got.drop_encoding(), expect)
    ds = open_dataset(out)  # the canonical reader understands the output
    assert set(ds.data_vars) == {"2t", "z", "t"} and ds["latitude"].values[0] == 90.0
    assert not Path(str(out) + ".journal.json").exists()


def test_zarr_hours_filter(wb2_store: Path, tmp_path: Path) -> None:
    out = download_zarr(
        str(wb2_store), tmp_path / "o.zarr", variables=["t"], levels=[500], hours=["00", "12"]
    )
    assert [str(t)[11:13] for t in _read(out)["time"].values] == ["00", "12"] * 2


def test_zarr_resume_skips_present_times(
    wb2_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "hres.zarr"
    kw: dict[str, Any] = dict(variables=["t"], levels=[500], chunk_times=2)
    download_zarr(str(wb2_store), out, end="2024-06-03", **kw)
    assert _read(out).sizes["time"] == 4
    # The source changes afterwards: times fetched before must not be fetched again.
    _write_store(_wb2_like(offset=1000.0), wb2_store)
    download_zarr(str(wb2_store), out, end="2024-06-04", dry_run=True, **kw)
    assert "4 already present; 4 to fetch" in capsys.readouterr().out
    download_zarr(str(wb2_store), out, end="2024-06-04", **kw)
    got, old = _read(out)["temperature"], _wb2_like()["temperature"].sel(level=[500])
    assert got.sizes["time"] == 8
    np.testing.assert_array_equal(got.values[:4], old.values[:4])
    np.testing.assert_array_equal(got.values[4:], old.values[4:] + 1000.0)
    rerun = plan_zarr(str(wb2_store), out, end="2024-06-04", **kw)
    assert len(rerun.todo) == 0 and rerun.estimated_bytes == 0


def test_zarr_append_cut_short_is_undone(wb2_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "hres.zarr"
    kw: dict[str, Any] = dict(variables=["2t", "t"], levels=[500], chunk_times=2)
    download_zarr(str(wb2_store), out, end="2024-06-03T06", **kw)
    # A crash inside the next append: journal says 2, arrays already grown, data never written.
    (tmp_path / "hres.zarr.journal.json").write_text('{"committed": 2}')
    group = zarr.open_group(str(out), mode="r+")
    group["temperature"].resize((4, 1, 19, 36))
    group["time"].resize((3,))
    download_zarr(str(wb2_store), out, **kw)
    got = _read(out)
    src = _wb2_like()[["2m_temperature", "temperature"]].sel(level=[500])
    xr.testing.assert_equal(got.drop_encoding(), src)
    assert not np.isnan(got["temperature"].values).any()
    assert not (tmp_path / "hres.zarr.journal.json").exists()


def test_zarr_append_failure_keeps_committed_times(
    wb2_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "hres.zarr"
    kw: dict[str, Any] = dict(variables=["t"], levels=[500], chunk_times=2)
    real = xr.Dataset.to_zarr

    def write_then_fail(self: xr.Dataset, *args: Any, **kwargs: Any) -> Any:
        result = real(self, *args, **kwargs)
        if kwargs.get("append_dim"):
            raise OSError("disk full (fake)")
        return result

    monkeypatch.setattr(xr.Dataset, "to_zarr", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        download_zarr(str(wb2_store), out, **kw)
    assert _read(out).sizes["time"] == 2  # the failed append was truncated away
    monkeypatch.setattr(xr.Dataset, "to_zarr", real)
    download_zarr(str(wb2_store), out, **kw)
    assert _read(out).sizes["time"] == 8


def test_zarr_dry_run_prints_plan_and_writes_nothing(
    wb2_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "hres.zarr"
    rc = main(
        [
            "hres",
            "--source",
            str(wb2_store),
            "--out",
            str(out),
            "--variables",
            "2t",
            "z",
            "t",
            "--levels",
            "500",
            "850",
            "--start",
            "2024-06-03",
            "--end",
            "2024-06-03",
            "--dry-run",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert f"source: {wb2_store}" in text
    assert "variables: 2t=2m_temperature, z=geopotential, t=temperature" in text
    assert "levels: 500, 850" in text
    assert (
        "times: 4 selected (2024-06-03T00:00..2024-06-03T18:00, stride 1); 0 already present"
        in text
    )
    per_time = 19 * 36 * 4 * (1 + 2 + 2)  # float32: 2t, and z, t on two levels
    assert f"estimated bytes: {4 * per_time} " in text
    assert not out.exists()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variables": ["t", "q"]}, r"variable 'q' \(looked for \['specific_humidity', 'q'\]\)"),
        ({"variables": ["t"], "levels": [500, 925]}, r"variable temperature has no level 925"),
        (
            {"variables": ["t"], "levels": [500], "start": "2030-01-01"},
            r"no times from 2030-01-01 to the last; "
            r"the store covers 2024-06-03T00:00\.\.2024-06-04T18",
        ),
        ({"variables": ["t"], "levels": [500], "stride": 0}, r"stride must be >= 1"),
    ],
)
def test_zarr_errors_name_the_problem(
    wb2_store: Path, tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(DataError, match=message):
        download_zarr(str(wb2_store), tmp_path / "o.zarr", **kwargs)
    assert not (tmp_path / "o.zarr").exists()


def test_zarr_missing_store_and_mismatched_output(wb2_store: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such zarr store"):
        download_zarr(str(tmp_path / "nope.zarr"), tmp_path / "o.zarr", variables=["t"])
    out = tmp_path / "o.zarr"
    download_zarr(str(wb2_store), out, variables=["t"], levels=[500], end="2024-06-03T00")
    with pytest.raises(DataError, match=r"holds variables \['temperature'\] but this request"):
        download_zarr(str(wb2_store), out, variables=["t", "u"], levels=[500])
    with pytest.raises(DataError, match=r"holds levels \[500.0\] but this request writes"):
        download_zarr(str(wb2_store), out, variables=["t"], levels=[500, 850])


def test_static_from_zarr_store(tmp_path: Path) -> None:
    st = _sample_static()  # WeatherBench grids run south to north, as WeatherBench2 stores do
    src = xr.Dataset(
        {
            "land_sea_mask": st["lsm"],
            "soil_type": st["slt"],
            "geopotential_at_surface": (st["orography"] * G)
            .astype(np.float32)
            .assign_attrs(units="m**2 s**-2"),
        }
    )
    store = _write_store(src, tmp_path / "src" / "wb2_static.zarr")
    out_dir = tmp_path / "static"
    path = download_static(out_dir, source=str(store))
    assert path == out_dir / "static.zarr"
    ds = open_dataset(path)
    assert set(ds.data_vars) == {"lsm", "slt", "z_sfc"}
    np.testing.assert_allclose(ds["z_sfc"].values[::-1], src["geopotential_at_surface"].values)
    download_static(out_dir, source=str(store))  # complete: nothing to do, no error
    with pytest.raises(DataError, match="--grid/--area apply to the CDS only"):
        download_static(out_dir, source=str(store), grid=[1.0])


def test_presets_name_public_weatherbench2_stores() -> None:
    assert dl.resolve_source("hres_t0").endswith("/hres_t0/2016-2022-6h-1440x721.zarr")
    assert "era5" in dl.resolve_source("era5")
    assert dl.resolve_source("/data/x.zarr") == "/data/x.zarr"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_root(tmp_path: Path):
    """A loopback HTTP server serving tmp_path/src, stopped after the test."""
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    handler = functools.partial(_QuietHandler, directory=str(tmp_path / "src"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_zarr_over_http(wb2_store: Path, http_root: str, tmp_path: Path) -> None:
    out = tmp_path / "http.zarr"
    url = f"{http_root}/{wb2_store.name}"
    download_zarr(url, out, variables=["2t", "z"], levels=[500], end="2024-06-03T12", chunk_times=2)
    got, src = _read(out), _wb2_like()
    np.testing.assert_array_equal(
        got["geopotential"].values, src["geopotential"].sel(level=[500]).values[:3]
    )
    with pytest.raises(DataError, match=r"cannot open zarr store"):
        download_zarr(f"{http_root}/missing.zarr", tmp_path / "x.zarr", variables=["t"])


def test_cli_end_to_end(wb2_store: Path, tmp_path: Path) -> None:
    fake = FakeCds()
    out = tmp_path / "era5"
    assert (
        main(
            [
                "era5",
                "--out",
                str(out),
                "--start",
                "2024-01-31",
                "--end",
                "2024-01-31",
                "--variables",
                "2t",
                "t",
                "--levels",
                "850",
                "--hours",
                "00",
                "--static-variables",
                "--retry-wait",
                "0",
            ],
            client=fake,
        )
        == 0
    )
    assert _files(out) == ["era5_pressure_2024-01.nc", "era5_surface_2024-01.nc"]
    assert (
        main(
            [
                "wb2",
                "--source",
                str(wb2_store),
                "--out",
                str(tmp_path / "w.zarr"),
                "--variables",
                "t",
                "--all-levels",
                "--end",
                "2024-06-03T00",
            ]
        )
        == 0
    )
    assert _read(tmp_path / "w.zarr").sizes["level"] == 6


def test_module_entry_point_runs() -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "data_builders.download", "era5", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "--dry-run" in res.stdout and "--static-variables" in res.stdout
