"""`AuroraWave`: Aurora fine-tuned on HRES-WAM ocean waves (microsoft-aurora's `AuroraWave`).

Wave fields exist over the ocean only: over land, and where a wave system is absent, they are NaN.
The model sees every such variable as its value with NaNs set to zero plus a `{name}_density`
channel (1 where the value exists), and every direction in degrees as a `{name}_sin` /
`{name}_cos` pair, so the configured `surf_vars` are the raw names *supplemented* with these
channels, as in microsoft-aurora. The prediction is turned back: directions from `atan2`, and NaN
wherever the predicted density (after a sigmoid) is below one half or the model bathymetry `wmb`
says land. Everything here is pure `jnp` and runs inside `jit` (the rollout step is traced).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.convert import adapt_checkpoint
from aurora.model.aurora import Aurora
from aurora.model.lora import LoRAMode

__all__ = [
    "ANGLE_SURF_VARS",
    "DENSITY_CHANNEL_SURF_VARS",
    "WAVE_SURF_VARS",
    "AuroraWave",
    "adapt_wave_checkpoint",
    "supplement_surf_vars",
    "unsupplement_surf_vars",
]

DENSITY_CHANNEL_SURF_VARS: tuple[str, ...] = (
    *("swh", "mwd", "mwp", "pp1d", "shww", "mdww", "mpww", "shts", "mdts", "mpts"),
    *("swh1", "mwd1", "mwp1", "swh2", "mwd2", "mwp2", "wind", "10u_wave", "10v_wave"),
)
"""Variables that may be missing (NaN) and get a density channel."""

ANGLE_SURF_VARS: tuple[str, ...] = ("mwd", "mdww", "mdts", "mwd1", "mwd2")
"""Directions in degrees, modelled as sine and cosine."""

WAVE_SURF_VARS: tuple[str, ...] = ("2t", "10u", "10v", "msl", *DENSITY_CHANNEL_SURF_VARS)
"""`AuroraWave`'s raw surface variables."""

WAVE_STATIC_VARS: tuple[str, ...] = ("lsm", "z", "slt", "wmb", "lat_mask")

# A wave system whose height is (practically) zero is absent: its height and its other
# components become NaN in the model's input. microsoft-aurora lists `mdts` twice for the total
# swell (so its period `mpts` is never masked); kept as is for parity.
_ABSENT_BELOW = 1e-4
_WAVE_SYSTEMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("swh", ("mwd", "mwp", "pp1d")),
    ("shww", ("mdww", "mpww")),
    ("shts", ("mdts", "mdts")),
    ("swh1", ("mwd1", "mwp1")),
    ("swh2", ("mwd2", "mwp2")),
)


def supplement_surf_vars(
    names: tuple[str, ...], angles: tuple[str, ...], densities: tuple[str, ...]
) -> tuple[str, ...]:
    """The model's surface variables for raw `names`: angles as `_sin`, `_cos`, then `_density`.

    Idempotent (already supplemented names come back unchanged), because Flax rebuilds a module
    from its current fields when it clones it.
    """
    out: list[str] = []
    for name in names:
        out.extend((f"{name}_sin", f"{name}_cos") if name in angles else (name,))
        if name in densities:
            out.append(f"{name}_density")
    return tuple(dict.fromkeys(out))


def unsupplement_surf_vars(
    names: tuple[str, ...], angles: tuple[str, ...], densities: tuple[str, ...]
) -> tuple[str, ...]:
    """The raw names behind supplemented `names` (the inverse of `supplement_surf_vars`)."""
    out: list[str] = []
    for name in names:
        base, _, suffix = name.rpartition("_")
        if suffix == "density" and base in densities:
            continue
        out.append(base if suffix in ("sin", "cos") and base in angles else name)
    return tuple(dict.fromkeys(out))


def adapt_wave_checkpoint(
    state: Mapping[str, np.ndarray], patch_size: int, max_history_size: int
) -> dict[str, np.ndarray]:
    """microsoft-aurora's `_adapt_checkpoint` then `_adapt_checkpoint_wave`: the published wave
    checkpoint names the level aggregation's layer norms `k_ln` / `q_ln`, the model `ln_k` /
    `ln_q`."""
    renames = ((".k_ln.", ".ln_k."), (".q_ln.", ".ln_q."))
    out = {}
    for key, value in adapt_checkpoint(state, patch_size, max_history_size).items():
        for old, new in renames:
            key = key.replace(old, new)
        out[key] = value
    return out


def _wind_components(surf: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`surf` with wind speed `wind` and direction `dwi` (degrees, where the wind comes from)
    turned into the components `10u_wave`, `10v_wave`; unchanged without `dwi`."""
    surf = dict(surf)
    if "dwi" in surf and "wind" in surf:
        direction = jnp.deg2rad(surf.pop("dwi"))
        surf["10u_wave"] = -surf["wind"] * jnp.sin(direction)
        surf["10v_wave"] = -surf["wind"] * jnp.cos(direction)
    return surf


class AuroraWave(Aurora):
    """Aurora fine-tuned on HRES-WAM ocean wave data.

    Takes microsoft-aurora's arguments: `surf_vars` are the raw names (directions in degrees);
    `density_channel_surf_vars` and `angle_surf_vars` say which get density channels and
    sine/cosine pairs. After construction `surf_vars` holds the supplemented names the encoder
    and decoder embed, as in microsoft-aurora; `input_surf_vars` holds the raw ones. A batch may
    carry the wind direction `dwi` with `wind` instead of `10u_wave` / `10v_wave`.
    """

    surf_vars: tuple[str, ...] = WAVE_SURF_VARS
    static_vars: tuple[str, ...] = WAVE_STATIC_VARS
    lora_mode: LoRAMode = "from_second"
    stabilise_level_agg: bool = True
    density_channel_surf_vars: tuple[str, ...] = DENSITY_CHANNEL_SURF_VARS
    angle_surf_vars: tuple[str, ...] = ANGLE_SURF_VARS

    checkpoint_layout = "wave"

    def __post_init__(self) -> None:
        supplemented = supplement_surf_vars(
            tuple(self.surf_vars), self.angle_surf_vars, self.density_channel_surf_vars
        )
        object.__setattr__(self, "surf_vars", supplemented)  # frozen dataclass field
        super().__post_init__()

    @property
    def raw_surf_vars(self) -> tuple[str, ...]:
        """The surface variables as given, before supplementation."""
        return unsupplement_surf_vars(
            self.surf_vars, self.angle_surf_vars, self.density_channel_surf_vars
        )

    @property
    def output_surf_vars(self) -> tuple[str, ...]:
        """The raw names: directions and masked fields come back from their channels."""
        return self.raw_surf_vars

    @property
    def input_surf_vars(self) -> tuple[str, ...]:
        raw = self.raw_surf_vars
        return (*raw, "dwi") if {"10u_wave", "10v_wave"} <= set(raw) else raw

    def adapt_state_dict(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return adapt_wave_checkpoint(state, self.patch_size, self.max_history_size)

    def batch_transform_hook(self, batch: Batch) -> Batch:
        """Wind speed and direction to components, then NaN for absent wave systems.

        The components are split off before normalisation, which has statistics of their own.
        Absent systems are masked in data given to the model only (rollout step 0), not in its
        own predictions fed back.
        """
        surf = _wind_components(batch.surf_vars)
        given = jnp.asarray(batch.metadata.rollout_step) == 0
        for height, components in _WAVE_SYSTEMS:
            if height not in surf:
                continue
            absent = given & (surf[height] < _ABSENT_BELOW)
            for name in dict.fromkeys((height, *components)):
                if name in surf:
                    surf[name] = jnp.where(absent, jnp.nan, surf[name])
        return batch.replace(surf_vars=surf)

    def _pre_norm_hook(self, batch: Batch) -> Batch:
        """Wind speed and direction to components, as `batch_transform_hook` does (a no-op in
        the forward pass, where that hook ran first): a training target holding `dwi` is then
        compared with the predicted `10u_wave` / `10v_wave` (the Trainer's losses see prediction
        and target through this hook)."""
        return batch.replace(surf_vars=_wind_components(batch.surf_vars))

    def _pre_encoder_hook(self, batch: Batch) -> Batch:
        """NaN -> 0 plus a density channel; directions (degrees) -> sine and cosine."""
        surf = dict(batch.surf_vars)
        for name, x in batch.surf_vars.items():
            if name in self.density_channel_surf_vars and f"{name}_density" not in surf:
                surf[f"{name}_density"] = (~jnp.isnan(x)).astype(jnp.float32)
                surf[name] = jnp.nan_to_num(x, nan=0.0)
            if name in self.angle_surf_vars and not {f"{name}_sin", f"{name}_cos"} <= set(surf):
                radians = jnp.deg2rad(x)
                surf[f"{name}_sin"] = jnp.nan_to_num(jnp.sin(radians), nan=0.0)
                surf[f"{name}_cos"] = jnp.nan_to_num(jnp.cos(radians), nan=0.0)
                del surf[name]
        return batch.replace(surf_vars=surf)

    def _post_decoder_hook(self, batch: Batch, pred: Batch) -> Batch:
        """Directions back to degrees in `[0, 360)`; NaN where the density says absent or
        `wmb` says land."""
        surf = dict(pred.surf_vars)
        for name in self.angle_surf_vars:
            if f"{name}_sin" in surf and f"{name}_cos" in surf:
                angle = jnp.arctan2(surf.pop(f"{name}_sin"), surf.pop(f"{name}_cos"))
                surf[name] = jnp.rad2deg(angle) % 360
        ocean = pred.static_vars["wmb"] > 0
        for name in self.density_channel_surf_vars:
            if name in surf:
                density = jax.nn.sigmoid(surf.pop(f"{name}_density")) * ocean
                surf[name] = jnp.where(density < 0.5, jnp.nan, surf[name] * ocean)
        return pred.replace(surf_vars=surf)
