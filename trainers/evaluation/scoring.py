"""Score a model's rollouts against a source's own states, next to persistence and climatology.

WeatherBench2's protocol: forecasts from the inits at 00 and 12 UTC (`init_hours`), each scored
at lead ``k`` against the source's state at the valid time ``now + k * step`` wherever that
state exists (rows count their samples in ``n``; a lead no init can be scored at has no rows).
Persistence (the state at ``now`` held fixed) and the climatology
(`trainers.evaluation.climatology`) are scored at the same valid times, on the model's grid and
on each named evaluation grid, to which forecast, truth, persistence and climatology are all
regridded the same way (`trainers.evaluation.wb2.regrid_batch`). Scores follow WB2
(`trainers.evaluation.metrics`); the climatology forecast has no anomaly, so its ACC is NaN, as
in WB2.

An ensemble (`members > 1`, a stochastic model) is scored as WB2 scores one: RMSE, MAE, bias
and ACC of the ensemble mean, plus CRPS and spread/skill of the members
(`trainers.evaluation.ensemble_metrics`, columns `ENSEMBLE_COLUMNS`); persistence and the
climatology are one-member ensembles there (CRPS = MAE, spread 0).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
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
from trainers.evaluation.ensemble_metrics import (
    ENSEMBLE_METRICS,
    EnsembleTotals,
    score_ensemble,
)
from trainers.evaluation.forecasts import check_members, checked_inits, ensemble_stream
from trainers.evaluation.metrics import ScoreTotals, score_batch
from trainers.evaluation.states import (
    WB2_INIT_HOURS,
    SourceStates,
    model_variables,
    scored_variables,
    step_seconds,
)
from trainers.evaluation.wb2 import evaluation_grid, regrid_batch

__all__ = [
    "COLUMNS",
    "ENSEMBLE_COLUMNS",
    "evaluate",
    "evaluate_with_examples",
    "level_name",
    "write_scores",
]

log = logging.getLogger(__name__)

METRIC_COLUMNS = ("rmse", "mae", "bias", "acc", "n")
COLUMNS = ("model", "grid", "variable", "level", "lead_time_h", *METRIC_COLUMNS)
"""Columns of every score row and of ``scores.csv``: ``grid`` is ``model`` (the model's own
grid) or an evaluation grid's name."""
ENSEMBLE_COLUMNS = (*COLUMNS[:-1], *ENSEMBLE_METRICS, "n")
"""The columns of an ensemble's rows and ``scores.csv``: `COLUMNS` with CRPS and spread/skill."""


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
    init_hours: Sequence[int] | None = WB2_INIT_HOURS,
    lead_steps: Sequence[int] | None = None,
    grids: Sequence[str] = (),
    inits: Sequence[int] | None = None,
    members: int = 1,
    seed: int = 0,
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
        init_hours: score forecasts from these hours of the day (UTC); None: every init.
        lead_steps: score these lead steps (from 1, at most `steps`); None: every step.
        grids: evaluation grids (`trainers.evaluation.wb2.GRIDS` names) to score on as well.
        inits: the init times to forecast from (int seconds; each with its history in the
            source), in place of every init at `init_hours`.
        members: ensemble members of a stochastic model (`forecasts.ensemble_stream`); above 1
            the rows have `ENSEMBLE_COLUMNS`.
        seed: the seed the members' keys are folded from.

    Returns:
        One row (`COLUMNS`) per model, grid, variable, level (None for surface variables) and
        lead time in hours.
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
        init_hours=init_hours,
        lead_steps=lead_steps,
        grids=grids,
        inits=inits,
        members=members,
        seed=seed,
    )
    return rows


class _Shared:
    """Values by key, made on first use and dropped after the last of the counted uses."""

    def __init__(self, uses: Counter[int]) -> None:
        self.pending, self.kept = Counter(uses), {}

    def get(self, key: int, make: Any, n: int = 1) -> Any:
        value = self.kept[key] if key in self.kept else make()
        self.pending[key] -= n
        if self.pending[key] > 0:
            self.kept[key] = value
        else:
            self.kept.pop(key, None)
        return value


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
    init_hours: Sequence[int] | None = WB2_INIT_HOURS,
    lead_steps: Sequence[int] | None = None,
    grids: Sequence[str] = (),
    inits: Sequence[int] | None = None,
    states: SourceStates | None = None,
    members: int = 1,
    seed: int = 0,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`evaluate`, plus the first scored prediction and truth at each of `map_lead_steps`.

    Each state is read once (a `SourceStates` with the job's uses): the inputs of a forecast
    and the truth at every valid time are shared by all forecasts that need them and dropped
    after the last, so memory holds the states of one rollout's span, whatever the number of
    inits. So is the climatology at each valid time.

    Args:
        model, params, source, steps, step_hours, climatology, batch_size, name, init_hours,
        lead_steps, grids, inits, members, seed: as `evaluate`.
        map_lead_steps: the lead steps (from 1) to keep an example of, for map figures.
        states: the states reader to use (None: one with this job's uses); pass one to count
            its reads.

    Returns:
        `evaluate`'s rows, and per lead step that has a scored sample (ascending)
        ``{"pred", "truth", "lead_h"}``: one-row host `Batch`es on the model's grid (an
        ensemble's mean) and the lead in hours.
    """
    step = step_seconds(step_hours)
    clim = source_mean(source) if climatology is None else climatology
    step_fn = model if isinstance(model, ModelStep) else ModelStep(model)
    check_members(step_fn.model, members)
    surf, atmos, _ = model_variables(step_fn.model, source)
    scored_surf = scored_variables(step_fn.model, surf)
    if inits is None:
        inits = checked_inits(step_fn, source, step_hours, init_hours)
    inits = np.asarray(inits, np.int64)
    scored = sorted({int(k) for k in lead_steps}) if lead_steps else list(range(1, steps + 1))
    if scored[0] < 1 or scored[-1] > steps:
        raise ValueError(f"lead_steps {scored} must lie in 1..{steps}")
    if states is None:
        states = SourceStates(source, surf, atmos, job_uses(source, inits, step, scored))
    valid_uses = Counter(
        int(t) for t in (inits[:, None] + np.asarray(scored) * step).ravel() if states.has(t)
    )
    shared_clim = _Shared(valid_uses)
    grid_names = ["model", *grids]
    totals: dict[tuple[str, str, int], ScoreTotals] = {}
    ensemble_totals: dict[tuple[str, str, int], EnsembleTotals] = {}
    examples: dict[int, dict[str, Any]] = {}
    targets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for now, inputs, leads in ensemble_stream(
        step_fn,
        params,
        source,
        inits,
        states,
        steps=steps,
        members=members,
        seed=seed,
        batch_size=batch_size,
    ):
        persistence: Batch | None = None
        for k, lead in enumerate(leads, start=1):
            if k not in scored:
                continue
            pred = lead[0] if members == 1 else _ensemble_mean(lead)
            valid = now + k * step
            present = [int(t) for t in valid if states.has(t)]
            if not present:
                continue
            rows = pred.spatial_shape[0]
            if persistence is None:
                persistence = _last_state(inputs, rows)
            mask = np.array([states.has(t) for t in valid], np.float32)
            s, a = states.stack(valid[:, None], rows)
            s = {v: s[v] for v in scored_surf}
            metadata = persistence.metadata.replace(time=(valid // 60).astype(np.int32))
            truth = Batch(surf_vars=s, static_vars={}, atmos_vars=a, metadata=metadata)
            fields = {
                t: shared_clim.get(t, lambda t=t: _at(clim, t), n)
                for t, n in Counter(present).items()
            }
            fill = fields[present[0]]  # rows without a truth are masked out of the scores
            climate = climatology_batch(
                lambda t, fields=fields, fill=fill: fields.get(int(t), fill), valid, truth
            )
            forecast = pred.replace(static_vars={})
            ensemble = [m.replace(static_vars={}) for m in lead] if members > 1 else []
            for grid in grid_names:
                batches = [forecast, persistence, climate, truth, *ensemble]
                if grid != "model":
                    if grid not in targets:
                        targets[grid] = evaluation_grid(grid, np.asarray(metadata.lat))
                    batches = [regrid_batch(b, *targets[grid]) for b in batches]
                f, p, c, o, *e = batches
                for model_name, x, xs in (
                    (name, f, e),
                    ("persistence", p, [p]),
                    ("climatology", c, [c]),
                ):
                    total = totals.setdefault((model_name, grid, k), ScoreTotals(source.levels))
                    total.add(_SCORE(x, o, c, mask))
                    if members > 1:
                        key = (model_name, grid, k)
                        spread = ensemble_totals.setdefault(key, EnsembleTotals(source.levels))
                        spread.add(_ENSEMBLE_SCORE(xs, o, mask))
            if k in map_lead_steps and k not in examples:
                i = int(np.flatnonzero(mask)[0])
                examples[k] = {
                    "pred": _row(forecast, i),
                    "truth": _row(truth, i),
                    "lead_h": k * step / 3600,
                }
    out = []
    order = {m: i for i, m in enumerate((name, "persistence", "climatology"))}
    for (model_name, grid, k), total in sorted(
        totals.items(), key=lambda kv: (order[kv[0][0]], grid_names.index(kv[0][1]), kv[0][2])
    ):
        extra = ensemble_totals.get((model_name, grid, k))
        extra_rows = extra.rows() if extra is not None else [{}] * len(total.rows())
        for row, ens in zip(total.rows(), extra_rows, strict=True):
            out.append(
                {
                    "model": model_name,
                    "grid": grid,
                    "variable": row["variable"],
                    "level": row["level"],
                    "lead_time_h": k * step / 3600,
                    **{c: row[c] for c in METRIC_COLUMNS[:-1]},
                    **{c: ens[c] for c in ENSEMBLE_METRICS if c in ens},
                    "n": row["n"],
                }
            )
    if not out:
        log.warning(
            "%s: no valid time of any forecast is in the source; nothing scored", source.name
        )
    return out, [examples[k] for k in sorted(examples)]


def job_uses(
    source: WeatherSource, inits: np.ndarray, step: int, lead_steps: Sequence[int]
) -> Counter[int]:
    """How often a scoring job asks for each state: two inputs per init, a truth per lead.

    Args:
        source: the states.
        inits: init times, int seconds.
        step: the model's step in seconds.
        lead_steps: the lead steps scored.

    Returns:
        int seconds -> uses, for the times the source has.
    """
    have = set(source.times.tolist())
    uses: Counter[int] = Counter()
    for now in np.asarray(inits, np.int64).tolist():
        uses[now - step] += 1
        uses[now] += 1
        for k in lead_steps:
            if now + k * step in have:
                uses[now + k * step] += 1
    return uses


def _at(clim: Climatology, t: int) -> Any:
    return clim(t) if callable(clim) else clim


_SCORE = jax.jit(score_batch)  # a pure function, compiled once per batch layout, not per call
_ENSEMBLE_SCORE = jax.jit(score_ensemble)


def _ensemble_mean(members: Sequence[Batch]) -> Batch:
    """The members' mean (what WB2 scores an ensemble's RMSE, MAE, bias and ACC on)."""
    mean = lambda group, k: sum(getattr(m, f"{group}_vars")[k] for m in members) / len(members)
    first = members[0]
    return first.replace(
        surf_vars={k: mean("surf", k) for k in first.surf_vars},
        atmos_vars={k: mean("atmos", k) for k in first.atmos_vars},
    )


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
        rows: score rows (`COLUMNS`, or `ENSEMBLE_COLUMNS` when they hold CRPS); the CSV
            leaves the level of surface variables empty.
        out_dir: the folder, created if missing.
        provenance: what produced the scores (e.g. model preset, checkpoint step, data source,
            steps, climatology kind, figure paths); the summary adds what the CSV holds.

    Returns:
        ``{"scores": csv path, "summary": json path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, summary_path = out / "scores.csv", out / "summary.json"
    columns = ENSEMBLE_COLUMNS if any("crps" in r for r in rows) else COLUMNS
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_csv_value(c, row.get(c)) for c in columns])
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
