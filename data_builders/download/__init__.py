"""Download ERA5 from the Copernicus CDS and WeatherBench2 / IFS HRES zarr stores, resumably.

Training data is big and its services time out, queue for hours or drop connections. So every
download is planned first (a dry run prints the plan and touches nothing), split into pieces that
can fail alone, and resumable: rerunning a command skips what is complete and redoes what is not.
The files written are what `data_builders.readers.open_dataset` reads. Problems a user can fix
(unknown variable, missing level or time, an incomplete file from the CDS) raise `DataError`.

Parts: `cds` (ERA5 through `cdsapi`), `zarr_mirror` (a subset of a zarr store to a local zarr),
`static` (lsm / z / slt from either), `catalog` (what each source calls each variable), `files`
(the ``.part`` convention) and `cli` (``python -m data_builders.download COMMAND --help``).
"""

from aurora.variables import AURORA_LEVELS
from data_builders.download.catalog import (
    ERA5_LEVELS,
    ERA5_PRESSURE,
    ERA5_SINGLE,
    WB2_STORES,
)
from data_builders.download.cds import (
    CdsClient,
    CdsRequest,
    cds_file_problem,
    download_era5,
    month_spans,
    plan_era5,
    plan_era5_static,
    request_status,
    retrieve,
    run_cds_requests,
)
from data_builders.download.cli import main
from data_builders.download.static import download_static
from data_builders.download.zarr_mirror import (
    ZarrPlan,
    download_zarr,
    open_store,
    plan_zarr,
    resolve_source,
    run_zarr_plan,
)
from data_builders.errors import DataError

__all__ = [
    "AURORA_LEVELS",
    "ERA5_LEVELS",
    "ERA5_PRESSURE",
    "ERA5_SINGLE",
    "WB2_STORES",
    "CdsClient",
    "CdsRequest",
    "DataError",
    "ZarrPlan",
    "cds_file_problem",
    "download_era5",
    "download_static",
    "download_zarr",
    "main",
    "month_spans",
    "open_store",
    "plan_era5",
    "plan_era5_static",
    "plan_zarr",
    "request_status",
    "resolve_source",
    "retrieve",
    "run_cds_requests",
    "run_zarr_plan",
]
