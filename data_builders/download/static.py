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
    """Static fields into directory `out`, from the CDS or from a zarr store.

    Args:
        out: Output directory.
        source: ``"cds"`` (writes ``era5_static.nc`` on `grid` / `area`), or a zarr preset name,
            URL or path (writes ``static.zarr`` on the store's own grid).
        variables: Static fields (``lsm``, ``z``, ``slt``).
        grid: CDS output grid in degrees; None: native. Not for zarr stores.
        area: CDS sub-area ``[N, W, S, E]``; None: global. Not for zarr stores.
        date: The time to take the fields at; None: 2018-01-01 (CDS) or the first (zarr).
        product: CDS ``product_type``.
        client: The CDS client; None: `cdsapi.Client()` when needed.
        dry_run: Print the plan instead of downloading.
        retries: CDS retries.
        retry_wait_s: Seconds before the first CDS retry.
        storage_options: fsspec options for zarr URLs.
        echo: Where dry-run lines go.

    Returns:
        The file or store written.

    Raises:
        DataError: For unknown variables, or `grid` / `area` with a zarr store.
    """
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
