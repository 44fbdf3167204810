"""Score a model's rollouts against a `WeatherSource`'s own states, next to two baselines.

`evaluate` starts a forecast at every time ``now`` of the source that has its two history
states (``now - step`` and ``now``), rolls it out ``steps`` steps and scores each lead against
the source's state at the valid time wherever that state exists (each row counts its samples in
``n``: long leads of late inits run past the end of the data and are simply not scored; a lead
that no init can be scored at has no rows). The same valid times score the two baselines WeatherBench2 reports:

* ``persistence``: the last input state (``now``) held fixed;
* ``climatology``: a climatological field. Without one the per-grid-point mean over all the
  source's states is used (in-sample and over a short period, so a weak stand-in for a
  multi-year climatology; `climatology_kind` says which was used, and the summary records it).
  The same field gives the anomalies for ACC. The climatology forecast has no anomaly, so its
  ACC is NaN, as in WB2.

Scores follow WB2 (`trainers.metrics`): latitude-weighted, per variable and pressure level, RMSE
as the square root of the mean MSE over inits. All three are scored on the model's grid (a
latitude row that `Batch.crop` drops for the patch size is dropped for the baselines too).

`write_scores` writes ``scores.csv`` and ``summary.json``; `run_evaluation` does everything for
``--mode=test`` (scores, figures, summary) and `predict` writes the forecasts as CF netCDF for
``--mode=predict``. Nothing here depends on the Trainer: a model, its params and a source.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch, Metadata
from aurora.jsonable import jsonable
from aurora.model.aurora import Aurora
from aurora.rollout import advance_batch
from data_builders.pipeline import WeatherSource, find_windows
from trainers.metrics import ScoreTotals, score_batch

__all__ = [
    "COLUMNS",
    "climatology_kind",
    "evaluate",
    "forecasts",
    "init_times",
    "predict",
    "run_evaluation",
    "source_mean",
    "write_scores",
]

log = logging.getLogger(__name__)

COLUMNS = ("model", "variable", "level", "lead_time_h", "rmse", "mae", "bias", "acc", "n")
"""Columns of every score row and of ``scores.csv``."""

Fields = Mapping[
    str, Mapping[str, np.ndarray]
]  # {"surf": {name: (h, w)}, "atmos": {name: (c, h, w)}}
Climatology = Fields | Callable[[int], Fields] | None
"""Fields on the source's grid; or a function of the valid time (int seconds since 1970), e.g.
WB2's day-of-year/hour climatology; None: the source's mean (`source_mean`)."""


# --------------------------------------------------------------------------------------------
# Reading states
# --------------------------------------------------------------------------------------------


def init_times(source: WeatherSource, step_hours: float = 6) -> np.ndarray:
    """Sorted init times (int64 seconds) whose two history states are both in the source."""
    return find_windows(source.times, _step_seconds(step_hours), 0)


def _step_seconds(step_hours: float) -> int:
    step = round(float(step_hours) * 3600)
    if step <= 0:
        raise ValueError(f"step_hours must be positive, not {step_hours}")
    return step


class _States:
    """Reads the source's states by time and stacks them into arrays (one read per record)."""

    def __init__(self, source: WeatherSource, surf: Sequence[str], atmos: Sequence[str]) -> None:
        self.source, self.surf, self.atmos = source, tuple(surf), tuple(atmos)
        self.index = {int(t): i for i, t in enumerate(source.times)}

    def has(self, t: int) -> bool:
        return int(t) in self.index

    def stack(
        self, times: np.ndarray, rows: int | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """`times` of shape (b, T) -> surface (b, T, h, w) and atmospheric (b, T, c, h, w)
        float32 arrays, cut to the first `rows` latitudes; a time not in the source is zeros."""
        cache: dict[int, Any] = {}
        out_s: dict[str, np.ndarray] = {}
        out_a: dict[str, np.ndarray] = {}
        for group, names, out in (("surf", self.surf, out_s), ("atmos", self.atmos, out_a)):
            for name in names:
                parts = []
                for row in times:
                    fields = []
                    for t in row:
                        record = self._record(int(t), cache)
                        fields.append(
                            None if record is None else np.asarray(record[group][name], np.float32)
                        )
                    shape = next((f.shape for f in fields if f is not None), None)
                    shape = shape or self._shape(group)
                    fields = [np.zeros(shape, np.float32) if f is None else f for f in fields]
                    parts.append(np.stack(fields))
                out[name] = np.stack(parts)[..., :rows, :]
        return out_s, out_a

    def _record(self, t: int, cache: dict[int, Any]) -> Any:
        if t not in self.index:
            return None
        if t not in cache:
            record = self.source.records[self.index[t]]
            if int(record["time"]) != t:
                raise ValueError(
                    f"{self.source.name}: record for {t} holds time {int(record['time'])}"
                )
            cache[t] = record
        return cache[t]

    def _shape(self, group: str) -> tuple[int, ...]:
        h, w = len(self.source.lat), len(self.source.lon)
        return (h, w) if group == "surf" else (len(self.source.levels), h, w)


def _variables(model: Aurora, source: WeatherSource) -> tuple[list[str], list[str], list[str]]:
    """The model's variables that the source has (surface, atmospheric, static)."""
    first = source.records[0]
    surf = [v for v in model.surf_vars if v in first.get("surf", {})]
    atmos = [v for v in model.atmos_vars if v in first.get("atmos", {})]
    static = [v for v in model.static_vars if v in source.static]
    if not atmos:
        raise ValueError(
            f"{source.name}: none of the model's atmospheric variables {model.atmos_vars}"
        )
    return surf, atmos, static


def source_mean(source: WeatherSource) -> Fields:
    """Per-grid-point mean over all the source's states (float64 sums): the default climatology."""
    sums: dict[str, dict[str, np.ndarray]] = {"surf": {}, "atmos": {}}
    for i in range(len(source.records)):
        record = source.records[i]
        for group in ("surf", "atmos"):
            for name, x in record.get(group, {}).items():
                sums[group][name] = sums[group].get(name, 0.0) + np.asarray(x, np.float64)
    n = len(source.records)
    return {g: {k: (v / n).astype(np.float32) for k, v in d.items()} for g, d in sums.items()}


def climatology_kind(climatology: Climatology, source: WeatherSource) -> str:
    """Human-readable description of the climatology `evaluate` uses (for the summary)."""
    if climatology is None:
        return (
            f"source mean: per-grid-point mean of the {len(source.times)} states of "
            f"{source.name} (in-sample, not a multi-year climatology)"
        )
    if callable(climatology):
        return "given: a function of valid time"
    return "given: time-independent fields"


# --------------------------------------------------------------------------------------------
# Forecasts
# --------------------------------------------------------------------------------------------


def forecasts(
    model: Aurora,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    step_hours: float = 6,
    batch_size: int = 1,
) -> Iterator[tuple[np.ndarray, Batch, list[Batch]]]:
    """`(inits, inputs, predictions)` per batch of init times: `inits` int64 seconds `(b,)`,
    `inputs` the 2-state input `Batch`, `predictions[k - 1]` the `Batch` at lead `k * step`."""
    step = _step_seconds(step_hours)
    if model.timestep_minutes * 60 != step:
        raise ValueError(
            f"The model steps {model.timestep_minutes / 60:g} h but step_hours is {step_hours}"
        )
    if steps < 1 or batch_size < 1:
        raise ValueError("steps and batch_size must be positive")
    inits = init_times(source, step_hours)
    if not len(inits):
        raise ValueError(f"{source.name}: no time has the state {step_hours} h before it as well")
    surf, atmos, static = _variables(model, source)
    states = _States(source, surf, atmos)
    statics = {k: np.asarray(source.static[k], np.float32) for k in static}
    apply = _jitted_apply(model)
    for lo in range(0, len(inits), batch_size):
        now = inits[lo : lo + batch_size]
        padded = np.concatenate([now, np.repeat(now[-1:], batch_size - len(now))])  # one shape
        s, a = states.stack(np.stack([padded - step, padded], axis=1))
        metadata = Metadata(
            lat=source.lat,
            lon=source.lon,
            time=(padded // 60).astype(np.int32),
            atmos_levels=source.levels,
        )
        inputs = Batch(surf_vars=s, static_vars=statics, atmos_vars=a, metadata=metadata)
        preds = _rollout(apply, params, inputs, steps, model.patch_size)
        yield now, _first(inputs, len(now)), [_first(p, len(now)) for p in preds]


_LAST_APPLY: list[tuple[Any, Callable[[Any, Batch], Batch]]] = []


def _jitted_apply(model: Aurora) -> Callable[[Any, Batch], Batch]:
    """One jitted step, reused while the model stays the same (equal by value; a module holding
    a dict is not hashable, so no lru_cache). `aurora.rollout` jits a fresh function per call,
    which would recompile the model for every batch of inits, and again for `predict` after
    `run_evaluation`."""
    if not (_LAST_APPLY and _LAST_APPLY[0][0] == model):
        _LAST_APPLY[:] = [(model, jax.jit(lambda p, b: model.apply({"params": p}, b)))]
    return _LAST_APPLY[0][1]


def _first(batch: Batch, n: int) -> Batch:
    """The first `n` batch rows (drops the padding of a short last batch)."""
    if batch.metadata.time.shape[0] == n:
        return batch
    return Batch(
        surf_vars={k: v[:n] for k, v in batch.surf_vars.items()},
        static_vars=batch.static_vars,
        atmos_vars={k: v[:n] for k, v in batch.atmos_vars.items()},
        metadata=batch.metadata.replace(time=batch.metadata.time[:n]),
    )


def _rollout(
    apply: Callable[[Any, Batch], Batch], params: Any, batch: Batch, steps: int, patch_size: int
) -> list[Batch]:
    """`aurora.rollout`'s loop around a step the caller jitted once."""
    batch = batch.astype(jnp.float32).crop(patch_size)
    batch = batch.replace(metadata=batch.metadata.replace(rollout_step=jnp.asarray(0, jnp.int32)))
    preds = []
    for _ in range(steps):
        preds.append(apply(params, batch))
        batch = advance_batch(batch, preds[-1])
    return preds


def _last_state(inputs: Batch, rows: int) -> Batch:
    """The persistence forecast: the newest input state on the first `rows` latitudes."""
    cut = lambda x: np.asarray(x)[:, -1:, ..., :rows, :]
    return Batch(
        surf_vars={k: cut(v) for k, v in inputs.surf_vars.items()},
        static_vars={},
        atmos_vars={k: cut(v) for k, v in inputs.atmos_vars.items()},
        metadata=inputs.metadata.replace(lat=inputs.metadata.lat[:rows]),
    )


def _climatology_batch(clim: Climatology, valid: np.ndarray, like: Batch) -> Batch:
    """Climatology fields for each valid time, shaped like `like` (b, 1, ...) and cut to its grid."""
    rows = like.spatial_shape[0]

    def pick(group: str, name: str) -> np.ndarray:
        fields = [(clim(int(t)) if callable(clim) else clim)[group][name] for t in valid]
        return np.stack([np.asarray(f, np.float32)[..., :rows, :] for f in fields])[:, None]

    return Batch(
        surf_vars={k: pick("surf", k) for k in like.surf_vars},
        static_vars={},
        atmos_vars={k: pick("atmos", k) for k in like.atmos_vars},
        metadata=like.metadata,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    model: Aurora,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    step_hours: float = 6,
    climatology: Climatology = None,
    batch_size: int = 1,
    name: str = "aurora",
) -> list[dict[str, Any]]:
    """Score rows (`COLUMNS`) for the model (as `name`), persistence and climatology, per
    variable, level (None for surface variables) and lead time; see the module docstring."""
    rows, _ = _evaluate(
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


def _evaluate(
    model: Aurora,
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
    """`evaluate`, plus the first scored (prediction, truth) pair at each of `map_lead_steps`
    (for the map figures)."""
    step = _step_seconds(step_hours)
    clim = source_mean(source) if climatology is None else climatology
    surf, atmos, _ = _variables(model, source)
    states = _States(source, surf, atmos)
    score = _SCORE
    totals = {
        (m, k): ScoreTotals(source.levels)
        for m in (name, "persistence", "climatology")
        for k in range(1, steps + 1)
    }
    examples: dict[int, dict[str, Any]] = {}
    for now, inputs, preds in forecasts(
        model, params, source, steps=steps, step_hours=step_hours, batch_size=batch_size
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
            climate = _climatology_batch(clim, valid, truth)
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


_SCORE = jax.jit(score_batch)  # module level: compiled once per batch layout, not per call


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
    """Write ``scores.csv`` (columns `COLUMNS`; empty level for surface variables) and
    ``summary.json`` (`provenance`, e.g. model preset, checkpoint step, data source, steps,
    climatology kind and figure paths, plus what the CSV holds). Returns both paths."""
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
        "variables": sorted({_level_name(r["variable"], r.get("level")) for r in rows}),
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


def _level_name(variable: str, level: float | None) -> str:
    return variable if level is None or level == "" else f"{variable}{float(level):g}"


# --------------------------------------------------------------------------------------------
# Whole jobs: --mode=test and --mode=predict
# --------------------------------------------------------------------------------------------


def run_evaluation(
    model: Aurora,
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
    """Evaluate, draw RMSE-vs-lead curves (every variable and level) and prediction/truth maps,
    write ``scores.csv`` and ``summary.json`` to `out_dir`; return the summary written.

    Maps show the first scored sample at each of `map_lead_steps`, for `map_variables` (empty:
    all) at `map_levels` (atmospheric variables; the first level when none of them exists)."""
    out = Path(out_dir)
    rows, examples = _evaluate(
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
    from trainers.figures import plot_maps, plot_rmse_vs_lead

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for variable, level in dict.fromkeys((r["variable"], r["level"]) for r in rows):
        path = out / f"rmse_vs_lead_{_level_name(variable, level)}.png"
        paths.append(plot_rmse_vs_lead(rows, variable, level, path))
    for example in examples:
        pred, truth, lead_h = example["pred"], example["truth"], example["lead_h"]
        available = pred.metadata.atmos_levels
        chosen = [float(x) for x in levels if float(x) in available] or list(available[:1])
        for variable in [*pred.surf_vars, *pred.atmos_vars]:
            if variables and variable not in variables:
                continue
            for lev in chosen if variable in pred.atmos_vars else [None]:
                path = out / f"map_{_level_name(variable, lev)}_{lead_h:g}h.png"
                paths.append(plot_maps(pred, truth, variable, lev, lead_h, path))
    return paths


def predict(
    model: Aurora,
    params: Any,
    source: WeatherSource,
    *,
    steps: int,
    out_dir: str | Path,
    provenance: Mapping[str, Any] | None = None,
    step_hours: float = 6,
    batch_size: int = 1,
) -> Path:
    """Forecast from every init time of the source and write ``forecast.nc`` (CF, WB2 layout,
    `trainers.forecast_io`). All forecasts are held in host memory until written."""
    from trainers.forecast_io import write_forecast

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
