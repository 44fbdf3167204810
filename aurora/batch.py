"""`Batch` and `Metadata`: the pytrees that flow through the model, trainer and data pipeline.

Same fields and conventions as microsoft-aurora's: `surf_vars[name]` has shape `(b, t, h, w)`,
`static_vars[name]` `(h, w)`, `atmos_vars[name]` `(b, t, c, h, w)`; history index `t = -1` is
the current time; `lat` strictly decreasing in `[-90, 90]`, `lon` strictly increasing in `[0, 360)`.

Two choices differ from the PyTorch dataclasses because the batch crosses `jax.jit`:

* The grid (`lat`, `lon`) and `atmos_levels` are static pytree fields (tuples): the model computes
  its position, scale and level encodings from them on the host in float64, exactly like the
  reference, and a jitted step recompiles only when the grid changes.
* `time` is a leaf: int32 **minutes since 1970-01-01T00:00 UTC**, shape `(b,)`, so that a rollout
  advances it inside `jit` without `JAX_ENABLE_X64` (`Metadata(time=...)` also accepts datetimes;
  `Metadata.datetimes()` converts back). `rollout_step` is a leaf too (a scalar int).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from aurora.normalisation import Stats, atmos_location_scale, surf_location_scale

__all__ = ["Batch", "Metadata", "minutes_to_datetimes", "to_minutes"]

Array = Any  # numpy or jax array

_EPOCH = np.datetime64("1970-01-01T00:00", "m")


def to_minutes(times: Iterable[datetime | np.datetime64] | np.ndarray) -> np.ndarray:
    """Datetimes (naive = UTC) -> int32 minutes since 1970-01-01, rejecting sub-minute times.

    Args:
        times (Iterable[datetime | np.datetime64] | np.ndarray): Times, any shape.

    Returns:
        np.ndarray: int32 minutes of shape `(n,)`, the times flattened.

    Raises:
        ValueError: For a time that is not a whole minute or lies beyond int32 minutes.
    """
    items = times.ravel().tolist() if isinstance(times, np.ndarray) else list(times)
    if isinstance(times, np.ndarray) and np.issubdtype(times.dtype, np.datetime64):
        items = list(times.ravel())  # keep nanosecond precision (tolist() gives integers)
    values = []
    for t in items:
        if isinstance(t, datetime):
            if t.tzinfo is not None:
                t = t.astimezone(UTC).replace(tzinfo=None)
            t = np.datetime64(t)
        t64 = np.datetime64(t, "ns")
        minutes = t64.astype("datetime64[m]")
        if minutes.astype("datetime64[ns]") != t64:
            raise ValueError(f"Time {t64} is not a whole minute; Aurora's times are whole minutes.")
        values.append(int((minutes - _EPOCH).astype(np.int64)))
    out = np.asarray(values, dtype=np.int64)
    if out.size and (out.min() < np.iinfo(np.int32).min or out.max() > np.iinfo(np.int32).max):
        raise ValueError("Times must lie within about 4000 years of 1970.")
    return out.astype(np.int32)


def minutes_to_datetimes(minutes: Array) -> tuple[datetime, ...]:
    """Inverse of :func:`to_minutes`.

    Args:
        minutes (Array): Minutes since 1970, any shape (numpy or jax).

    Returns:
        tuple[datetime, ...]: Naive UTC datetimes, flattened.
    """
    values = np.asarray(jax.device_get(minutes)).astype(np.int64).ravel()
    return tuple((_EPOCH + np.timedelta64(int(m), "m")).astype(datetime) for m in values)


def _is_time_like(value: Any) -> bool:
    if isinstance(value, np.ndarray):
        return np.issubdtype(value.dtype, np.datetime64) or value.dtype == object
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and isinstance(value[0], (datetime, np.datetime64))
    return isinstance(value, (datetime, np.datetime64))


@lru_cache(maxsize=64)
def _check_grid(lat: tuple[float, ...], lon: tuple[float, ...]) -> None:
    lat_a, lon_a = np.asarray(lat), np.asarray(lon)
    if lat_a.ndim != 1 or lon_a.ndim != 1:
        raise ValueError("Latitudes and longitudes must be vectors.")
    if not (np.all(lat_a <= 90) and np.all(lat_a >= -90)):
        raise ValueError("Latitudes must be in the range [-90, 90].")
    if not (np.all(lon_a >= 0) and np.all(lon_a < 360)):
        raise ValueError("Longitudes must be in the range [0, 360).")
    if not np.all(np.diff(lat_a) < 0):
        raise ValueError("Latitudes must be strictly decreasing.")
    if not np.all(np.diff(lon_a) > 0):
        raise ValueError("Longitudes must be strictly increasing.")


def _as_float_tuple(values: Any) -> tuple[float, ...]:
    if isinstance(values, tuple) and all(isinstance(v, float) for v in values):
        return values
    return tuple(float(v) for v in np.asarray(jax.device_get(values), dtype=np.float64).ravel())


@struct.dataclass
class Metadata:
    """Grid, times, pressure levels and rollout step of a batch (see the module docstring).

    Attributes:
        lat (tuple[float, ...]): The `h` latitudes, strictly decreasing (static).
        lon (tuple[float, ...]): The `w` longitudes in `[0, 360)`, strictly increasing (static).
        time (Array): int32 minutes since 1970 of shape `(b,)`; datetimes are converted.
        atmos_levels (tuple[float, ...]): The `c` pressure levels in hPa (static).
        rollout_step (Array): Model calls since the data (a scalar int or `(b,)` array).
    """

    lat: tuple[float, ...] = struct.field(pytree_node=False)
    lon: tuple[float, ...] = struct.field(pytree_node=False)
    time: Array
    atmos_levels: tuple[float, ...] = struct.field(pytree_node=False)
    rollout_step: Array = 0

    def __post_init__(self) -> None:
        # Pytree unflattening also runs this, with tracers or placeholders as leaves: only the
        # static fields are normalised unconditionally; leaves are converted only from datetimes.
        object.__setattr__(self, "lat", _as_float_tuple(self.lat))
        object.__setattr__(self, "lon", _as_float_tuple(self.lon))
        object.__setattr__(self, "atmos_levels", tuple(float(x) for x in self.atmos_levels))
        _check_grid(self.lat, self.lon)
        if _is_time_like(self.time):
            object.__setattr__(self, "time", to_minutes(self.time))

    def datetimes(self) -> tuple[datetime, ...]:
        """The times as naive UTC datetimes, one per batch element."""
        return minutes_to_datetimes(self.time)


@struct.dataclass
class Batch:
    """A batch of weather states.

    Attributes:
        surf_vars (dict[str, Array]): Surface variables, each of shape `(b, t, h, w)`.
        static_vars (dict[str, Array]): Static variables, each of shape `(h, w)`.
        atmos_vars (dict[str, Array]): Atmospheric variables, each of shape `(b, t, c, h, w)`.
        metadata (Metadata): Grid, times, levels and rollout step.
    """

    surf_vars: dict[str, Array]
    static_vars: dict[str, Array]
    atmos_vars: dict[str, Array]
    metadata: Metadata

    @property
    def spatial_shape(self) -> tuple[int, int]:
        """`(h, w)` of the grid."""
        return len(self.metadata.lat), len(self.metadata.lon)

    def _map(
        self,
        surf: Callable[[str, Array], Array],
        static: Callable[[str, Array], Array],
        atmos: Callable[[str, Array], Array],
        metadata: Metadata | None = None,
    ) -> Batch:
        return Batch(
            surf_vars={k: surf(k, v) for k, v in self.surf_vars.items()},
            static_vars={k: static(k, v) for k, v in self.static_vars.items()},
            atmos_vars={k: atmos(k, v) for k, v in self.atmos_vars.items()},
            metadata=self.metadata if metadata is None else metadata,
        )

    def normalise(self, surf_stats: Stats | None = None) -> Batch:
        """`(x - location) / scale` per variable (and level), shapes unchanged.

        Args:
            surf_stats (Stats, optional): `{name: (location, scale)}` overriding or extending
                Aurora's table (atmospheric keys as `"z_500"`).

        Returns:
            Batch: The normalised batch.
        """

        def surf(name: str, x: Array) -> Array:
            location, scale = surf_location_scale(name, surf_stats)
            return (x - np.float32(location)) / np.float32(scale)

        def atmos(name: str, x: Array) -> Array:
            location, scale = atmos_location_scale(name, self.metadata.atmos_levels, surf_stats)
            return (x - location) / scale

        return self._map(surf, surf, atmos)

    def unnormalise(self, surf_stats: Stats | None = None) -> Batch:
        """Inverse of :meth:`normalise`."""

        def surf(name: str, x: Array) -> Array:
            location, scale = surf_location_scale(name, surf_stats)
            return x * np.float32(scale) + np.float32(location)

        def atmos(name: str, x: Array) -> Array:
            location, scale = atmos_location_scale(name, self.metadata.atmos_levels, surf_stats)
            return x * scale + location

        return self._map(surf, surf, atmos)

    def crop(self, patch_size: int) -> Batch:
        """Drop the last latitude when `h % patch_size == 1` (721 -> 720), as microsoft-aurora does.

        Args:
            patch_size (int): The model's patch size.

        Returns:
            Batch: The batch with `h` a multiple of `patch_size` (itself if it already was).

        Raises:
            ValueError: If `w` is not a multiple, or `h` more than one row over a multiple.
        """
        h, w = self.spatial_shape
        if w % patch_size != 0:
            raise ValueError(
                f"Width of the data ({w}) must be a multiple of the patch size ({patch_size})."
            )
        if h % patch_size == 0:
            return self
        if h % patch_size != 1:
            raise ValueError(
                "There can at most be one latitude too many, but there are "
                f"{h % patch_size} too many (height {h}, patch size {patch_size})."
            )
        drop_last_row = lambda _, x: x[..., :-1, :]
        metadata = self.metadata.replace(lat=self.metadata.lat[:-1])
        return self._map(drop_last_row, drop_last_row, drop_last_row, metadata)

    def astype(self, dtype: Any) -> Batch:
        """Cast every variable (not the metadata) to `dtype`."""
        cast = lambda _, x: jnp.asarray(x, dtype=dtype)
        return self._map(cast, cast, cast)

    def to_numpy(self) -> Batch:
        """Copy every array to the host as numpy (for writing files or handing to other code)."""
        host = lambda _, x: np.asarray(jax.device_get(x))
        metadata = self.metadata.replace(
            time=np.asarray(jax.device_get(self.metadata.time)),
            rollout_step=int(np.asarray(jax.device_get(self.metadata.rollout_step))),
        )
        return self._map(host, host, host, metadata)

    def regrid(self, res: float) -> Batch:
        """Bilinearly regrid to a global `res`-degree grid (host-side, float64 internally).

        Args:
            res (float): Grid spacing in degrees.

        Returns:
            Batch: numpy float32 fields on `180 / res + 1` latitudes (90 to -90) and `360 / res`
            longitudes (from 0).
        """
        from scipy.interpolate import RegularGridInterpolator

        lat, lon = np.asarray(self.metadata.lat), np.asarray(self.metadata.lon)
        lat_new = np.linspace(90, -90, round(180 / res) + 1)
        lon_new = np.linspace(0, 360, round(360 / res), endpoint=False)
        lon_wrapped = np.concatenate([lon[-1:] - 360, lon, lon[:1] + 360])
        mesh = np.meshgrid(lat_new, lon_new, indexing="ij")

        def interpolate(_: str, x: Array) -> Array:
            x = np.asarray(jax.device_get(x), dtype=np.float64)
            flat = x.reshape(-1, *x.shape[-2:])
            out = []
            for field in flat:
                field = np.concatenate([field[:, -1:], field, field[:, :1]], axis=1)
                rgi = RegularGridInterpolator(
                    (lat[::-1], lon_wrapped), field[::-1], bounds_error=False, fill_value=None
                )
                out.append(rgi(tuple(mesh)))
            return (
                np.stack(out)
                .reshape(*x.shape[:-2], *lat_new.shape, *lon_new.shape)
                .astype(np.float32)
            )

        metadata = self.metadata.replace(lat=tuple(lat_new.tolist()), lon=tuple(lon_new.tolist()))
        return self._map(interpolate, interpolate, interpolate, metadata)

    def to_netcdf(self, path: str | Path) -> None:
        """Write the batch to a netCDF file readable by :meth:`from_netcdf` (and by xarray)."""
        import xarray as xr

        host = self.to_numpy()
        data = {}
        for k, v in host.surf_vars.items():
            data[f"surf_{k}"] = (("batch", "history", "latitude", "longitude"), v)
        for k, v in host.static_vars.items():
            data[f"static_{k}"] = (("latitude", "longitude"), v)
        for k, v in host.atmos_vars.items():
            data[f"atmos_{k}"] = (("batch", "history", "level", "latitude", "longitude"), v)
        ds = xr.Dataset(
            data,
            coords={
                "latitude": np.asarray(host.metadata.lat),
                "longitude": np.asarray(host.metadata.lon),
                "time": ("batch", np.array(host.metadata.datetimes(), dtype="datetime64[ns]")),
                "level": np.asarray(host.metadata.atmos_levels),
                "rollout_step": host.metadata.rollout_step,
            },
        )
        ds.to_netcdf(path, encoding={name: {"zlib": True, "complevel": 4} for name in data})

    @classmethod
    def from_netcdf(cls, path: str | Path) -> Batch:
        """Read a batch written by :meth:`to_netcdf`."""
        import xarray as xr

        ds = xr.load_dataset(path)

        def pick(prefix: str) -> dict[str, np.ndarray]:
            return {
                str(k)[len(prefix) :]: ds[k].values
                for k in ds.data_vars
                if str(k).startswith(prefix)
            }

        return cls(
            surf_vars=pick("surf_"),
            static_vars=pick("static_"),
            atmos_vars=pick("atmos_"),
            metadata=Metadata(
                lat=ds.latitude.values,
                lon=ds.longitude.values,
                time=ds.time.values,
                atmos_levels=tuple(ds.level.values.tolist()),
                rollout_step=int(ds.rollout_step.values),
            ),
        )
