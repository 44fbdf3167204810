"""Trainer, TrainState and the training strategies.

from trainers import Trainer, RolloutStrategy
"""

from trainers.state import TrainState
from trainers.strategies.base import Strategy
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

__all__ = ["RolloutStrategy", "Strategy", "TrainState", "Trainer"]
