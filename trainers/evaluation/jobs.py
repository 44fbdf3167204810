"""Whole jobs: ``--mode=test`` (scores, figures, summary) and ``--mode=predict`` (forecast files).

Nothing here depends on the Trainer: a model, its params and a source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from aurora.model.aurora import Aurora
from aurora.rollout import ModelStep
from data_builders.pipeline import WeatherSource
from trainers.evaluation.climatology import Climatology, climatology_kind
from trainers.evaluation.figures import plot_maps, plot_rmse_vs_lead
from trainers.evaluation.forecast_store import ForecastNetcdf, ForecastZarr, Layout
from trainers.evaluation.forecasts import check_members, checked_inits, ensemble_stream
from trainers.evaluation.scoring import evaluate_with_examples, job_uses, level_name, write_scores
from trainers.evaluation.states import (
    WB2_INIT_HOURS,
    SourceStates,
    model_variables,
    scored_variables,
    step_seconds,
)

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
    init_hours: Sequence[int] | None = WB2_INIT_HOURS,
    lead_steps: Sequence[int] | None = None,
    grids: Sequence[str] = (),
    members: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Score, draw figures and write ``scores.csv`` and ``summary.json`` to `out_dir`.

    Figures (under ``figures/``): RMSE (and an ensemble's CRPS) against lead time for every
    variable and level, and prediction/truth maps (an ensemble's mean) of the first scored
    sample at each of `map_lead_steps`.

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
        init_hours: score forecasts from these hours of the day (UTC); None: every init.
        lead_steps: lead steps (from 1) to score; None: every step.
        grids: evaluation grids to score on as well (`trainers.evaluation.wb2.GRIDS`).
        members: ensemble members of a stochastic model; above 1 the scores add CRPS and
            spread/skill (`trainers.evaluation.scoring.ENSEMBLE_COLUMNS`).
        seed: the seed the members' keys are folded from.

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
        init_hours=init_hours,
        lead_steps=lead_steps,
        grids=grids,
        members=members,
        seed=seed,
    )
    paths: list[str] = []
    if figures:
        paths = [
            str(p)
            for p in _figures(
                [r for r in rows if r["grid"] == "model"],
                examples,
                out / "figures",
                map_variables,
                map_levels,
            )
        ]
    info = {
        "data_source": source.name,
        "steps": steps,
        "step_hours": step_hours,
        "grid_deg": float(abs(source.lat[0] - source.lat[1])) if len(source.lat) > 1 else None,
        "climatology": climatology_kind(climatology, source),
        "init_hours_utc": None if init_hours is None else [int(h) for h in init_hours],
        "grids": ["model", *grids],
        "figures": paths,
    }
    if members > 1:
        info.update(members=members, seed=seed)
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
    scores = ("rmse", "crps") if rows and "crps" in rows[0] else ("rmse",)
    for variable, level in dict.fromkeys((r["variable"], r["level"]) for r in rows):
        for score in scores:
            path = out / f"{score}_vs_lead_{level_name(variable, level)}.png"
            paths.append(plot_rmse_vs_lead(rows, variable, level, path, score))
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
    init_hours: Sequence[int] | None = WB2_INIT_HOURS,
    formats: Sequence[str] = ("zarr", "netcdf"),
    states: SourceStates | None = None,
    inits: Sequence[int] | None = None,
    members: int = 1,
    seed: int = 0,
) -> dict[str, Path]:
    """Forecast from the source's init times, writing each lead as it is made.

    Writes ``forecast.zarr`` (WB2's forecast layout, `ForecastZarr`) and ``forecast.nc`` (CF
    netCDF, `ForecastNetcdf`). Both are appendable and resumable: inits already in every file
    are skipped, so re-running after an interruption, or with more init times, continues. Host
    memory holds one lead of one batch of inits (and the input states of the batches ahead
    that share them).

    Args:
        model: the model, or a `ModelStep` of it to reuse its compiled step.
        params: the model's parameters.
        source: the states to start from.
        steps: rollout steps per init.
        out_dir: the output folder.
        provenance: what produced the model (preset, checkpoint, ...), written as attributes.
        step_hours: the model's time step in hours.
        batch_size: inits per rollout batch.
        init_hours: forecast from inits at these hours of the day (UTC); None: every init.
        formats: ``"zarr"`` and/or ``"netcdf"``.
        states: the states reader (None: one that reads each input state once).
        inits: the init times (int seconds), in place of every init at `init_hours`.
        members: ensemble members (a stochastic model; `forecasts.ensemble_stream`): above 1
            both files get WB2's leading ``realization`` dimension.
        seed: the seed the members' keys are folded from (`forecasts.member_key`).

    Returns:
        ``{format: path}`` of the files written.
    """
    unknown = set(formats) - {"zarr", "netcdf"}
    if unknown or not formats:
        raise ValueError(f"formats must be 'zarr' and/or 'netcdf', not {list(formats)}")
    step_fn = model if isinstance(model, ModelStep) else ModelStep(model)
    check_members(step_fn.model, members)
    surf, atmos, _ = model_variables(step_fn.model, source)
    if inits is None:
        inits = checked_inits(step_fn, source, step_hours, init_hours)
    inits = np.asarray(inits, np.int64)
    step = step_seconds(step_hours)
    rows = len(source.lat) // step_fn.patch_size * step_fn.patch_size
    layout = Layout(
        scored_variables(step_fn.model, surf),  # what a prediction holds, not inputs only
        atmos,
        np.arange(1, steps + 1) * step // 60,
        source.levels,
        source.lat[:rows],
        source.lon,
        members,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"data_source": source.name, "steps": steps, "step_hours": step_hours}
    if members > 1:
        info.update(members=members, seed=seed)
    prov = {**info, **dict(provenance or {})}
    paths = {"zarr": out / "forecast.zarr", "netcdf": out / "forecast.nc"}
    whole_hours = bool(np.all(inits % 3600 == 0) and step % 3600 == 0)
    writers: dict[str, Any] = {}
    try:
        for fmt in formats:
            writers[fmt] = (
                ForecastZarr(paths[fmt], layout, prov)
                if fmt == "zarr"
                else ForecastNetcdf(paths[fmt], layout, prov, whole_hours)
            )
        done = set.intersection(*(w.written() for w in writers.values()))
        todo = np.array([t for t in inits.tolist() if t not in done], np.int64)
        if states is None:
            uses = job_uses(source, todo, step, [])
            states = SourceStates(source, surf, atmos, uses)
        stream = ensemble_stream(
            step_fn,
            params,
            source,
            todo,
            states,
            steps=steps,
            members=members,
            seed=seed,
            batch_size=batch_size,
        )
        for now, _, leads in stream:
            for writer in writers.values():
                writer.begin(now)
            for k, lead in enumerate(leads):
                for m, pred in enumerate(lead):
                    host = pred.replace(static_vars={}).to_numpy()
                    for writer in writers.values():
                        writer.write(k, host, member=m if members > 1 else None)
            for writer in writers.values():
                writer.end()
    finally:
        for writer in writers.values():
            writer.close()
    return {fmt: paths[fmt] for fmt in formats}
