"""WeatherBench2 scores of the model's rollouts, logged at the end of every validation in `fit`.

Validation's loss and MAE are normalised and over the training window of K steps; what a user
publishes is latitude-weighted RMSE (and ACC) in physical units at leads of days. This callback
rolls the model out from a few validation inits (00 and 12 UTC, as WeatherBench2) to the
configured leads and logs, per variable, level and lead, to every writer::

    forecast/rmse/z500/24h   forecast/acc/z500/24h   (ACC only with a climatology)

The headline set by default (z500, t850, u850, 2t, msl at 24 h and 120 h), restricted to the
variables the model forecasts and the leads the validation data hold. `trainers.run` hands the
validation split's `WeatherSource` to it (`attach_source`); in a script pass `source=`.
Enable it in a config::

    config.callbacks.forecast_scores = {"type": "forecast_scores", "lead_hours": (24, 120)}
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from data_builders.pipeline import WeatherSource
    from trainers.trainer import Trainer

__all__ = ["HEADLINE", "ForecastScores"]

log = logging.getLogger(__name__)

HEADLINE: tuple[tuple[str, float | None], ...] = (
    ("z", 500.0),
    ("t", 850.0),
    ("u", 850.0),
    ("2t", None),
    ("msl", None),
)
"""(variable, level) pairs logged by default: WeatherBench2's headline scores."""


class ForecastScores(Callback):
    """Log WB2 RMSE (and ACC) of rollouts from validation inits after each validation.

    Args:
        lead_hours: the leads to score, in hours (multiples of the model's step).
        variables: `(variable, level)` pairs to log (level None for surface variables); None:
            every variable and level the model forecasts.
        init_hours: inits at these hours of the day (UTC); () every init.
        max_inits: at most this many inits, evenly spread over the validation period (the
            cost is `max_inits` rollouts to the longest lead).
        climatology: a WB2-layout climatology (path or URL) for ACC; None: no ACC.
        batch_size: inits per rollout batch.
        source: the validation states; by default `trainers.run` attaches them.
        prefix: the metrics' tag prefix.
    """

    def __init__(
        self,
        lead_hours: Sequence[float] = (24, 120),
        variables: Sequence[Sequence[Any]] | None = HEADLINE,
        init_hours: Sequence[int] = (0, 12),
        max_inits: int = 4,
        climatology: str | None = None,
        batch_size: int = 1,
        source: WeatherSource | None = None,
        prefix: str = "forecast",
    ) -> None:
        self.lead_hours = tuple(float(h) for h in lead_hours)
        self.variables = (
            None if variables is None else {(str(v), _level(lev)) for v, lev in variables}
        )
        self.init_hours = tuple(int(h) for h in init_hours) or None
        self.max_inits, self.batch_size, self.prefix = int(max_inits), int(batch_size), prefix
        self.climatology = climatology
        self.source = source
        self._step: Any = None
        self._clim: Any = None
        self.last_metrics: dict[str, float] = {}

    def attach_source(self, source: WeatherSource) -> None:
        """Score against these states (the validation split), unless given at construction."""
        if self.source is None:
            self.source = source

    def on_validation_end(self, trainer: Trainer) -> None:
        if self.source is None or trainer.state is None:
            return
        metrics = self.scores(trainer.strategy.model, trainer.state.params, seed=trainer.seed)
        self.last_metrics = metrics
        trainer.callback_metrics.update(metrics)
        trainer.log_metrics(metrics)

    def scores(self, model: Any, params: Any, seed: int = 0) -> dict[str, float]:
        """The metrics for `model` with `params` (also usable outside a Trainer); a stochastic
        model's forecast is member 0 of the ensemble forecasts' keys from `seed`.

        Returns:
            ``{"<prefix>/rmse/<var><level>/<lead>h": value, ...}``; empty when no init of the
            source has a truth at any of the leads.
        """
        from aurora.rollout import ModelStep
        from trainers.evaluation import evaluate, init_times, open_climatology
        from trainers.evaluation.scoring import level_name
        from trainers.evaluation.states import model_variables

        source = self.source
        assert source is not None
        step_h = model.timestep_minutes / 60
        if self._step is None or self._step.model is not model:
            self._step = ModelStep(model)
        lead_steps = sorted({round(h / step_h) for h in self.lead_hours if h >= step_h})
        inits = init_times(source, step_h, self.init_hours)
        have = set(source.times.tolist())
        reach = {k for k in lead_steps for t in inits if int(t) + k * int(step_h * 3600) in have}
        lead_steps = [k for k in lead_steps if k in reach]
        inits = [t for t in inits if any(t + k * step_h * 3600 in have for k in lead_steps)]
        if not lead_steps or not inits:
            log.info("forecast_scores: the validation data hold no init with those leads")
            return {}
        pick = np.unique(np.linspace(0, len(inits) - 1, min(self.max_inits, len(inits))).round())
        chosen = [int(inits[int(i)]) for i in pick]
        surf, atmos, _ = model_variables(model, source)
        if self.climatology and self._clim is None:
            self._clim = open_climatology(
                self.climatology,
                surf=surf,
                atmos=atmos,
                levels=source.levels,
                lat=source.lat,
                lon=source.lon,
            )
        rows = evaluate(
            self._step,
            params,
            source,
            steps=max(lead_steps),
            step_hours=step_h,
            climatology=self._clim if self._clim is not None else _zeros(source, surf, atmos),
            batch_size=self.batch_size,
            seed=seed,
            inits=chosen,
            lead_steps=lead_steps,
        )
        out: dict[str, float] = {}
        for row in rows:
            if row["model"] != "aurora" or row["grid"] != "model":
                continue
            key = (row["variable"], _level(row["level"]))
            if self.variables is not None and key not in self.variables:
                continue
            name = f"{level_name(row['variable'], row['level'])}/{row['lead_time_h']:g}h"
            out[f"{self.prefix}/rmse/{name}"] = float(row["rmse"])
            if self._clim is not None:
                out[f"{self.prefix}/acc/{name}"] = float(row["acc"])
        return out


def _level(level: Any) -> float | None:
    return None if level is None or level == "" else float(level)


def _zeros(source: WeatherSource, surf: Sequence[str], atmos: Sequence[str]) -> dict[str, Any]:
    """Zero fields: a stand-in climatology, so the whole split's mean is not read for an ACC
    that is not logged."""
    h, w, c = len(source.lat), len(source.lon), len(source.levels)
    return {
        "surf": {k: np.zeros((h, w), np.float32) for k in surf},
        "atmos": {k: np.zeros((c, h, w), np.float32) for k in atmos},
    }
