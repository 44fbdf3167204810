"""Evaluation figures: prediction/truth/difference maps and RMSE against lead time.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, so no global backend or figure
state: safe in tests, threads and headless jobs). Maps are plain latitude/longitude plots, north
up, longitudes shown from -180 to 180 so regional grids across the Greenwich meridian stay in
one piece; no coastlines (that would need cartopy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from aurora.batch import Batch
from trainers.evaluation.forecast_io import variable_attrs

__all__ = ["plot_maps", "plot_rmse_vs_lead"]


def _label(variable: str, level: float | None) -> str:
    name = variable_attrs(variable)["long_name"]
    return (
        f"{name} ({variable})" if level is None else f"{name} ({variable}) at {float(level):g} hPa"
    )


def _units(variable: str) -> str:
    units = variable_attrs(variable).get("units")
    return f" [{units}]" if units else ""


def _field(batch: Batch, variable: str, level: float | None) -> np.ndarray:
    """The newest state of batch row 0 as a (lat, lon) float64 array."""
    if level is None:
        if variable not in batch.surf_vars:
            raise KeyError(
                f"No surface variable {variable!r} (have {sorted(batch.surf_vars)}); pass a level?"
            )
        return np.asarray(batch.surf_vars[variable], np.float64)[0, -1]
    if variable not in batch.atmos_vars:
        raise KeyError(f"No atmospheric variable {variable!r} (have {sorted(batch.atmos_vars)})")
    levels = [float(x) for x in batch.metadata.atmos_levels]
    if float(level) not in levels:
        raise KeyError(f"No level {level:g} hPa (have {levels})")
    return np.asarray(batch.atmos_vars[variable], np.float64)[0, -1, levels.index(float(level))]


def _display_lon(lon: Sequence[float]) -> np.ndarray:
    """Order of the columns that puts longitudes in [-180, 180) ascending."""
    return np.argsort(((np.asarray(lon, np.float64) + 180) % 360) - 180, kind="stable")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_maps(
    pred: Batch, truth: Batch, variable: str, level: float | None, lead_h: float, path: str | Path
) -> Path:
    """Prediction | truth | prediction − truth for batch row 0 on the prediction's grid.

    Prediction and truth share one colour scale; the difference has its own, symmetric about
    zero. The newest history step of each is drawn.

    Args:
        pred: the prediction, variables of shape `(b, t, h, w)` / `(b, t, c, h, w)`.
        truth: the truth on the same grid.
        variable: the variable to draw.
        level: its pressure level in hPa; None for a surface variable.
        lead_h: the lead time in hours (for the title).
        path: where to write the PNG.

    Returns:
        `path`.

    Raises:
        KeyError: the variable or level is not in the batches.
        ValueError: prediction and truth are on different grids.
    """
    p, t = _field(pred, variable, level), _field(truth, variable, level)
    if p.shape != t.shape:
        raise ValueError(f"Prediction grid {p.shape} != truth grid {t.shape}")
    lat = np.asarray(pred.metadata.lat, np.float64)
    order = _display_lon(pred.metadata.lon)
    lon = ((np.asarray(pred.metadata.lon, np.float64)[order] + 180) % 360) - 180
    p, t = p[:, order], t[:, order]
    diff = p - t
    lo, hi = float(min(p.min(), t.min())), float(max(p.max(), t.max()))
    span = float(np.abs(diff).max()) or 1.0
    valid = _valid_time(pred)
    fig = Figure(figsize=(16, 4.6), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    panels = [
        ("Prediction", p, "viridis", lo, hi),
        ("Truth", t, "viridis", lo, hi),
        ("Prediction − truth", diff, "RdBu_r", -span, span),
    ]
    for ax, (title, x, cmap, vmin, vmax) in zip(axes, panels):
        mesh = ax.pcolormesh(lon, lat, x, cmap=cmap, vmin=vmin, vmax=vmax, shading="nearest")
        fig.colorbar(mesh, ax=ax, shrink=0.9, label=f"{variable}{_units(variable)}")
        ax.set_title(title)
        ax.set_xlabel("longitude [°E]")
        ax.set_aspect("equal")
    axes[0].set_ylabel("latitude [°N]")
    fig.suptitle(
        f"{_label(variable, level)}, lead {lead_h:g} h" + (f", valid {valid}" if valid else "")
    )
    return _save(fig, path)


def _valid_time(batch: Batch) -> str:
    try:
        t: datetime = batch.metadata.datetimes()[0]
    except Exception:
        return ""
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _same_level(a: Any, b: float | None) -> bool:
    if a is None or a == "":
        return b is None or b == ""
    return b is not None and b != "" and float(a) == float(b)


def plot_rmse_vs_lead(
    rows: Sequence[Mapping[str, Any]],
    variable: str,
    level: float | None,
    path: str | Path,
    metric: str = "rmse",
) -> Path:
    """RMSE (or another score) against lead time for one variable (and level), one line per
    model in `rows`.

    Args:
        rows: score rows (`trainers.evaluation.COLUMNS`), baselines included.
        variable: the variable to draw.
        level: its pressure level in hPa; None for a surface variable.
        path: where to write the PNG.
        metric: the score drawn, a column of the rows in the variable's units (e.g. an
            ensemble's ``crps``).

    Returns:
        `path`.

    Raises:
        ValueError: no row has the variable at the level.
    """
    mine = [r for r in rows if r["variable"] == variable and _same_level(r.get("level"), level)]
    if not mine:
        raise ValueError(f"No rows for {variable} at level {level}")
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    styles = {"persistence": ("tab:gray", "--", "s"), "climatology": ("tab:olive", ":", "^")}
    for model in dict.fromkeys(str(r["model"]) for r in mine):
        pts = sorted(
            (float(r["lead_time_h"]), float(r[metric])) for r in mine if r["model"] == model
        )
        color, style, marker = styles.get(model, (None, "-", "o"))
        ax.plot(
            [x for x, _ in pts],
            [y for _, y in pts],
            linestyle=style,
            marker=marker,
            color=color,
            label=model,
        )
    leads = sorted({float(r["lead_time_h"]) for r in mine})
    if len(leads) <= 20:
        ax.set_xticks(leads)
    ax.set_xlabel("lead time [h]")
    ax.set_ylabel(f"{metric.upper()}{_units(variable)}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(_label(variable, level))
    return _save(fig, path)
