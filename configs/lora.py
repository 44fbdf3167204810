"""LoRA rollout fine-tuning (Bodnar et al. 2025, Suppl. D.4) on the bundled real sample.

configs/demo.py's model with LoRA on every window-attention `qkv` and `proj`, trained by
`LoRAStrategy`: a 2-step `RolloutStrategy` whose trainable parameters are the adapters. With
pretrained weights only the adapters train (`strategy.train_base=False`, the paper's setting). A
freshly initialised Aurora's AdaLN modulation is zero, which makes every LoRA gradient zero: this
sample run, without pretrained weights, trains the base too (`train_base=True`, at
`optimizer.base_learning_rate`).

For 0.25° HRES, start from Aurora's published weights (the normal way; this sample run starts
from scratch so that it needs no download):
  --config.model.preset=Aurora  with model.kwargs just {"use_lora": True, "lora_mode": "single"}
  --config.init.pretrained=AuroraPretrained  (downloaded from the Hugging Face Hub once and
      converted once, `aurora.from_pretrained`; a checkpoint without LoRA weights gets fresh
      adapters with B = 0 from `Strategy.init_state`; a local file goes in
      init.pytorch_checkpoint instead)
  --config.init.strict=False  only to add variables the checkpoint lacks (in model.kwargs): they
      start at their initial values and the log lists what was created
  --config.data.builder=hres  with builder_config paths, static_paths, resolution=0.25 and
      Aurora's 13 levels and variables (`aurora.variables`)
  --config.loss.gamma=1.0  and the loss weights of configs/default.py
  --config.strategy.train_base=False --config.strategy.steps=4  (backprop pushforward or last_k)
  --config.optimizer.lora_learning_rate=5e-5  and --config.optimizer.warmup_steps
  --config.trainer.precision=bf16-mixed --config.trainer.remat=all --config.trainer.max_steps=...
Export for microsoft-aurora with `trainers.strategies.lora.export_merged(model, params, dir)`.
"""

from __future__ import annotations

import ml_collections

from configs import demo


def get_config() -> ml_collections.ConfigDict:
    config = demo.get_config()

    # --- the architecture: LoRA adapters are part of the model ---------------------------------
    config.model.kwargs.use_lora = True
    config.model.kwargs.lora_mode = (
        "single"  # single | from_second | all (microsoft-aurora's modes)
    )
    config.model.kwargs.lora_steps = 40  # rollout steps with an adapter (Aurora's default)
    config.model.kwargs.lora_r = 8
    config.model.kwargs.lora_alpha = 8

    # --- the strategy: a 2-step rollout training the LoRA adapters ----------------------------
    # "lora" is LoRAStrategy's key in trainers.run.STRATEGIES; `inner` names the strategy it
    # returns with LoRA trainables, built from every other `strategy` field except the LoRA ones
    # (`train_base`, `lora_learning_rate`, `base_learning_rate`).
    config.strategy.name = "lora"
    config.strategy.inner = "rollout"  # any STRATEGIES key or "package.module:Class"
    config.strategy.steps = 2  # the sample's splits hold 2 history + 2 target times
    config.strategy.backprop = "all"  # all | last_k | pushforward
    # True only because the sample run has no pretrained weights (see above); False at scale.
    config.strategy.train_base = True

    # --- the optimiser: `lora_*` fields apply to the adapters, `base_*` to the base --------------
    config.optimizer.lora_learning_rate = 1e-3
    config.optimizer.base_learning_rate = 1e-3  # used only with strategy.train_base = True
    return config
