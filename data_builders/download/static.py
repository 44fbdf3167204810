"""Static fields (land-sea mask, surface geopotential, soil type) from the CDS or a zarr store."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from aurora.variables import STATIC_VARS
from data_builders.download.cds import CdsClient, plan_era5_static, run_cds_requests
from data_builders.download.zarr_mirror import download_zarr, resolve_source
from data_builders.errors import DataError

__all__ = ["download_static"]


def download_static(
    out: str | Path,
    *,
    source: str = "cds",
    variables: Sequence[str] = STATIC_VARS,
    grid: Sequence[float] | None = None,
    area: Sequence[float] | None = None,
    date: str | None = None,
    product: str = "reanalysis",
    client: CdsClient | None = None,
    dry_run: bool = False,
    retries: int = 2,
    retry_wait_s: float = 30.0,
    storage_options: Mapping[str, Any] | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """lsm / z / slt into directory `out`: ``era5_static.nc`` from the CDS (``source="cds"``,
    on `grid`/`area`) or ``static.zarr`` from a zarr store (a preset name, URL or path; the
    store's own grid)."""
    out = Path(out)
    if source == "cds":
        req = plan_era5_static(
            out,
            variables=variables,
            date=date or "2018-01-01",
            grid=grid,
            area=area,
            product=product,
        )
        run_cds_requests(
            [req], client, dry_run=dry_run, retries=retries, retry_wait_s=retry_wait_s, echo=echo
        )
        return req.target
    if grid is not None or area is not None:
        raise DataError(
            f"{resolve_source(source)}: --grid/--area apply to the CDS only; a zarr store has its "
            "own grid (pick a store of the resolution you want, or regrid after reading)"
        )
    return download_zarr(
        source,
        out / "static.zarr",
        variables=variables,
        levels=None,
        static=True,
        date=date,
        dry_run=dry_run,
        echo=echo,
        storage_options=storage_options,
    )
