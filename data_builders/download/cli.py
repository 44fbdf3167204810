"""The command line, ``python -m data_builders.download {era5,hres,wb2,static} --help``.

Each command is one call of `download_era5`, `download_zarr` or `download_static`; a `DataError`
(a problem the user can fix) is printed as one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from aurora.variables import ATMOS_VARS, AURORA_LEVELS, STATIC_VARS, SURF_VARS
from data_builders.download.catalog import WB2_STORES
from data_builders.download.cds import CdsClient, download_era5
from data_builders.download.static import download_static
from data_builders.download.zarr_mirror import download_zarr
from data_builders.errors import DataError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_builders.download",
        description="Download ERA5 (CDS), IFS HRES / WeatherBench2 (zarr) and static fields. "
        "Rerunning a command resumes it.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    era5 = sub.add_parser("era5", help="ERA5 from the Copernicus CDS via cdsapi")
    era5.add_argument("--out", required=True, help="output directory")
    era5.add_argument("--start", required=True, help="first date, YYYY-MM-DD")
    era5.add_argument("--end", required=True, help="last date (inclusive), YYYY-MM-DD")
    era5.add_argument(
        "--variables",
        nargs="+",
        default=list(SURF_VARS + ATMOS_VARS),
        help="Aurora names (2t 10u 10v msl z u v t q r w) or CDS long names",
    )
    era5.add_argument("--levels", nargs="+", type=int, default=list(AURORA_LEVELS), help="hPa")
    era5.add_argument("--hours", nargs="+", default=["00", "06", "12", "18"])
    era5.add_argument(
        "--static-variables",
        nargs="*",
        default=list(STATIC_VARS),
        help="static fields for OUT/era5_static.nc (lsm z slt); none to skip",
    )
    _cds_args(era5)

    for name, default, what in (
        ("hres", "hres_t0", "IFS HRES T0"),
        ("wb2", "era5", "WeatherBench2 ERA5"),
    ):
        z = sub.add_parser(name, help=f"{what} (or any zarr store) to a local zarr")
        z.add_argument("--out", required=True, help="output zarr store path")
        z.add_argument(
            "--source",
            default=default,
            help=f"preset ({', '.join(WB2_STORES)}), zarr URL or local path (default {default})",
        )
        z.add_argument("--start", help="first time, e.g. 2020-01-01 or 2020-01-01T06")
        z.add_argument("--end", help="last time, inclusive (a date means the whole day)")
        z.add_argument(
            "--variables",
            nargs="+",
            default=list(SURF_VARS + ATMOS_VARS),
            help="Aurora names or the store's own variable names",
        )
        z.add_argument("--levels", nargs="+", type=float, default=list(AURORA_LEVELS))
        z.add_argument("--all-levels", action="store_true", help="keep every level of the store")
        z.add_argument("--hours", nargs="+", help="keep only these hours of day")
        z.add_argument("--stride", type=int, default=1, help="keep every n-th selected time")
        z.add_argument(
            "--chunk-times",
            type=int,
            default=4,
            help="times fetched and written per block (memory ~ block size)",
        )
        z.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")

    st = sub.add_parser("static", help="static fields lsm / z / slt")
    st.add_argument("--out", required=True, help="output directory")
    st.add_argument(
        "--source",
        default="cds",
        help=f"'cds', or a zarr preset ({', '.join(WB2_STORES)}), URL or path",
    )
    st.add_argument("--variables", nargs="+", default=list(STATIC_VARS))
    st.add_argument("--date", help="time to take the fields at (default 2018-01-01)")
    _cds_args(st)
    return p


def _cds_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--grid",
        nargs="+",
        type=float,
        help="CDS output grid in degrees, e.g. 0.25 or 1.0 1.0 (default: native)",
    )
    p.add_argument(
        "--area",
        nargs=4,
        type=float,
        metavar=("N", "W", "S", "E"),
        help="CDS sub-area (default: global)",
    )
    p.add_argument("--product", default="reanalysis", help="CDS product_type")
    p.add_argument("--retries", type=int, default=2, help="retries per request")
    p.add_argument(
        "--retry-wait",
        type=float,
        default=30.0,
        help="seconds before the first retry (doubles each time)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan, download nothing")


def main(argv: Sequence[str] | None = None, *, client: CdsClient | None = None) -> int:
    """Entry point of ``python -m data_builders.download``.

    Args:
        argv: Command-line arguments; None reads `sys.argv`.
        client: Replaces `cdsapi.Client()` (tests).

    Returns:
        0 on success, 2 on a `DataError` (printed as one line that names the problem).
    """
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "era5":
            download_era5(
                args.out,
                start=args.start,
                end=args.end,
                client=client,
                dry_run=args.dry_run,
                retries=args.retries,
                retry_wait_s=args.retry_wait,
                variables=args.variables,
                levels=args.levels,
                hours=args.hours,
                static_variables=args.static_variables,
                grid=args.grid,
                area=args.area,
                product=args.product,
            )
        elif args.command in ("hres", "wb2"):
            download_zarr(
                args.source,
                args.out,
                dry_run=args.dry_run,
                variables=args.variables,
                levels=None if args.all_levels else args.levels,
                start=args.start,
                end=args.end,
                hours=args.hours,
                stride=args.stride,
                chunk_times=args.chunk_times,
            )
        else:
            download_static(
                args.out,
                source=args.source,
                variables=args.variables,
                grid=args.grid,
                area=args.area,
                date=args.date,
                product=args.product,
                client=client,
                dry_run=args.dry_run,
                retries=args.retries,
                retry_wait_s=args.retry_wait,
            )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
