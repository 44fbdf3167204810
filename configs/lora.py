"""LoRA rollout fine-tuning (Bodnar et al. 2025, Suppl. D.4) on the bundled real sample.

The model of configs/demo.py with LoRA adapters on every window-attention `qkv` and `proj`, trained
by `trainers.strategies.lora.LoRAStrategy` against 2-step rollout targets formed by the wrapped
`RolloutStrategy`. With pretrained weights only the adapters train (`strategy.train_base=False`,
the paper's setting: the base is frozen in the optimiser and holds no optimiser state).

Here there are no pretrained weights, and a freshly initialised Aurora's AdaLN modulation is zero
(as in microsoft-aurora), which makes every Swin block, and so every LoRA gradient, exactly zero:
LoRA alone would leave the loss flat. So this sample run trains the base too
(`train_base=True`, at `optimizer.base_learning_rate`) with the adapters at their own rate
(about 100 s for 30 steps on 2 CPU cores).

`strategy.name = "lora"` is the key of `LoRAStrategy` in `trainers.run.STRATEGIES`;
`strategy.inner` names the wrapped strategy and every other `strategy` field except the LoRA ones
(`train_base`, `lora_learning_rate`, `base_learning_rate`) goes to it.

For 0.25° HRES and Aurora's fine-tuned weights converted from microsoft-aurora, change:
  --config.model.preset=Aurora  and make model.kwargs below just {"use_lora": True,
      "lora_mode": "single"} (Aurora's defaults: r = alpha = 8, lora_steps = 40, 4 surface, 3 static
      and 5 atmospheric variables),
  --config.init.pytorch_checkpoint=/path/aurora-0.25-finetuned.ckpt  (has the LoRA weights; from
      a checkpoint without them, e.g. aurora-0.25-pretrained.ckpt, `LoRAStrategy.init_state` adds
      fresh adapters with B = 0),
  --config.data.builder=hres  with builder_config.paths = your 0.25° HRES analyses,
      builder_config.static_paths, builder_config.resolution=0.25, builder_config.levels = the 13
      Aurora levels (configs.default.AURORA_LEVELS), surf_vars ["2t", "10u", "10v", "msl"],
      atmos_vars ["z", "u", "v", "t", "q"], static_vars ["lsm", "z", "slt"],
  --config.loss.gamma=1.0 (HRES) and loss surf/atmos weights as in configs/default.py,
  --config.strategy.train_base=False  (adapters only, as the paper),
  --config.strategy.steps=4 (or more) with backprop "pushforward"/"last_k" to bound memory,
  --config.optimizer.lora_learning_rate  (a small value for real weights, e.g. 5e-5) and
      --config.optimizer.warmup_steps,
  --config.trainer.precision=bf16-mixed --config.trainer.remat=all --config.trainer.max_steps=...
Export the result for microsoft-aurora with `LoRAStrategy.export(params, dir)` (merged weights).
"""

from __future__ import annotations

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()

    # --- the architecture: LoRA adapters are part of the model ------------------------------------
    config.model.kwargs.use_lora = True
    config.model.kwargs.lora_mode = (
        "single"  # single | from_second | all (microsoft-aurora's modes)
    )
    config.model.kwargs.lora_steps = 40  # rollout steps with an adapter (Aurora's default)
    config.model.kwargs.lora_r = 8
    config.model.kwargs.lora_alpha = 8

    # --- the strategy: LoRAStrategy wrapping a 2-step rollout -------------------------------------
    config.strategy.name = "lora"
    config.strategy.inner = "rollout"  # any STRATEGIES key or "package.module:Class"
    config.strategy.steps = 2  # the sample's splits hold 2 history + 2 target times
    config.strategy.backprop = "all"  # all | last_k | pushforward
    # True only because the sample run has no pretrained weights (see above); False at scale.
    config.strategy.train_base = True

    # --- the optimiser: `lora_*` fields apply to the adapters, `base_*` to the base -----------------
    config.optimizer.lora_learning_rate = 1e-3
    config.optimizer.base_learning_rate = 1e-3  # used only with strategy.train_base = True
    return config
