"""Aurora 1.5's categorical static fields: the readers derive ``slt_k``, ``tvh_k`` and ``tvl_k``
(indicator fields of ECMWF's soil type and vegetation type codes) from ERA5's invariants."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
import xarray as xr

from aurora.batch import Batch, Metadata, to_minutes
from aurora.insolation import insolation
from aurora.model.v1p5 import AuroraV1p5
from aurora.rollout import ModelStep
from data_builders.readers import (
    CATEGORY_CODES,
    STATIC_KEYS,
    DataError,
    aurora_groups,
    open_dataset,
)
from tests.test_parity import TINY

_INVARIANTS = ("lsm", "z", "anor", "isor", "cvh", "cl", "dl", "cvl", "slor", "sdfor", "sdor")


def _codes(shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
    """Each field's codes, all of them present except the last one of each field (a code found
    nowhere), some disturbed by less than 0.5 as an interpolating regrid leaves them."""
    rng = np.random.default_rng(seed)
    out = {}
    for field, codes in CATEGORY_CODES.items():
        values = rng.choice(np.array(codes[:-1], np.float32), shape)
        values.flat[: len(codes) - 1] = codes[:-1]
        out[field] = values + rng.uniform(-0.3, 0.3, shape).astype(np.float32)
    return out


def _invariants_file(path: Path, fields: dict[str, np.ndarray]) -> Path:
    """A global ERA5-like invariants file (one time, as the CDS writes them) holding `fields`."""
    h, w = next(iter(fields.values())).shape
    lat, lon = np.linspace(90, -90, h + 1)[:-1], np.linspace(0, 360, w, endpoint=False)
    data = {
        name: (("valid_time", "latitude", "longitude"), values[None].astype(np.float32))
        for name, values in fields.items()
    }
    coords = {"valid_time": np.array(["2020-01-01"], "datetime64[ns]"), "latitude": lat}
    xr.Dataset(data, coords | {"longitude": lon}).to_netcdf(path)
    return path


def _ecmwf_invariants(shape: tuple[int, int] = (7, 12), seed: int = 0) -> dict[str, np.ndarray]:
    """Every ECMWF invariant Aurora 1.5 reads, by its ERA5 short name."""
    rng = np.random.default_rng(seed)
    fields = {name: rng.random(shape).astype(np.float32) for name in _INVARIANTS}
    fields["z"] = fields["z"] * 50_000  # surface geopotential, m**2 s**-2
    return fields | _codes(shape, seed)


def test_indicator_fields_are_the_rounded_codes(tmp_path: Path) -> None:
    """``slt_3 = (round(slt) == 3)``, exactly, for every code of the three fields; a code found
    nowhere is a field of zeros; the categorical fields read for them are not returned."""
    codes = _codes((7, 12), seed=1)
    path = _invariants_file(tmp_path / "categories.nc", codes)
    names = [f"{f}_{c}" for f, cs in CATEGORY_CODES.items() for c in cs]
    ds = open_dataset(path, variables=names)
    assert list(ds.data_vars) == names
    for field, values in codes.items():
        for code in CATEGORY_CODES[field]:
            da = ds[f"{field}_{code}"]
            assert da.dtype == np.float32 and da.dims == ("latitude", "longitude")
            expected = (np.rint(values) == code).astype(np.float32)
            np.testing.assert_array_equal(da.values, expected, err_msg=f"{field}_{code}")
            assert da.attrs["aurora_name"] == f"{field}_{code}"
        assert not ds[f"{field}_{CATEGORY_CODES[field][-1]}"].values.any()  # absent code
        total = sum(ds[f"{field}_{c}"].values for c in CATEGORY_CODES[field])
        np.testing.assert_array_equal(total, 1.0)  # every point has exactly one code
    both = open_dataset(path, variables=["slt", "slt_2"])
    assert set(both.data_vars) == {"slt", "slt_2"}  # the categorical field when asked for
    np.testing.assert_array_equal(both["slt"].values, codes["slt"])


def test_every_v1p5_static_field_from_the_ecmwf_invariants(tmp_path: Path) -> None:
    """All 36 of AuroraV1p5's static fields come from a file of ECMWF's 14 invariants, through
    the keys `STATIC_KEYS` gives the builders, under the model's names."""
    static_vars = AuroraV1p5(autocast=False).static_vars
    assert len(static_vars) == 36 and set(static_vars) <= set(STATIC_KEYS)
    path = _invariants_file(tmp_path / "invariants.nc", _ecmwf_invariants())
    ds = open_dataset(path, variables=[STATIC_KEYS[v] for v in static_vars])
    static = aurora_groups(ds)["static"]
    assert set(static) == set(static_vars)
    assert all(np.isfinite(da.values).all() and da.shape == (7, 12) for da in static.values())
    assert static["tvl_13"].attrs["source_name"] == "tvl"


def test_missing_categorical_field_names_file_and_field(tmp_path: Path) -> None:
    """An indicator whose categorical field the files lack fails before reading, naming both."""
    fields = _ecmwf_invariants()
    del fields["tvh"]
    path = _invariants_file(tmp_path / "no_tvh.nc", fields)
    with pytest.raises(DataError, match=r"no_tvh\.nc.*tvh_3.*\['tvh'\]"):
        open_dataset(path, variables=["slt_1", "tvh_3"])


def _era5_files(tmp_path: Path, h: int, w: int) -> list[Path]:
    """ERA5-like single-level, pressure-level and invariants files for two times, by ECMWF's
    short names, with plausible magnitudes (the readers check them)."""
    rng = np.random.default_rng(2)
    lat, lon = np.linspace(90, -90, h + 1)[:-1], np.linspace(0, 360, w, endpoint=False)
    levels = np.array([100.0, 500.0, 850.0])
    coords = {"valid_time": np.array(["2020-06-01T06", "2020-06-01T12"], "datetime64[ns]")}
    coords |= {"latitude": lat, "longitude": lon}
    single = ["d2m", "tcwv", "tcc", "u100", "v100", "sp", "lcc", "mcc", "hcc", "skt", "stl1"]
    single += ["swvl1", "siconc", "sd", "u10", "v10"]
    surf = {n: rng.random((2, h, w)) for n in single}
    surf |= {"t2m": 250 + 50 * rng.random((2, h, w)), "msl": 1e5 + rng.random((2, h, w))}
    dims = ("valid_time", "latitude", "longitude")
    data = {n: (dims, v.astype(np.float32)) for n, v in surf.items()}
    xr.Dataset(data, coords).to_netcdf(tmp_path / "single.nc")
    std_z = np.array([158_000.0, 54_000.0, 14_000.0])[None, :, None, None]  # ~ICAO, m**2 s**-2
    atmos = {n: 1e-3 * rng.random((2, 3, h, w)) for n in ("u", "v", "q")}
    atmos |= {"z": std_z * (1 + 0.01 * rng.random((2, 3, h, w)))}
    atmos |= {"t": 250 + 10 * rng.random((2, 3, h, w))}
    dims = ("valid_time", "pressure_level", "latitude", "longitude")
    data = {n: (dims, v.astype(np.float32)) for n, v in atmos.items()}
    xr.Dataset(data, coords | {"pressure_level": levels}).to_netcdf(tmp_path / "levels.nc")
    static = _invariants_file(tmp_path / "static.nc", _ecmwf_invariants((h, w)))
    return [tmp_path / "single.nc", tmp_path / "levels.nc", static]


def test_a_v1p5_batch_from_era5_files_runs_through_a_tiny_model(tmp_path: Path) -> None:
    """The readers give every input AuroraV1p5 takes but `insolation` (computed from the time,
    as the model recomputes it) from ERA5's files, the 36 static fields included; one step of a
    TINY model on the batch they make is finite for every output variable."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in TINY.items()}
    model = AuroraV1p5(autocast=False, **kwargs)
    inputs = [v for v in model.surf_vars if v not in model.output_only_surf_vars]
    assert len(inputs) == 19 and len(model.static_vars) == 36
    wanted = [v for v in inputs if v != "insolation"] + list(model.atmos_vars)
    wanted += [STATIC_KEYS[v] for v in model.static_vars]
    h, w = 16, 32
    groups = aurora_groups(open_dataset(_era5_files(tmp_path, h, w), variables=wanted))
    times = groups["surf"]["2t"]["time"].values
    lat, lon = groups["surf"]["2t"]["latitude"].values, groups["surf"]["2t"]["longitude"].values
    sun = np.asarray(insolation(to_minutes(times), lat, lon))[None]
    batch = Batch(
        surf_vars={k: da.values[None] for k, da in groups["surf"].items()} | {"insolation": sun},
        static_vars={k: da.values for k, da in groups["static"].items()},
        atmos_vars={k: da.values[None] for k, da in groups["atmos"].items()},
        metadata=Metadata(
            lat=tuple(lat),
            lon=tuple(lon),
            time=(times[-1],),
            atmos_levels=tuple(groups["atmos"]["z"]["level"].values),
        ),
    )
    assert set(batch.surf_vars) == set(inputs) and set(batch.static_vars) == set(model.static_vars)
    params = jax.jit(model.init)(jax.random.key(0), batch)["params"]
    pred = ModelStep(model)(params, batch)
    assert set(pred.surf_vars) == set(model.surf_vars)
    for name, value in (pred.surf_vars | pred.atmos_vars).items():
        assert np.isfinite(np.asarray(value)).all(), name


def test_zarr_source_derives_indicator_fields_from_the_store(tmp_path: Path) -> None:
    """The streaming zarr source reads the categorical fields by their WeatherBench2 names and
    derives the indicator fields as `open_dataset` does."""
    from tests.test_zarr_source import LAT, LON, _source, _write, wb2_like

    wb2 = _write(wb2_like(), tmp_path / "wb2.zarr")
    long = {"slt": "soil_type", "tvh": "type_of_high_vegetation", "tvl": "type_of_low_vegetation"}
    codes = _codes((LAT.size, LON.size), seed=3)
    static = xr.Dataset(
        {long[f]: (("latitude", "longitude"), v) for f, v in codes.items()},
        {"latitude": LAT, "longitude": LON},
    )
    store = _write(static, tmp_path / "static.zarr")
    names = ["slt", "slt_0", "slt_6", "tvh_19", "tvh_4", "tvl_13"]
    stats = {"r_500": (0, 1), "r_850": (0, 1)}
    src = _source(str(wb2), static_url=str(store), static_vars=tuple(names), stats=stats)
    assert set(src.static) == set(names)
    ref = open_dataset(store, variables=names)
    for name in names:
        np.testing.assert_array_equal(src.static[name], ref[name].values, err_msg=name)
    assert src.static["tvh_4"].any() and not src.static["tvh_19"].any()


def test_builder_stores_indicator_fields_regridded(tmp_path: Path) -> None:
    """A TFDS builder with indicator `static_vars` stores them: derived on the static file's
    grid, then regridded to the data's like any static field (fractions that sum to 1)."""
    from data_builders.builders import Hres
    from data_builders.readers import regrid
    from tests.test_builders import HRES_KW, WB1

    names = tuple(f"slt_{c}" for c in CATEGORY_CODES["slt"])
    builder = Hres(data_dir=tmp_path, **{**HRES_KW, "static_paths": [WB1], "static_vars": names})
    builder.download_and_prepare()
    static = builder.static()
    ref = open_dataset(WB1, variables=list(names))
    lat, lon, _ = builder.grid()
    ref = regrid(ref, lat, lon)
    for name in names:
        np.testing.assert_array_equal(static[name], ref[name].values, err_msg=name)
    np.testing.assert_allclose(sum(static[n] for n in names), 1.0, atol=1e-5)
    assert 0 < static["slt_0"].mean() < 1
