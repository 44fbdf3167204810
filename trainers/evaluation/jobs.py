"""Whole jobs: ``--mode=test`` (scores, figures, summary) and ``--mode=predict`` (forecast file).

Nothing here depends on the Trainer: a model, its params and a source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from aurora.rollout import ModelStep
from data_builders.pipeline import WeatherSource
from trainers.evaluation.climatology import Climatology, climatology_kind
from trainers.evaluation.figures import plot_maps, plot_rmse_vs_lead
from trainers.evaluation.forecast_io import write_forecast
from trainers.evaluation.forecasts import forecasts
from trainers.evaluation.scoring import evaluate_with_examples, level_name, write_scores

__all__ = ["predict", "run_evaluation"]


def run_evaluation(
    model: Aurora | ModelStep,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    out_dir: str | Path,
    provenance: Mapping[str, Any] | None = None,
    step_hours: float = 6,
    climatology: Climatology = None,
    batch_size: int = 1,
    figures: bool = True,
    map_variables: Sequence[str] = (),
    map_levels: Sequence[float] = (500,),
    map_lead_steps: Sequence[int] = (1,),
) -> dict[str, Any]:
    """Score, draw figures and write ``scores.csv`` and ``summary.json`` to `out_dir`.

    Figures (under ``figures/``): RMSE against lead time for every variable and level, and
    prediction/truth maps of the first scored sample at each of `map_lead_steps`.

    Args:
        model: the model, or a `ModelStep` of it to reuse its compiled step.
        params: the model's parameters.
        source: the states to start from and score against.
        steps: rollout steps per init.
        out_dir: the output folder.
        provenance: what produced the model (preset, checkpoint, ...), copied to the summary.
        step_hours: the model's time step in hours.
        climatology: the climatology (None: the source's mean).
        batch_size: inits per rollout batch.
        figures: whether to draw figures.
        map_variables: variables to map (empty: all).
        map_levels: pressure levels to map atmospheric variables at (the first level when none
            of them exists).
        map_lead_steps: lead steps (from 1) to map.

    Returns:
        The summary written to ``summary.json``.
    """
    out = Path(out_dir)
    rows, examples = evaluate_with_examples(
        model,
        params,
        source,
        steps=steps,
        step_hours=step_hours,
        climatology=climatology,
        batch_size=batch_size,
        name="aurora",
        map_lead_steps=tuple(map_lead_steps),
    )
    paths: list[str] = []
    if figures:
        paths = [
            str(p) for p in _figures(rows, examples, out / "figures", map_variables, map_levels)
        ]
    info = {
        "data_source": source.name,
        "steps": steps,
        "step_hours": step_hours,
        "climatology": climatology_kind(climatology, source),
        "figures": paths,
    }
    written = write_scores(rows, out, {**info, **dict(provenance or {})})
    return json.loads(written["summary"].read_text())


def _figures(
    rows: list[dict[str, Any]],
    examples: list[dict[str, Any]],
    out: Path,
    variables: Sequence[str] = (),
    levels: Sequence[float] = (500,),
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for variable, level in dict.fromkeys((r["variable"], r["level"]) for r in rows):
        path = out / f"rmse_vs_lead_{level_name(variable, level)}.png"
        paths.append(plot_rmse_vs_lead(rows, variable, level, path))
    for example in examples:
        pred, truth, lead_h = example["pred"], example["truth"], example["lead_h"]
        available = pred.metadata.atmos_levels
        chosen = [float(x) for x in levels if float(x) in available] or list(available[:1])
        for variable in [*pred.surf_vars, *pred.atmos_vars]:
            if variables and variable not in variables:
                continue
            for lev in chosen if variable in pred.atmos_vars else [None]:
                path = out / f"map_{level_name(variable, lev)}_{lead_h:g}h.png"
                paths.append(plot_maps(pred, truth, variable, lev, lead_h, path))
    return paths


def predict(
    model: Aurora | ModelStep,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    out_dir: str | Path,
    provenance: Mapping[str, Any] | None = None,
    step_hours: float = 6,
    batch_size: int = 1,
) -> Path:
    """Forecast from every init time of the source and write ``forecast.nc``.

    The file is CF netCDF in WB2's layout (`trainers.evaluation.forecast_io`). All forecasts
    are held in host memory until written.

    Args:
        model: the model, or a `ModelStep` of it to reuse its compiled step.
        params: the model's parameters.
        source: the states to start from.
        steps: rollout steps per init.
        out_dir: the output folder.
        provenance: what produced the model (preset, checkpoint, ...), written as attributes.
        step_hours: the model's time step in hours.
        batch_size: inits per rollout batch.

    Returns:
        The path of ``forecast.nc``.
    """
    inits, per_lead = [], [[] for _ in range(steps)]
    for now, _, preds in forecasts(
        model, params, source, steps=steps, step_hours=step_hours, batch_size=batch_size
    ):
        inits.append(now)
        for k, pred in enumerate(preds):
            per_lead[k].append(pred.replace(static_vars={}).to_numpy())
    init = np.concatenate(inits).astype("datetime64[s]")
    predictions = [_concat(batches) for batches in per_lead]
    path = Path(out_dir) / "forecast.nc"
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"data_source": source.name, "steps": steps, "step_hours": step_hours}
    write_forecast(path, init, predictions, {**info, **dict(provenance or {})})
    return path


def _concat(batches: list[Batch]) -> Batch:
    """Join host batches along the batch axis."""
    first = batches[0]
    join = lambda group, k: np.concatenate([getattr(b, group)[k] for b in batches])
    time = np.concatenate([np.asarray(b.metadata.time) for b in batches])
    return Batch(
        surf_vars={k: join("surf_vars", k) for k in first.surf_vars},
        static_vars={},
        atmos_vars={k: join("atmos_vars", k) for k in first.atmos_vars},
        metadata=first.metadata.replace(time=time),
    )
