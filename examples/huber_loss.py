"""A user-written loss: latitude-weighted Huber on normalised variables, named in the config::

    config.loss.name = "examples.huber_loss:latitude_weighted_huber"
    config.loss.kwargs = {"delta": 0.5}

A loss is a plain function of one lead step (`trainers.loss.LossFn`); the strategies call it for
every rollout step and weigh the steps by `config.loss.lead_weights`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from aurora.batch import Batch
from aurora.normalisation import Stats
from trainers.loss import latitude_weights


def latitude_weighted_huber(
    pred: Batch, target: Batch, stats: Stats | None = None, *, delta: float = 1.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The mean over variables of the `cos(lat)`-weighted Huber loss (quadratic within `delta`
    normalised units, linear beyond), with `huber/<var>` per variable."""
    p, t = pred.normalise(stats), target.normalise(stats)
    lat = latitude_weights(pred.metadata.lat)  # (h, 1), mean 1
    pairs = [(v, p.surf_vars[v], t.surf_vars[v]) for v in p.surf_vars]
    pairs += [(v, p.atmos_vars[v], t.atmos_vars[v]) for v in p.atmos_vars]
    terms = {f"huber/{v}": jnp.mean(lat * optax.huber_loss(a, b, delta=delta)) for v, a, b in pairs}
    return jnp.mean(jnp.stack(list(terms.values()))), terms
