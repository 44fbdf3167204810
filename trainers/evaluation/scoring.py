"""Score a model's rollouts against a source's own states, next to persistence and climatology.

Each forecast from init ``now`` is scored at lead ``k`` against the source's state at the valid
time ``now + k * step`` wherever that state exists (rows count their samples in ``n``; a lead
no init can be scored at has no rows). Persistence (the state at ``now`` held fixed) and the
climatology (`trainers.evaluation.climatology`) are scored at the same valid times, all on the
model's grid. Scores follow WB2 (`trainers.evaluation.metrics`); the climatology forecast has no
anomaly, so its ACC is NaN, as in WB2.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import numpy as np

from aurora.batch import Batch
from aurora.jsonable import jsonable
from aurora.model.aurora import Aurora
from aurora.rollout import ModelStep
from data_builders.pipeline import WeatherSource
from trainers.evaluation.climatology import Climatology, climatology_batch, source_mean
from trainers.evaluation.forecasts import forecasts
from trainers.evaluation.metrics import ScoreTotals, score_batch
from trainers.evaluation.states import SourceStates, model_variables, step_seconds

__all__ = ["COLUMNS", "evaluate", "evaluate_with_examples", "level_name", "write_scores"]

log = logging.getLogger(__name__)

COLUMNS = ("model", "variable", "level", "lead_time_h", "rmse", "mae", "bias", "acc", "n")
"""Columns of every score row and of ``scores.csv``."""


def evaluate(
    model: Aurora | ModelStep,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    step_hours: float = 6,
    climatology: Climatology = None,
    batch_size: int = 1,
    name: str = "aurora",
) -> list[dict[str, Any]]:
    """Score rows for the model, persistence and climatology (see the module docstring).

    Args:
        model: the model, or a `ModelStep` of it to reuse its compiled step.
        params: the model's parameters.
        source: the states to start from and score against.
        steps: rollout steps per init.
        step_hours: the model's time step in hours.
        climatology: the climatology (None: the source's mean, `source_mean`).
        batch_size: inits per rollout batch.
        name: the model's name in the rows.

    Returns:
        One row (`COLUMNS`) per model, variable, level (None for surface variables) and lead
        time in hours.
    """
    rows, _ = evaluate_with_examples(
        model,
        params,
        source,
        steps=steps,
        step_hours=step_hours,
        climatology=climatology,
        batch_size=batch_size,
        name=name,
    )
    return rows


def evaluate_with_examples(
    model: Aurora | ModelStep,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    step_hours: float,
    climatology: Climatology,
    batch_size: int,
    name: str,
    map_lead_steps: Sequence[int] = (1,),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`evaluate`, plus the first scored prediction and truth at each of `map_lead_steps`.

    Args:
        model, params, source, steps, step_hours, climatology, batch_size, name: as `evaluate`.
        map_lead_steps: the lead steps (from 1) to keep an example of, for map figures.

    Returns:
        `evaluate`'s rows, and per lead step that has a scored sample (ascending)
        ``{"pred", "truth", "lead_h"}``: one-row host `Batch`es on the model's grid and the lead
        in hours.
    """
    step = step_seconds(step_hours)
    clim = source_mean(source) if climatology is None else climatology
    step_fn = model if isinstance(model, ModelStep) else ModelStep(model)
    surf, atmos, _ = model_variables(step_fn.model, source)
    states = SourceStates(source, surf, atmos)
    score = _SCORE
    totals = {
        (m, k): ScoreTotals(source.levels)
        for m in (name, "persistence", "climatology")
        for k in range(1, steps + 1)
    }
    examples: dict[int, dict[str, Any]] = {}
    for now, inputs, preds in forecasts(
        step_fn, params, source, steps=steps, step_hours=step_hours, batch_size=batch_size
    ):
        rows = preds[0].spatial_shape[0]
        persistence = _last_state(inputs, rows)
        for k, pred in enumerate(preds, start=1):
            valid = now + k * step
            mask = np.array([states.has(t) for t in valid], np.float32)
            if not mask.any():
                continue
            s, a = states.stack(valid[:, None], rows)
            metadata = persistence.metadata.replace(time=(valid // 60).astype(np.int32))
            truth = Batch(surf_vars=s, static_vars={}, atmos_vars=a, metadata=metadata)
            climate = climatology_batch(clim, valid, truth)
            forecast = pred.replace(static_vars={})
            totals[(name, k)].add(score(forecast, truth, climate, mask))
            totals[("persistence", k)].add(score(persistence, truth, climate, mask))
            totals[("climatology", k)].add(score(climate, truth, climate, mask))
            if k in map_lead_steps and k not in examples:
                i = int(np.flatnonzero(mask)[0])
                examples[k] = {
                    "pred": _row(forecast, i),
                    "truth": _row(truth, i),
                    "lead_h": k * step / 3600,
                }
    out = []
    for (model_name, k), total in totals.items():
        for row in total.rows():
            out.append(
                {
                    "model": model_name,
                    "variable": row["variable"],
                    "level": row["level"],
                    "lead_time_h": k * step / 3600,
                    **{c: row[c] for c in COLUMNS[4:]},
                }
            )
    if not out:
        log.warning(
            "%s: no valid time of any forecast is in the source; nothing scored", source.name
        )
    return out, [examples[k] for k in sorted(examples)]


_SCORE = jax.jit(score_batch)  # a pure function, compiled once per batch layout, not per call


def _last_state(inputs: Batch, rows: int) -> Batch:
    """The persistence forecast: the newest input state on the first `rows` latitudes."""
    cut = lambda x: np.asarray(x)[:, -1:, ..., :rows, :]
    return Batch(
        surf_vars={k: cut(v) for k, v in inputs.surf_vars.items()},
        static_vars={},
        atmos_vars={k: cut(v) for k, v in inputs.atmos_vars.items()},
        metadata=inputs.metadata.replace(lat=inputs.metadata.lat[:rows]),
    )


def _row(batch: Batch, i: int) -> Batch:
    """Batch row `i` on the host (for figures)."""
    take = lambda x: np.asarray(jax.device_get(x))[i : i + 1]
    return Batch(
        surf_vars={k: take(v) for k, v in batch.surf_vars.items()},
        static_vars={},
        atmos_vars={k: take(v) for k, v in batch.atmos_vars.items()},
        metadata=batch.metadata.replace(
            time=np.asarray(jax.device_get(batch.metadata.time))[i : i + 1]
        ),
    )


def write_scores(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, provenance: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``scores.csv`` and ``summary.json`` to `out_dir`.

    Args:
        rows: score rows (`COLUMNS`); the CSV leaves the level of surface variables empty.
        out_dir: the folder, created if missing.
        provenance: what produced the scores (e.g. model preset, checkpoint step, data source,
            steps, climatology kind, figure paths); the summary adds what the CSV holds.

    Returns:
        ``{"scores": csv path, "summary": json path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, summary_path = out / "scores.csv", out / "summary.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for row in rows:
            writer.writerow([_csv_value(c, row.get(c)) for c in COLUMNS])
    summary = {
        **{k: jsonable(v) for k, v in provenance.items()},
        "scores": str(csv_path),
        "rows": len(rows),
        "models": sorted({str(r["model"]) for r in rows}),
        "variables": sorted({level_name(r["variable"], r.get("level")) for r in rows}),
        "lead_times_h": sorted({float(r["lead_time_h"]) for r in rows}),
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    summary_path.write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return {"scores": csv_path, "summary": summary_path}


def _csv_value(column: str, value: Any) -> str:
    if value is None:
        return ""
    if column == "level" or column == "lead_time_h":
        return f"{float(value):g}"
    if isinstance(value, float):
        return repr(value)  # round-trips exactly; nan for undefined scores
    return str(value)


def level_name(variable: str, level: float | None) -> str:
    """The variable's name with its level, as in file names and the summary.

    Args:
        variable: the variable's short name.
        level: its pressure level in hPa; None (or "", as read from CSV) for a surface one.

    Returns:
        e.g. ``z500``; just the name for a surface variable.
    """
    return variable if level is None or level == "" else f"{variable}{float(level):g}"
