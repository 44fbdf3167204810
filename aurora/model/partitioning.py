"""Activation sharding: keep activations split by rows over the batch axes of the mesh in context.

Under FSDP the parameters are sharded along their largest dimension, and XLA's sharding propagation
carries a kernel's sharding into the activation a `Dense` produces (e.g. along the heads of a
`q` projection). A reshape that then splits or merges that dimension (heads, 2x2 patch splitting)
has no efficient way back to the batch sharding, so XLA replicates the whole activation on every
device and re-splits it ("Involuntary full rematerialization"). Pinning those activations to the
batch sharding (rows over `BATCH_AXES`, every other dimension whole) makes XLA all-gather the
parameters instead, which is what FSDP intends.

The model does not know the mesh: the Trainer traces its steps inside
`jax.sharding.use_abstract_mesh(mesh.abstract_mesh)` (`trainers.sharding.in_mesh`), and without a
mesh in context (one device, `pmap`, inference) every function here is the identity.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import PartitionSpec as P

__all__ = ["BATCH_AXES", "row_shards", "shard_rows"]

BATCH_AXES = ("data", "fsdp")
"""Mesh axes the batch dimension is split over (every device holds different rows)."""


def row_shards() -> int:
    """How many ways the mesh in context splits the rows (1 without a mesh with `BATCH_AXES`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def shard_rows(x: jax.Array, axis: int = 0) -> jax.Array:
    """`x` with its `axis` split over `BATCH_AXES` and every other dimension whole.

    The identity without a mesh in context, or when the rows do not divide evenly (XLA then keeps
    whatever sharding it propagates).
    """
    shards = row_shards()
    if shards == 1 or x.shape[axis] % shards:
        return x
    return jax.lax.with_sharding_constraint(x, P(*([None] * axis), BATCH_AXES))
