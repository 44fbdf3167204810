"""Evaluation: WeatherBench2 scores of rollouts with baselines, figures and forecast files.

Modules: `states` (a source's states by time, each read once), `forecasts` (rollouts, lead by
lead), `climatology` (WB2's day-of-year × hour climatology, read or computed; the training mean
as fallback), `metrics` (WB2 scores), `ensemble_metrics` (WB2's CRPS and spread/skill of
ensembles), `wb2` (WB2's names and evaluation grids), `scoring` (score
rows, ``scores.csv``), `figures`, `forecast_io` and `forecast_store` (CF netCDF and WB2 zarr
forecasts, written as they are made) and `jobs` (whole ``--mode=test`` and ``--mode=predict``
runs). Nothing here depends on the Trainer: a model, its params and a `WeatherSource`.
"""

from trainers.evaluation.climatology import (
    TRAIN_MEAN,
    WB2_CLIMATOLOGY_URL,
    Climatology,
    DayOfYearClimatology,
    Fields,
    climatology_kind,
    compute_climatology,
    open_climatology,
    source_mean,
)
from trainers.evaluation.ensemble_metrics import EnsembleTotals, score_ensemble
from trainers.evaluation.figures import plot_maps, plot_rmse_vs_lead
from trainers.evaluation.forecast_io import variable_attrs, write_forecast
from trainers.evaluation.forecast_store import ENSEMBLE_DIM, ForecastNetcdf, ForecastZarr, Layout
from trainers.evaluation.forecasts import ensemble_stream, forecast_stream, forecasts
from trainers.evaluation.jobs import predict, run_evaluation
from trainers.evaluation.metrics import ScoreTotals, lat_weights, score_batch
from trainers.evaluation.scoring import (
    COLUMNS,
    ENSEMBLE_COLUMNS,
    evaluate,
    job_uses,
    write_scores,
)
from trainers.evaluation.states import WB2_INIT_HOURS, SourceStates, init_times

__all__ = [
    "COLUMNS",
    "ENSEMBLE_COLUMNS",
    "ENSEMBLE_DIM",
    "TRAIN_MEAN",
    "WB2_CLIMATOLOGY_URL",
    "WB2_INIT_HOURS",
    "Climatology",
    "DayOfYearClimatology",
    "EnsembleTotals",
    "Fields",
    "ForecastNetcdf",
    "ForecastZarr",
    "Layout",
    "ScoreTotals",
    "SourceStates",
    "climatology_kind",
    "compute_climatology",
    "ensemble_stream",
    "evaluate",
    "forecast_stream",
    "forecasts",
    "init_times",
    "job_uses",
    "lat_weights",
    "open_climatology",
    "plot_maps",
    "plot_rmse_vs_lead",
    "predict",
    "run_evaluation",
    "score_batch",
    "score_ensemble",
    "source_mean",
    "variable_attrs",
    "write_forecast",
    "write_scores",
]
