"""Per-sample lead times as data (microsoft-aurora's `variable_lead_time`).

With a fixed time step the lead-time encoding is a host constant (:mod:`aurora.model.fourier`).
When the lead time varies per sample (Aurora 1.5's sub-6-hour steps), it is a traced `(B,)` array,
so one compiled step serves every lead time. The encoding is the same Fourier expansion, computed
from whole minutes with exact phases by :func:`aurora.model.time_encoding.minutes_encoding`; it
matches the reference's float64 expansion up to the final float32 rounding. The reference's range
check on lead times cannot run inside `jit` and is not made.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from aurora.model.fourier import lead_time_expansion, lead_time_expansion_v3
from aurora.model.time_encoding import minutes_encoding

__all__ = ["lead_time_encoding", "lead_time_minutes"]


def lead_time_minutes(lead_times_hours: jax.Array | float, batch_size: int) -> jax.Array:
    """Lead times in hours (a scalar or `(B,)`, like the reference's `lead_times`) as int32
    minutes of shape `(B,)`; lead times are whole minutes, like Aurora's times."""
    hours = jnp.broadcast_to(jnp.asarray(lead_times_hours, jnp.float32), (batch_size,))
    return jnp.round(hours * 60).astype(jnp.int32)


def lead_time_encoding(minutes: jax.Array, dim: int, updated: bool = False) -> jax.Array:
    """The lead-time expansion of `(B,)` int32 minutes, float32 of shape `(B, dim)`.

    `updated` selects `lead_time_expansion_v3` (`use_updated_lead_time_embedding`), whose sine
    of the largest wavelength is replaced by the linear feature `hours / upper`, in float32 as
    in the reference.
    """
    expansion = lead_time_expansion_v3 if updated else lead_time_expansion
    encoding = minutes_encoding(minutes, dim, expansion.lower, expansion.upper)
    if expansion.linear_last_sine:
        hours = minutes.astype(jnp.float32) / np.float32(60)
        encoding = encoding.at[:, dim // 2 - 1].set(hours / np.float32(expansion.upper))
    return encoding
