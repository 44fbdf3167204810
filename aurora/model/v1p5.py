"""Aurora 1.5: microsoft-aurora 2.0.1's `AuroraV1p5` preset.

26 surface variables (seven of them output-only: gusts, boundary-layer height and hourly
accumulations, which analyses lack), 36 static fields, prescribed solar insolation as an input,
lead times below the 6-hour step and the updated lead-time embedding. What sets it apart from
`Aurora` lives in its hooks: `scaled_*` variables are log-transformed around the normalisation
(`aurora.model.log_transform`), and the predicted insolation is replaced by the prescribed one at
the prediction's valid time (`aurora.insolation`, in-graph), so a rollout feeds back the exact
value. Output-only variables and rollout input clipping are generic `Aurora` arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.convert import adapt_checkpoint
from aurora.insolation import insolation
from aurora.model.aurora import Aurora
from aurora.model.clipping import Bounds
from aurora.model.log_transform import log_transform, log_transformed, log_untransform

__all__ = ["V1P5_ROLLOUT_INPUT_CLIPPING", "AuroraV1p5", "AuroraV1p5Ensemble"]

V1P5_ROLLOUT_INPUT_CLIPPING: Bounds = MappingProxyType(
    {
        "tcwv": {"min": 0.0, "max": None},
        "tcc": {"min": 0.0, "max": 1.0},
        "lcc": {"min": 0.0, "max": 1.0},
        "mcc": {"min": 0.0, "max": 1.0},
        "hcc": {"min": 0.0, "max": 1.0},
        "swvl1": {"min": 0.0, "max": 70.0},
        "ci": {"min": 0.0, "max": 1.0},
        "scaled_sd": {"min": 0.0, "max": 10.0},
    }
)
"""Aurora 1.5's default bounds of the fed-back predictions; given bounds replace them per
variable."""


class AuroraV1p5(Aurora):
    """Aurora 1.5 (0.25°, 6-hour step, sub-step lead times), microsoft-aurora's defaults.

    As microsoft-aurora, it computes encoder, backbone and decoder in float16 with float16-safe
    attention by default (`autocast=True`, `autocast_encoder`, `autocast_decoder`);
    `AuroraV1p5(autocast=False)` computes in float32 (what the parity tests check).
    """

    # fmt: off
    surf_vars: tuple[str, ...] = (
        "2t", "10u", "10v", "msl", "2d", "tcwv", "tcc", "100u", "100v", "sp", "lcc", "mcc",
        "hcc", "skt", "stl1", "swvl1", "ci", "scaled_sd", "i10fg", "blh", "uvb_1h",
        "ssrd_1h", "ttr_1h", "scaled_tp_1h", "scaled_sf_1h", "insolation",
    )
    static_vars: tuple[str, ...] = (
        "lsm", "z", "anor", "isor", "cvh", "cl", "dl", "cvl", "slor", "slt_0", "slt_1",
        "slt_2", "slt_3", "slt_4", "slt_5", "slt_6", "slt_7", "sdfor", "sdor", "tvh_0",
        "tvh_18", "tvh_19", "tvh_3", "tvh_4", "tvh_5", "tvh_6", "tvl_0", "tvl_1", "tvl_10",
        "tvl_11", "tvl_13", "tvl_16", "tvl_17", "tvl_2", "tvl_7", "tvl_9",
    )
    output_only_surf_vars: tuple[str, ...] = (
        "i10fg", "blh", "uvb_1h", "ssrd_1h", "ttr_1h", "scaled_tp_1h", "scaled_sf_1h",
    )
    # fmt: on
    variable_lead_time: bool = True
    use_updated_lead_time_embedding: bool = True
    use_lora: bool = False
    use_fp16_safe_attention: bool = True
    autocast: bool = True
    autocast_dtype: Any = jnp.float16
    autocast_encoder: bool = True
    autocast_decoder: bool = True

    checkpoint_layout: ClassVar[str] = "v1p5"

    def __post_init__(self) -> None:
        # microsoft-aurora merges the given bounds into the defaults, variable by variable.
        given: Mapping[str, Any] = self.rollout_input_clipping or {}
        object.__setattr__(self, "rollout_input_clipping", {**V1P5_ROLLOUT_INPUT_CLIPPING, **given})
        super().__post_init__()

    def _pre_norm_hook(self, batch: Batch) -> Batch:
        scaled = log_transformed(self.surf_vars)
        return batch.replace(
            surf_vars={
                k: log_transform(v) if k in scaled else v for k, v in batch.surf_vars.items()
            }
        )

    def _post_unnorm_hook(self, batch: Batch, pred: Batch) -> Batch:
        scaled = log_transformed(self.surf_vars)
        surf = {k: log_untransform(v) if k in scaled else v for k, v in pred.surf_vars.items()}
        if "insolation" in surf:
            meta = pred.metadata
            prescribed = insolation(meta.time, np.asarray(meta.lat), np.asarray(meta.lon))
            surf["insolation"] = prescribed[:, None].astype(surf["insolation"].dtype)
        return pred.replace(surf_vars=surf)

    def adapt_state_dict(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """microsoft-aurora's `_adapt_checkpoint_v1p5`, then history kernels zero-padded as for
        every model.

        The older single matrices are split over the preset's own variables, the published
        checkpoint's (microsoft-aurora uses the model's, the same unless they were changed, and
        then fails): a model given other variables then loads the published ones by name
        (`strict=False`), and the conversion, cached by `checkpoint_layout`, does not depend on
        the model's variables.
        """
        preset = type(self)
        return adapt_checkpoint(
            state,
            self.patch_size,
            self.max_history_size,
            surf_vars=preset.surf_vars,
            static_vars=preset.static_vars,
            atmos_vars=preset.atmos_vars,
        )


class AuroraV1p5Ensemble(AuroraV1p5):
    """Aurora 1.5's ensemble: noise in the backbone (`stochastic`, aurora.model.noise), one member
    per key (`rollout(..., rng=key)`); same checkpoint layout as Aurora 1.5."""

    stochastic: bool = True
