"""`AuroraAirPollution`: Aurora fine-tuned on CAMS atmospheric composition (0.4°, 12 h).

microsoft-aurora's `AuroraAirPollution`. On top of the base model's switches (per-level patch
embeddings and heads, calendar channels, static channels on every level, a second level decoder
for the species) it has three mechanisms of its own, all in its hooks:

* the encoder sees each positive (pollutant) variable through a learnt mix of the clamped value
  and a log transform of it (`{surf,atmos}_feature_combiner`), since the fields are spiky;
* species are predicted as a difference: `pred + (1 + pred_mod) * input[t]`, with `t` the history
  slice of `DIFFERENCE_HISTORY_INDEX` and `pred_mod` the variable's modulation head (the `_mod`
  outputs are consumed there and never reach the prediction); the slice keeps its time axis, so
  batches of several samples work (the reference's `input[:, t]` broadcasts the samples against
  each other, which only a batch of one survives);
* under LoRA, SO2 at levels of 850 hPa and below is clipped at 1 (normalised) in the output.

The published checkpoint has a layout of its own, adapted by `adapt_air_pollution_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.convert import ConversionError, adapt_checkpoint
from aurora.model.aurora import Aurora
from aurora.model.static_channels import DYNAMIC_VARS
from aurora.normalisation import level_to_str

__all__ = [
    "CAMS_ATMOS_VARS",
    "CAMS_SURF_VARS",
    "DIFFERENCE_HISTORY_INDEX",
    "AuroraAirPollution",
    "adapt_air_pollution_checkpoint",
]

CAMS_SURF_VARS: tuple[str, ...] = (
    "pm1",
    "pm2p5",
    "pm10",
    "tcco",
    "tc_no",
    "tcno2",
    "gtco3",
    "tcso2",
)
"""Particulate matter and total columns, in microsoft-aurora's (and its checkpoint's) order."""

CAMS_ATMOS_VARS: tuple[str, ...] = ("co", "no", "no2", "go3", "so2")
"""Species on pressure levels."""

CAMS_STATIC_VARS: tuple[str, ...] = (
    *("static_ammonia", "static_ammonia_log", "static_co", "static_co_log"),
    *("static_nox", "static_nox_log", "static_so2", "static_so2_log"),
)
"""Emission fields (and their logarithms) added to the base model's static variables."""

DIFFERENCE_HISTORY_INDEX: Mapping[str, int] = {
    **{"pm1": 0, "pm2p5": 0, "pm10": 0, "co": 1, "tcco": 1, "no": 0, "tc_no": 0},
    **{"no2": 0, "tcno2": 0, "so2": 1, "tcso2": 1, "go3": 1, "gtco3": 1},
}
"""Per species, the input's history slice (0: 24 h ago, 1: 12 h ago) the prediction adds to."""

LEVELS: tuple[int, ...] = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)

_LOG_EPS = 1e-4
_CLIP_SO2_FROM_HPA = 850


def _combine(x: jax.Array, combiner: Mapping[str, jax.Array]) -> jax.Array:
    """`Linear(2, 1)` of the value clamped to [0, 2.5] and `log(max(x, eps))` scaled to 0 at eps
    and 1 at 1: the encoder's view of a spiky positive field (normalised)."""
    divisor = -np.log(_LOG_EPS)
    features = (
        jnp.clip(x, 0.0, 2.5),
        (jnp.log(jnp.maximum(x, _LOG_EPS)) - np.log(_LOG_EPS)) / divisor,
    )
    kernel = combiner["kernel"]  # (2, 1), PyTorch's weight transposed
    return features[0] * kernel[0, 0] + features[1] * kernel[1, 0] + combiner["bias"][0]


class AuroraAirPollution(Aurora):
    """Aurora for air pollution: microsoft-aurora's `AuroraAirPollution` and its defaults."""

    surf_vars: tuple[str, ...] = ("2t", "10u", "10v", "msl", *CAMS_SURF_VARS)
    static_vars: tuple[str, ...] = ("lsm", "z", "slt", *CAMS_STATIC_VARS)
    atmos_vars: tuple[str, ...] = ("z", "u", "v", "t", "q", *CAMS_ATMOS_VARS)
    patch_size: int = 3
    timestep: timedelta = timedelta(hours=12)
    level_condition: tuple[int | float, ...] | None = LEVELS
    dynamic_vars: bool = True
    atmos_static_vars: bool = True
    separate_perceiver: tuple[str, ...] = CAMS_ATMOS_VARS
    modulation_heads: tuple[str, ...] = tuple(DIFFERENCE_HISTORY_INDEX)
    positive_surf_vars: tuple[str, ...] = CAMS_SURF_VARS
    positive_atmos_vars: tuple[str, ...] = CAMS_ATMOS_VARS
    simulate_indexing_bug: bool = True

    difference_history_index: ClassVar[Mapping[str, int]] = DIFFERENCE_HISTORY_INDEX
    checkpoint_layout: ClassVar[str] = "air_pollution"

    def adapt_state_dict(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return adapt_air_pollution_checkpoint(state, self.patch_size, self.max_history_size)

    def _combiners(self, name: str, variables: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """One `Linear(2, 1)` per positive variable (PyTorch: `{name}.{var}.weight`), starting
        as the mean of the two features."""

        def init(_: jax.Array) -> dict[str, dict[str, jax.Array]]:
            return {
                v: {"kernel": jnp.full((2, 1), 0.5), "bias": jnp.zeros((1,))} for v in variables
            }

        return self.param(name, init)

    def _pre_encoder_hook(self, batch: Batch) -> Batch:
        # Checked here, before the backbone: the difference prediction indexes these slices.
        for fields in (batch.surf_vars, batch.atmos_vars):
            for name, x in fields.items():
                t = self.difference_history_index.get(name)
                if t is not None and x.shape[1] <= t:
                    raise ValueError(
                        f"{name} is predicted from history slice {t}: the batch needs a "
                        f"history of {t + 1} steps, it has {x.shape[1]}."
                    )
        surf = self._combiners("surf_feature_combiner", self.positive_surf_vars)
        atmos = self._combiners("atmos_feature_combiner", self.positive_atmos_vars)
        return batch.replace(
            surf_vars={
                k: _combine(v, surf[k]) if k in surf else v for k, v in batch.surf_vars.items()
            },
            atmos_vars={
                k: _combine(v, atmos[k]) if k in atmos else v for k, v in batch.atmos_vars.items()
            },
        )

    def _post_decoder_hook(self, batch: Batch, pred: Batch) -> Batch:
        """Species as differences from the input; the `_mod` outputs dropped; SO2 clipped near the
        ground under LoRA."""

        modulations = {f"{name}_mod" for name in self.modulation_heads}

        def resolve(inputs: Mapping[str, jax.Array], out: Mapping[str, jax.Array]) -> dict:
            resolved = {}
            for name, x in out.items():
                if name in modulations:
                    continue
                if name in self.difference_history_index:
                    t = self.difference_history_index[name]
                    x = x + (1 + out[f"{name}_mod"]) * inputs[name][:, t, None]
                resolved[name] = x
            return resolved

        atmos = resolve(batch.atmos_vars, pred.atmos_vars)
        if self.use_lora and "so2" in atmos:
            low = np.asarray(pred.metadata.atmos_levels) >= _CLIP_SO2_FROM_HPA
            atmos["so2"] = jnp.where(
                low[:, None, None], jnp.minimum(atmos["so2"], 1.0), atmos["so2"]
            )
        return pred.replace(surf_vars=resolve(batch.surf_vars, pred.surf_vars), atmos_vars=atmos)


def adapt_air_pollution_checkpoint(
    state: Mapping[str, np.ndarray], patch_size: int, max_history_size: int
) -> dict[str, np.ndarray]:
    """microsoft-aurora's `_adapt_checkpoint` then `_adapt_checkpoint_air_pollution`.

    The published checkpoint grew out of the pretrained one: the new variables' embeddings and
    heads are extra matrices (`weight_new`, `surf_head_new`, `surf_head_mod`, ...), the species'
    atmospheric embedding is a second per-level module (`atmos_token_embeds_new`) whose bias adds
    to the first, and the second level decoder is `level_decoder_new`. This splits them into the
    per-variable, per-level keys of the model. As in the reference, `z`'s embedding is replaced
    by `static_z`'s on every level (the model's `simulate_indexing_bug`), and the feature
    combiners of non-positive variables are dropped. Unlike the reference, which replaces `z`'s
    embedding whatever the layout, a state dict already in the model's layout (one the model
    saved) keeps its own.

    Args:
        state: The published state dict (or one already in the current layout).
        patch_size: The model's patch size.
        max_history_size: The model's history length.

    Returns:
        A new state dict in the model's key layout.

    Raises:
        ConversionError: If a matrix has the wrong number of variables.
    """
    d = adapt_checkpoint(state, patch_size, max_history_size)
    levels = [level_to_str(level) for level in LEVELS]
    met_atmos = ("z", "u", "v", "t", "q")
    embeds, embeds_new = "encoder.atmos_token_embeds", "encoder.atmos_token_embeds_new"
    published = f"{embeds}.weight_new2" in d or f"{embeds_new}.layers.50.weight" in d

    def columns(weight: np.ndarray, key: str, names: tuple[str, ...], prefix: str) -> None:
        """Split `key`, an embedding matrix, along its variable axis into `{prefix}.{name}`."""
        if weight.shape[1] != len(names):
            raise ConversionError(f"{key} has {weight.shape[1]} variables, expected {len(names)}.")
        for i, name in enumerate(names):
            d[f"{prefix}.{name}"] = weight[:, i : i + 1]

    def rows(key: str, names: tuple[str | None, ...], prefix: str, suffix: str = "") -> None:
        """Split a head's rows (pixel major, variable minor) into `{prefix}.{name}{suffix}`,
        keeping only `names` that are not None."""
        weight, bias = d.pop(f"{key}.weight"), d.pop(f"{key}.bias")
        n = patch_size**2
        if weight.shape[0] != len(names) * n:
            raise ConversionError(f"{key} has {weight.shape[0]} rows, expected {len(names)} x {n}.")
        weight = weight.reshape(n, len(names), -1)
        bias = bias.reshape(n, len(names))
        for i, name in enumerate(names):
            if name is not None:
                d[f"{prefix}.{name}{suffix}.weight"] = weight[:, i]
                d[f"{prefix}.{name}{suffix}.bias"] = bias[:, i]

    key = "encoder.surf_token_embeds.weight_new"
    if key in d:
        surf_new = CAMS_SURF_VARS + CAMS_STATIC_VARS + DYNAMIC_VARS
        columns(d.pop(key), key, surf_new, "encoder.surf_token_embeds.weights")

    # The base variables' atmospheric embedding is shared by all levels in the checkpoint.
    if f"{embeds}.weights.z" in d and f"{embeds_new}.layers.50.weight" in d:
        bias = d.pop(f"{embeds}.bias")
        for name in met_atmos:
            weight = d.pop(f"{embeds}.weights.{name}")
            for level in levels:
                d[f"{embeds}.layers.{level}.weights.{name}"] = weight.copy()
                d[f"{embeds}.layers.{level}.bias"] = bias.copy()
    key = f"{embeds}.weight_new2"
    if key in d:
        # The static and calendar channels on every level, each prefixed once more.
        weight = d.pop(key)
        names = tuple(f"static_{v}" for v in ("lsm", "z", "slt", *CAMS_STATIC_VARS, *DYNAMIC_VARS))
        for level in levels:
            columns(weight, key, names, f"{embeds}.layers.{level}.weights")
    d.pop(f"{embeds}.weight_new", None)
    for level in levels:
        d.pop(f"{embeds_new}.layers.{level}.weight", None)
        key = f"{embeds_new}.layers.{level}.weight_new"
        if key in d:
            columns(d.pop(key), key, CAMS_ATMOS_VARS, f"{embeds}.layers.{level}.weights")
        if published and f"{embeds}.layers.{level}.weights.static_z" in d:
            d[f"{embeds}.layers.{level}.weights.z"] = d[f"{embeds}.layers.{level}.weights.static_z"]
        if f"{embeds_new}.layers.{level}.bias" in d:
            # Two embedding modules in the original: their biases add up.
            d[f"{embeds}.layers.{level}.bias"] = d[f"{embeds}.layers.{level}.bias"] + d.pop(
                f"{embeds_new}.layers.{level}.bias"
            )
        d.pop(f"{embeds_new}.layers.{level}.weight_new2", None)

    for kind, names in (("surf", ("2t", "10u", "10v", "msl")), ("atmos", met_atmos)):
        for name in names:
            d.pop(f"{kind}_feature_combiner.{name}.weight", None)
            d.pop(f"{kind}_feature_combiner.{name}.bias", None)

    for key in list(d):
        if key.startswith("decoder.level_decoder_new"):
            rest = key.removeprefix("decoder.level_decoder_new")
            d[f"decoder.level_decoder_alternate{rest}"] = d.pop(key)

    if "decoder.surf_head_new.weight" in d:
        rows("decoder.surf_head_new", CAMS_SURF_VARS, "decoder.surf_heads")
    if "decoder.surf_head_mod.weight" in d:
        # Rows exist for the four base variables too, but only the species have modulation heads.
        rows("decoder.surf_head_mod", (None,) * 4 + CAMS_SURF_VARS, "decoder.surf_heads", "_mod")
    for suffix in ("", "_mod"):
        for level in levels:
            key = f"decoder.atmos_head{suffix}.layers.{level}"
            if f"{key}.weight" in d and suffix:
                # Base variables have no modulation heads: their `_mod` rows are dropped.
                d.pop(f"{key}.weight"), d.pop(f"{key}.bias")
            elif f"{key}.weight" in d:
                rows(key, met_atmos, "decoder.atmos_heads", f".layers.{level}")
            key = f"decoder.atmos_head{suffix}_new.layers.{level}"
            if f"{key}.weight" in d:
                rows(key, CAMS_ATMOS_VARS, "decoder.atmos_heads", f"{suffix}.layers.{level}")
    return d
