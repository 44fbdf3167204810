"""Trainer, TrainState and the training strategies (issue: trainer framework)."""
