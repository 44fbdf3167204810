"""LoRA + replay-buffer fine-tuning (Bodnar et al. 2025, Suppl. D.4) on the bundled real sample.

`ReplayStrategy` trains one model step per update whatever the lead time, on a host buffer of the
model's own predictions scored against the truth at their valid time; a fresh sample enters every
`refresh_every` updates and the lead cap grows on `max_lead_hours`. It trains the LoRA adapters
(`LoRAStrategy`), as in the paper. The sample trains on its first five six-hourly times and
validates on the last three; the cap opens from 12 h to 24 h at step 15 (`train/lead_hours`,
`train/replay/buffer_size`).

For the paper's setting (0.25° HRES from Aurora's published weights,
`--config.init.pretrained=AuroraPretrained`, the normal way; the sample run starts from scratch so
that it needs no download), besides configs/lora.py's fields:
  --config.strategy.capacity=200 (per device)  --config.strategy.refresh_every=10
  --config.strategy.max_lead_hours='((0, 96), (5000, 240))'  (4 days, then 10 days)
  --config.strategy.train_base=False  --config.trainer.precision=bf16-mixed
  --config.trainer.remat=backbone  --config.data.builder_config.splits=...  (with targets up to
      10 days ahead in the training split)
Each entry holds two full states (0.57 GB at 0.25° with 4 + 5x13 variables): 200 entries need
115 GB of host RAM per device, and so does their checkpoint.
"""

from __future__ import annotations

import ml_collections

from configs import lora


def get_config() -> ml_collections.ConfigDict:
    config = lora.get_config()

    config.data.builder_config.splits = {
        "train": ("2024-06-03T00", "2024-06-04T00"),
        "validation": ("2024-06-04T06", "2024-06-04T18"),
    }

    config.strategy = ml_collections.ConfigDict(
        {
            "name": "lora",  # LoRAStrategy: LoRA trainables ...
            "inner": "replay",  # ... of a ReplayStrategy (trainers.run.STRATEGIES)
            "steps": 1,  # one model step per update; the data windows need one target
            "capacity": 50,  # buffer entries (the paper: 200 per device)
            "refresh_every": 3,  # updates between fresh dataset samples (the paper: 10)
            "max_lead_hours": ((0, 12), (15, 24)),  # (from step, cap in hours)
            "step_hours": 6,  # must equal data.step_hours
            "seed": 0,  # the buffer's sampling RNG (checkpointed)
            "train_base": True,  # only because the sample run has no pretrained weights
        }
    )

    config.trainer.max_steps = 30
    config.trainer.val_check_interval = 10
    return config
