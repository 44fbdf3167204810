"""Evaluation: WeatherBench2 scores of rollouts with baselines, figures and forecast files.

Modules: `states` (a source's states by time), `forecasts` (rollouts from every init time),
`climatology` and `metrics` (WB2 scores), `scoring` (score rows, ``scores.csv``), `figures`,
`forecast_io` (CF netCDF forecasts) and `jobs` (whole ``--mode=test`` and ``--mode=predict``
runs). Nothing here depends on the Trainer: a model, its params and a `WeatherSource`.
"""

from trainers.evaluation.climatology import (
    Climatology,
    Fields,
    climatology_kind,
    source_mean,
)
from trainers.evaluation.figures import plot_maps, plot_rmse_vs_lead
from trainers.evaluation.forecast_io import variable_attrs, write_forecast
from trainers.evaluation.forecasts import forecasts
from trainers.evaluation.jobs import predict, run_evaluation
from trainers.evaluation.metrics import ScoreTotals, lat_weights, score_batch
from trainers.evaluation.scoring import COLUMNS, evaluate, write_scores
from trainers.evaluation.states import init_times

__all__ = [
    "COLUMNS",
    "Climatology",
    "Fields",
    "ScoreTotals",
    "climatology_kind",
    "evaluate",
    "forecasts",
    "init_times",
    "lat_weights",
    "plot_maps",
    "plot_rmse_vs_lead",
    "predict",
    "run_evaluation",
    "score_batch",
    "source_mean",
    "variable_attrs",
    "write_forecast",
    "write_scores",
]
