"""Stream training data straight from a zarr store (WeatherBench2, ARCO-ERA5, any URL).

``ZarrBuilder(url or preset=..., ...)`` has the builder protocol the training pipeline uses
(`download_and_prepare`, `as_data_source(split)`, `splits`, `stats`); records are read per valid
time, all variables concurrently, with the next records read ahead. See `builder.ZarrBuilder`.
Importing this package registers it as ``zarr`` (`data_builders.registry`).

* `store`: opening a store through fsspec, retries with backoff, missing chunks refused.
* `records`: reading one time (concurrently, NaNs refused or filled, regridded) and the
  read-ahead; picklable for Grain's worker processes, which reopen the store.
* `builder`: presets, variables, levels, splits, forecast stores, static fields, statistics.
"""

from data_builders.registry import register_builder
from data_builders.zarr_source.builder import ARCO_ERA5_URL, PRESETS, Preset, ZarrBuilder
from data_builders.zarr_source.store import CheckedStore, MissingChunkError, open_store

__all__ = [
    "ARCO_ERA5_URL",
    "PRESETS",
    "CheckedStore",
    "MissingChunkError",
    "Preset",
    "ZarrBuilder",
    "open_store",
]

register_builder("zarr", ZarrBuilder)
