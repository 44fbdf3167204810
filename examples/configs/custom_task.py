"""Your own model, loss and optimiser, trained by `main.py` on the bundled sample::

    python main.py --config=examples/configs/custom_task.py --workdir=runs/custom

The model (`examples/tiny_model.py`) is not Aurora, the loss (`examples/huber_loss.py`) is a
latitude-weighted Huber loss, the optimiser is optax's Adam by name; everything else (data,
rollout strategy, callbacks, checkpoints) is `configs/demo.py`'s. Runs in seconds on a CPU.
"""

from __future__ import annotations

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()

    config.model.preset = "examples.tiny_model:PerVariableConv"
    config.model.kwargs = ml_collections.ConfigDict(
        {"atmos_vars": ("z", "u", "v", "t", "r"), "static_vars": ("lsm", "z"), "features": 8}
    )

    config.loss.name = "examples.huber_loss:latitude_weighted_huber"
    config.loss.kwargs = ml_collections.ConfigDict({"delta": 1.0})
    config.loss.lead_weights = (1.0, 0.5)  # the second rollout step counts half

    config.optimizer.name = "adam"  # any optax optimiser, called with learning_rate=schedule
    config.optimizer.kwargs = ml_collections.ConfigDict({"b2": 0.99})
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 0

    config.trainer.max_steps = 20
    config.trainer.val_check_interval = 10
    config.trainer.log_every_n_steps = 1
    config.callbacks.checkpoint.every_n_steps = 10
    return config
