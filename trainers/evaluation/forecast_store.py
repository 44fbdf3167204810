"""Forecast files written one lead at a time: WB2's zarr layout and CF netCDF, both resumable.

`ForecastZarr` writes WeatherBench2's forecast layout: dimensions ``time`` (initialisation),
``prediction_timedelta``, ``level``, ``latitude``, ``longitude``; WB2's long variable names
(``geopotential``, ``2m_temperature``, ...), float32, one chunk per (init, lead, variable); zarr
format 2 with consolidated metadata, so WB2's own tools and plain `xarray.open_zarr` read it.
`ForecastNetcdf` writes the CF netCDF of `trainers.evaluation.forecast_io` (short names, an
unlimited ``time``). Both grow by one slot per init as forecasts are made and record in the
attribute ``complete_inits`` how many leading slots are whole: a re-run appends the inits not
yet written and overwrites a slot an interrupted run left unfinished, so host memory holds one
lead of one batch, whatever the number of inits.

An ensemble (`Layout` with `members > 1`) adds WB2's leading ``realization`` dimension, as in
WB2's probabilistic forecast stores (e.g. IFS ENS: ``realization, time, prediction_timedelta,
level, ...``), with CF's ``standard_name = "realization"``; a slot is whole once every member of
every lead is written. One member writes the files exactly as before, without that dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from aurora.batch import Batch
from trainers.evaluation.forecast_io import _coords, _encoding, _global_attrs, variable_attrs
from trainers.evaluation.wb2 import to_wb2

__all__ = ["ENSEMBLE_DIM", "ForecastNetcdf", "ForecastZarr", "Layout"]

COMPLETE = "complete_inits"
ENSEMBLE_DIM = "realization"
"""WeatherBench2's name of the ensemble-member dimension (`weatherbench2.metrics.REALIZATION`)."""


class Layout:
    """What every init of a forecast file holds: variables, leads, levels and grid.

    Args:
        surf: surface variables (short names).
        atmos: atmospheric variables (short names).
        leads_minutes: the leads, int minutes, shape `(steps,)`.
        levels: pressure levels (hPa).
        lat: latitudes, decreasing.
        lon: longitudes.
        members: ensemble members; above 1 the variables get a leading ``realization`` axis.
    """

    def __init__(
        self,
        surf: Sequence[str],
        atmos: Sequence[str],
        leads_minutes: np.ndarray,
        levels: Sequence[float],
        lat: np.ndarray,
        lon: np.ndarray,
        members: int = 1,
    ) -> None:
        self.surf, self.atmos = tuple(surf), tuple(atmos)
        self.members = int(members)
        self.leads = np.asarray(leads_minutes, np.int64)
        self.levels = np.asarray(levels, np.float64)
        self.lat, self.lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)

    @property
    def ensemble(self) -> tuple[int, ...]:
        """The leading (member) axis of the variables: `(members,)`, or none for one member."""
        return (self.members,) if self.members > 1 else ()

    def at(self, member: int | None) -> tuple[int, ...]:
        """The index of `member` on the leading axis (none for one member)."""
        if not self.ensemble:
            return ()
        if member is None or not 0 <= member < self.members:
            raise ValueError(f"member must be one of 0..{self.members - 1}, not {member}")
        return (member,)

    def template(self, names: Mapping[str, str], provenance: Mapping[str, Any]) -> xr.Dataset:
        """An empty dataset (no init yet) with every coordinate and attribute."""
        init = np.array([], "datetime64[m]")
        lead = self.leads.astype("timedelta64[m]")
        coords = _coords(init, lead, self.levels if self.atmos else None, self.lat, self.lon)
        if self.ensemble:
            coords[ENSEMBLE_DIM] = (
                ENSEMBLE_DIM,
                np.arange(self.members, dtype=np.int64),
                {"standard_name": "realization", "long_name": "ensemble member"},
            )
        members = ((ENSEMBLE_DIM,), self.ensemble) if self.ensemble else ((), ())
        data = {}
        for group, extra in ((self.surf, ()), (self.atmos, (len(self.levels),))):
            for name in group:
                shape = (*members[1], 0, len(self.leads), *extra, len(self.lat), len(self.lon))
                dims = (
                    *members[0],
                    "time",
                    "prediction_timedelta",
                    *(("level",) if extra else ()),
                )
                attrs = {**variable_attrs(name), "short_name": name}
                data[names[name]] = xr.Variable(
                    (*dims, "latitude", "longitude"), np.empty(shape, np.float32), attrs
                )
        return xr.Dataset(data, coords=coords, attrs=_global_attrs(provenance))

    def check(self, ds: xr.Dataset, names: Mapping[str, str], path: Path) -> None:
        """Refuse to append to a file of another layout."""
        want = sorted(names[v] for v in (*self.surf, *self.atmos))
        leads = ds["prediction_timedelta"].values.astype("timedelta64[m]").astype(np.int64)
        same = (
            sorted(str(k) for k in ds.data_vars) == want
            and np.array_equal(leads, self.leads)
            and np.allclose(ds["latitude"].values, self.lat)
            and np.allclose(ds["longitude"].values, self.lon)
            and (not self.atmos or np.allclose(ds["level"].values, self.levels))
            and ds.sizes.get(ENSEMBLE_DIM, 1) == self.members
        )
        if not same:
            raise ValueError(
                f"{path} holds forecasts of another layout (variables, leads, levels or grid); "
                "write to a new path"
            )


class ForecastZarr:
    """A WB2-layout forecast zarr store, appended one init slot and one lead at a time.

    Args:
        path: the store; created, or opened to append (its layout must match).
        layout: what each init holds.
        provenance: what produced the forecasts (global attributes; kept from the first run).
    """

    def __init__(self, path: str | Path, layout: Layout, provenance: Mapping[str, Any]) -> None:
        import zarr

        self.path, self.layout = Path(path), layout
        self.names = {v: to_wb2(v) for v in (*layout.surf, *layout.atmos)}
        if (self.path / ".zgroup").exists():
            with xr.open_zarr(self.path, consolidated=False) as ds:
                layout.check(ds, self.names, self.path)
        else:
            ds = layout.template(self.names, provenance)
            encoding: dict[str, Any] = {
                "time": {"units": "minutes since 1970-01-01", "dtype": "int64", "_FillValue": None},
                "prediction_timedelta": {"units": "minutes", "dtype": "int64"},
            }
            axis = len(layout.ensemble)  # the time axis
            for name in ds.data_vars:
                shape = ds[name].shape
                encoding[str(name)] = {"chunks": (*(1,) * (axis + 2), *shape[axis + 2 :])}
            ds = ds.drop_vars("valid_time")  # WB2's forecast stores have none
            ds.attrs[COMPLETE] = 0
            ds.to_zarr(self.path, mode="w", zarr_format=2, encoding=encoding, consolidated=True)
        self.group = zarr.open_group(
            str(self.path), mode="r+", zarr_format=2, use_consolidated=False
        )
        self.arrays = {v: self.group[n] for v, n in self.names.items()}
        self.time = self.group["time"]
        self._resize(int(self.group.attrs.get(COMPLETE, 0)))  # drop an unfinished slot
        self._rows: np.ndarray | None = None
        self._slots = slice(0, 0)

    def written(self) -> set[int]:
        """Init times (int seconds) already written whole."""
        n = int(self.group.attrs.get(COMPLETE, 0))
        return {int(m) * 60 for m in self.time[:n]}

    def begin(self, inits: np.ndarray) -> None:
        """Add a slot for each of `inits` (int seconds) that the store lacks."""
        done = self.written()
        self._rows = np.array([int(t) not in done for t in inits])
        new = np.asarray(inits, np.int64)[self._rows]
        n = int(self.time.shape[0])
        self._resize(n + len(new))
        if len(new):
            self.time[n : n + len(new)] = new // 60
        self._slots = slice(n, n + len(new))

    def write(self, lead_index: int, batch: Batch, member: int | None = None) -> None:
        """Write one lead (index from 0) of the inits of `begin`: variables `(b, 1, ...)`;
        `member` (from 0) is required in an ensemble layout."""
        at = self.layout.at(member)
        if self._rows is None or not self._rows.any():
            return
        for group in ("surf", "atmos"):
            for name, x in getattr(batch, f"{group}_vars").items():
                if name in self.arrays:
                    values = np.asarray(x, np.float32)[self._rows, 0]
                    self.arrays[name][(*at, self._slots, lead_index)] = values

    def end(self) -> None:
        """Mark the slots of `begin` whole (and consolidate the metadata)."""
        import zarr

        self.group.attrs[COMPLETE] = self._slots.stop if self._rows is not None else 0
        self._rows = None
        zarr.consolidate_metadata(str(self.path), zarr_format=2)

    def close(self) -> None:
        """Nothing to release (every write is on disk)."""

    def _resize(self, n: int) -> None:
        axis = len(self.layout.ensemble)
        if self.time.shape[0] != n:
            self.time.resize((n,))
        for array in self.arrays.values():
            if array.shape[axis] != n:
                array.resize((*array.shape[:axis], n, *array.shape[axis + 1 :]))


class ForecastNetcdf:
    """The CF netCDF forecast file (`forecast_io`'s layout) with an unlimited ``time``.

    Args:
        path: the file; created, or opened to append (its layout must match).
        layout: what each init holds.
        provenance: what produced the forecasts (global attributes).
        whole_hours: whether every init and lead is whole hours (times in hours, else minutes).
    """

    def __init__(
        self,
        path: str | Path,
        layout: Layout,
        provenance: Mapping[str, Any],
        whole_hours: bool = True,
    ) -> None:
        import netCDF4

        self.path, self.layout = Path(path), layout
        self.names = {v: v for v in (*layout.surf, *layout.atmos)}
        if self.path.exists():
            with xr.open_dataset(self.path) as ds:
                layout.check(ds.drop_vars("valid_time", errors="ignore"), self.names, self.path)
        else:
            ds = layout.template(self.names, provenance)
            lead = layout.leads.astype("timedelta64[m]")
            init = np.array([0 if whole_hours else 1], "datetime64[m]")
            encoding = _encoding(ds, init, lead)
            axis = len(layout.ensemble)  # the time axis
            for name in ds.data_vars:
                shape = ds[name].shape
                encoding[str(name)]["chunksizes"] = (*(1,) * (axis + 2), *shape[axis + 2 :])
            ds.attrs[COMPLETE] = 0
            ds.to_netcdf(self.path, engine="netcdf4", encoding=encoding, unlimited_dims=["time"])
        self.nc = netCDF4.Dataset(self.path, "a")
        self.unit = 60 if self.nc["time"].units.startswith("hours") else 1
        self._rows: np.ndarray | None = None
        self._slots = slice(0, 0)

    def written(self) -> set[int]:
        """Init times (int seconds) already written whole."""
        n = int(self.nc.getncattr(COMPLETE))
        return {int(v) * self.unit * 60 for v in self.nc["time"][:n]}

    def begin(self, inits: np.ndarray) -> None:
        """Add a slot for each of `inits` the file lacks (after the whole ones)."""
        done = self.written()
        self._rows = np.array([int(t) not in done for t in inits])
        new = np.asarray(inits, np.int64)[self._rows]
        n = int(self.nc.getncattr(COMPLETE))
        self._slots = slice(n, n + len(new))
        if len(new):
            minutes = new // 60
            self.nc["time"][self._slots] = minutes // self.unit
            valid = minutes[:, None] + self.layout.leads[None, :]
            self.nc["valid_time"][self._slots, :] = valid // self.unit

    def write(self, lead_index: int, batch: Batch, member: int | None = None) -> None:
        """Write one lead (index from 0) of the inits of `begin`: variables `(b, 1, ...)`;
        `member` (from 0) is required in an ensemble layout."""
        at = self.layout.at(member)
        if self._rows is None or not self._rows.any():
            return
        for group in ("surf", "atmos"):
            for name, x in getattr(batch, f"{group}_vars").items():
                if name in self.names:
                    values = np.asarray(x, np.float32)[self._rows, 0]
                    self.nc[name][(*at, self._slots, lead_index)] = values

    def end(self) -> None:
        """Mark the slots of `begin` whole."""
        self.nc.setncattr(COMPLETE, self._slots.stop if self._rows is not None else 0)
        self._rows = None
        self.nc.sync()

    def close(self) -> None:
        """Close the file."""
        self.nc.close()
