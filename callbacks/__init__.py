"""Lightning-style callbacks driven by the trainer (hook names in `callbacks.base`)."""

from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint, OnExceptionCheckpoint
from callbacks.early_stopping import EarlyStopping
from callbacks.ema import EMA
from callbacks.forecast_scores import ForecastScores
from callbacks.grad_stop import GradStop
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.model_summary import ModelSummary
from callbacks.profiler import Profiler
from callbacks.progress import ProgressBar
from callbacks.timer import Timer

__all__ = [
    "EMA",
    "Callback",
    "EarlyStopping",
    "ForecastScores",
    "GradStop",
    "LearningRateMonitor",
    "ModelCheckpoint",
    "ModelSummary",
    "OnExceptionCheckpoint",
    "Profiler",
    "ProgressBar",
    "Timer",
]
