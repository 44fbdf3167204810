"""Write forecasts as CF-1.8 netCDF in WeatherBench2's forecast layout.

Layout: dimensions ``time`` (initialisation), ``prediction_timedelta`` (lead), ``level`` (hPa),
``latitude``, ``longitude``, as WB2's forecast stores, so WB2 tools and our own
`data_builders.readers.open_dataset` read the files back (the reader flattens
``time + prediction_timedelta`` to valid times; pass ``init_time=`` when forecasts overlap).
A 2-D auxiliary coordinate ``valid_time(time, prediction_timedelta)`` gives CF readers the valid
time. Variables keep their ECMWF short names (``2t 10u 10v msl z u v t q ...``), float32 values
unchanged, with ``units``, ``long_name`` and, where CF has one, ``standard_name``. (CF
recommends names that start with a letter; ``2t``, ``10u``, ``10v`` are ECMWF's names and what
Aurora and WB2 tooling key on, so they are kept.) Global attributes: ``Conventions``,
``source``, ``history`` and the run's provenance (model preset, checkpoint step, data), one
attribute per item plus the whole of it as JSON in ``provenance``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from aurora.batch import Batch

__all__ = ["VARIABLES", "variable_attrs", "write_forecast"]

VARIABLES: dict[str, dict[str, str]] = {
    "2t": {"long_name": "2 metre temperature", "units": "K", "standard_name": "air_temperature"},
    "10u": {
        "long_name": "10 metre U wind component",
        "units": "m s-1",
        "standard_name": "eastward_wind",
    },
    "10v": {
        "long_name": "10 metre V wind component",
        "units": "m s-1",
        "standard_name": "northward_wind",
    },
    "msl": {
        "long_name": "Mean sea level pressure",
        "units": "Pa",
        "standard_name": "air_pressure_at_mean_sea_level",
    },
    "z": {"long_name": "Geopotential", "units": "m2 s-2", "standard_name": "geopotential"},
    "u": {"long_name": "U component of wind", "units": "m s-1", "standard_name": "eastward_wind"},
    "v": {"long_name": "V component of wind", "units": "m s-1", "standard_name": "northward_wind"},
    "t": {"long_name": "Temperature", "units": "K", "standard_name": "air_temperature"},
    "q": {
        "long_name": "Specific humidity",
        "units": "kg kg-1",
        "standard_name": "specific_humidity",
    },
    "r": {"long_name": "Relative humidity", "units": "%", "standard_name": "relative_humidity"},
    "w": {
        "long_name": "Vertical velocity",
        "units": "Pa s-1",
        "standard_name": "lagrangian_tendency_of_air_pressure",
    },
    "lsm": {"long_name": "Land-sea mask", "units": "1", "standard_name": "land_binary_mask"},
    "slt": {"long_name": "Soil type", "units": "1"},
}
"""CF metadata by ECMWF short name (units as udunits spells them)."""


def variable_attrs(name: str) -> dict[str, str]:
    """CF attributes of a variable.

    Args:
        name: the ECMWF short name, e.g. ``2t`` or ``z``.

    Returns:
        `long_name`, `units` and (if CF has one) `standard_name`; an unknown name gets itself as
        long name and no units claim.
    """
    return dict(VARIABLES.get(name, {"long_name": name}))


def write_forecast(
    path: str | Path,
    init_times: Sequence[Any] | np.ndarray,
    predictions: Sequence[Batch],
    provenance: Mapping[str, Any],
) -> Path:
    """Write `predictions` to a CF netCDF file at `path` (see the module docstring).

    The lead of each step is its valid time (`metadata.time`) minus the init time and must be
    the same for every init.

    Args:
        path: the file to write.
        init_times: the forecasts' start times (datetimes or `datetime64`), shape `(n,)`.
        predictions: per rollout step, the `Batch` for all inits (as `aurora.rollout` yields
            for a batch of inits): variables of shape `(n, 1, h, w)` / `(n, 1, c, h, w)`.
        provenance: what produced the forecast (model preset, checkpoint step, data, ...).

    Returns:
        `path`.

    Raises:
        ValueError: no predictions, shapes that do not match the inits, or leads that differ
            between inits.
    """
    if not predictions:
        raise ValueError("write_forecast: no predictions")
    init = np.asarray(init_times).astype("datetime64[m]").ravel()
    leads = [_lead(init, p) for p in predictions]
    first = predictions[0]
    lat, lon = np.asarray(first.metadata.lat), np.asarray(first.metadata.lon)
    levels = np.asarray(first.metadata.atmos_levels, np.float64)
    data: dict[str, Any] = {}
    for group, dims in (("surf", ()), ("atmos", ("level",))):
        for name in getattr(first, f"{group}_vars"):
            stack = np.stack([_values(p, group, name, len(init)) for p in predictions], axis=1)
            data[name] = xr.Variable(
                ("time", "prediction_timedelta", *dims, "latitude", "longitude"),
                stack,
                variable_attrs(name),
            )
    lead = np.asarray(leads, "timedelta64[m]")
    coords = _coords(init, lead, levels if first.atmos_vars else None, lat, lon)
    ds = xr.Dataset(data, coords=coords, attrs=_global_attrs(provenance))
    ds.to_netcdf(path, engine="netcdf4", encoding=_encoding(ds, init, lead))
    return Path(path)


def _lead(init: np.ndarray, pred: Batch) -> np.timedelta64:
    """The single lead time of one rollout step."""
    valid = np.asarray(pred.metadata.time).astype(np.int64).ravel()
    if valid.shape != init.shape:
        raise ValueError(f"{valid.size} valid times for {init.size} init times")
    lead = valid - init.astype(np.int64)
    if np.any(lead != lead[0]):
        raise ValueError(
            f"Leads differ between inits within one step: {sorted(set(lead.tolist()))} minutes"
        )
    return np.timedelta64(int(lead[0]), "m")


def _values(pred: Batch, group: str, name: str, n_init: int) -> np.ndarray:
    """(init, [level,] lat, lon) float32 of one variable of one step."""
    x = np.asarray(getattr(pred, f"{group}_vars")[name])
    if x.shape[:2] != (n_init, 1):
        raise ValueError(f"{name}: shape {x.shape}; expected (init={n_init}, history=1, ...)")
    return x[:, 0].astype(np.float32, copy=False)


def _coords(
    init: np.ndarray, lead: np.ndarray, levels: np.ndarray | None, lat: np.ndarray, lon: np.ndarray
) -> dict[str, Any]:
    coords: dict[str, Any] = {
        "time": (
            "time",
            init.astype("datetime64[ns]"),
            {
                "standard_name": "forecast_reference_time",
                "long_name": "initialisation time",
                "axis": "T",
            },
        ),
        "prediction_timedelta": (
            "prediction_timedelta",
            lead.astype("timedelta64[ns]"),
            {"standard_name": "forecast_period", "long_name": "lead time"},
        ),
        "valid_time": (
            ("time", "prediction_timedelta"),
            (init[:, None] + lead[None, :]).astype("datetime64[ns]"),
            {"standard_name": "time", "long_name": "valid time"},
        ),
        "latitude": (
            "latitude",
            lat.astype(np.float64),
            {
                "standard_name": "latitude",
                "long_name": "latitude",
                "units": "degrees_north",
                "axis": "Y",
            },
        ),
        "longitude": (
            "longitude",
            lon.astype(np.float64),
            {
                "standard_name": "longitude",
                "long_name": "longitude",
                "units": "degrees_east",
                "axis": "X",
            },
        ),
    }
    if levels is not None:
        coords["level"] = (
            "level",
            levels,
            {
                "standard_name": "air_pressure",
                "long_name": "pressure level",
                "units": "hPa",
                "positive": "down",
                "axis": "Z",
            },
        )
    return coords


def _encoding(ds: xr.Dataset, init: np.ndarray, lead: np.ndarray) -> dict[str, dict[str, Any]]:
    """Lossless compression; exact integer time units (hours when every time is whole hours)."""
    minutes = np.concatenate([init.astype(np.int64), lead.astype(np.int64)])
    unit = "hours" if np.all(minutes % 60 == 0) else "minutes"
    enc: dict[str, dict[str, Any]] = {
        "time": {
            "units": f"{unit} since 1970-01-01 00:00:00",
            "calendar": "proleptic_gregorian",
            "dtype": "int64",
        },
        "valid_time": {
            "units": f"{unit} since 1970-01-01 00:00:00",
            "calendar": "proleptic_gregorian",
            "dtype": "int64",
        },
        "prediction_timedelta": {"units": unit, "dtype": "int64"},
    }
    for name in ("latitude", "longitude", "level"):
        if name in ds.coords:
            enc[name] = {"_FillValue": None}
    for name in ("time", "valid_time", "prediction_timedelta"):
        enc[name]["_FillValue"] = None
    for name in ds.data_vars:
        enc[str(name)] = {"zlib": True, "complevel": 4, "dtype": "float32"}
    return enc


def _global_attrs(provenance: Mapping[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    prov = {str(k): _attr(v) for k, v in provenance.items()}
    preset = prov.get("model_preset", prov.get("model", "Aurora"))
    step = prov.get("checkpoint_step")
    source = f"Aurora (JAX/Flax) {preset}" + (
        f", checkpoint step {step}" if step is not None else ""
    )
    attrs = {
        "Conventions": "CF-1.8",
        "title": "Aurora forecast",
        "source": source,
        "history": f"{now} written by trainers.evaluation.forecast_io.write_forecast",
        "provenance": json.dumps(
            {str(k): v for k, v in provenance.items()}, sort_keys=True, default=str
        ),
    }
    attrs.update({f"provenance_{k}": v for k, v in prov.items()})
    return attrs


def _attr(value: Any) -> Any:
    """netCDF attributes hold strings and numbers; everything else is written as JSON/text."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, float, str, np.integer, np.floating)):
        return value.item() if isinstance(value, np.generic) else value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)
