"""The `scaled_*` variables: precipitation, snowfall and snow depth seen through a logarithm.

Aurora 1.5 (microsoft-aurora's `normalisation.log_transform`) feeds heavy-tailed, non-negative
fields as `log(x + eps) - log(eps)` with `eps = 1e-3`, so that zero stays zero and rare extremes do
not dominate; the normalisation statistics of `scaled_*` variables are those of the transformed
values. The data hold the physical amounts (metres of water, or of water equivalent, as ECMWF
archives them) under the `scaled_*` name: the model transforms them before normalising and
transforms its predictions back after unnormalising.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LOG_TRANSFORM_EPS", "log_transform", "log_transformed", "log_untransform"]

LOG_TRANSFORM_EPS = 1e-3

_PREFIX = "scaled_"


def log_transformed(names: tuple[str, ...]) -> tuple[str, ...]:
    """The variables among `names` that are log-transformed: microsoft-aurora's naming rule."""
    return tuple(v for v in names if v.startswith(_PREFIX))


def log_transform(x: jax.Array) -> jax.Array:
    """`log(x + eps) - log(eps)`: zero maps to zero."""
    return jnp.log(x + np.float32(LOG_TRANSFORM_EPS)) - np.float32(np.log(LOG_TRANSFORM_EPS))


def log_untransform(x: jax.Array) -> jax.Array:
    """The inverse of `log_transform`, `eps * (exp(x) - 1)` (in float32 at least)."""
    return np.float32(LOG_TRANSFORM_EPS) * (jnp.exp(x) - 1)
