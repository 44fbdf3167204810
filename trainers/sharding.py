"""Sharding: one `Mesh` with axes `data` and `fsdp`, partition rules, and multi-host start-up.

JAX's own machinery does the parallel work: the Trainer jits its step with `NamedSharding`s for the
state and the batch, and XLA inserts the collectives. This module only decides *where* each array
lives:

* **Mesh** (`make_mesh`): devices arranged as `(data, fsdp)`; a size of -1 takes the devices left
  over. `(n, 1)` is pure data parallelism, `(1, n)` pure FSDP (ZeRO-3), anything between both.
* **Batch** (`batch_shardings`): the batch dimension is split over *both* axes, so every device
  holds a different slice of the global batch (FSDP devices are data-parallel too, as in ZeRO).
  Static variables and scalars are replicated.
* **State** (`state_shardings`): every leaf of the `TrainState` (parameters and the optimiser's
  moments alike, since Adam's moments have the parameters' shapes) follows the same rule: regex
  overrides from the config first (matched against the leaf's path, e.g.
  `params/backbone/.../qkv/kernel`), else FSDP (shard the largest dimension divisible by the `fsdp`
  axis size, for leaves of at least `min_shard_size` elements), else replicated. The state is
  created in these shardings (`jit_init`): never whole on one device or one host.

Multi-host: `initialize_distributed` calls `jax.distributed.initialize()` when the config names a
coordinator or JAX's own cluster detection finds several processes (SLURM, Open MPI, Kubernetes,
Cloud TPU pods; `detect_cluster`); each process then reads only its own share of the data
(`data_builders.pipeline` shards by process) and the Trainer assembles global arrays from
process-local batches (`jax.make_array_from_process_local_data`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from aurora.model import partitioning

__all__ = [
    "AXES",
    "BATCH_AXES",
    "batch_shardings",
    "detect_cluster",
    "example_shardings",
    "in_mesh",
    "initialize_distributed",
    "jit_init",
    "leaf_spec",
    "make_mesh",
    "path_name",
    "put_state",
    "shard_batch",
    "state_shardings",
]

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")
BATCH_AXES = partitioning.BATCH_AXES  # the batch dimension is split over every device

Rule = tuple[str, Sequence[str | None]]
"""`(regex, spec)`: leaves whose path matches `regex` get `PartitionSpec(*spec)`."""


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `(data, fsdp)` mesh over `devices` (default: all, across every process); -1 fills."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp]
    if sizes.count(-1) > 1:
        raise ValueError(f"At most one mesh axis may be -1, got data={data}, fsdp={fsdp}.")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if known <= 0 or n % known:
            raise ValueError(f"{n} devices cannot be split into data={data} x fsdp={fsdp}.")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"Mesh data={sizes[0]} x fsdp={sizes[1]} = {math.prod(sizes)} devices, "
            f"but there are {n}."
        )
    grid = np.asarray(devices, dtype=object).reshape(sizes)
    return Mesh(grid, AXES)


def path_name(path: tuple[Any, ...]) -> str:
    """A key path as `a/b/c` (dict keys, attribute names, indices)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_spec(
    name: str,
    shape: tuple[int, ...],
    mesh: Mesh,
    rules: Sequence[Rule] = (),
    min_shard_size: int = 2**18,
) -> P:
    """The `PartitionSpec` of one state leaf (see the module docstring)."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            spec = tuple(spec)
            if len(spec) > len(shape):
                raise ValueError(
                    f"Sharding rule {pattern!r} gives {spec} for {name} of shape {shape}."
                )
            return P(*spec)
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1 or math.prod(shape) < min_shard_size:
        return P()
    candidates = [i for i in np.argsort(shape)[::-1] if shape[i] % fsdp == 0]
    if not candidates:
        return P()
    spec: list[str | None] = [None] * len(shape)
    spec[int(candidates[0])] = "fsdp"
    return P(*spec)


def state_shardings(
    state: Any, mesh: Mesh, rules: Sequence[Rule] = (), min_shard_size: int = 2**18
) -> Any:
    """A pytree of `NamedSharding`s matching `state` (arrays or shape structs)."""

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, leaf_spec(path_name(path), shape, mesh, rules, min_shard_size))

    return jax.tree_util.tree_map_with_path(one, state)


def jit_init(
    init: Callable[..., Any],
    *args: Any,
    mesh: Mesh,
    rules: Sequence[Rule] = (),
    min_shard_size: int = 2**18,
) -> tuple[Any, Any]:
    """`init` jitted to build its result directly in the state's shardings, and those shardings.

    The result's shapes come from tracing `init` (`jax.eval_shape`), its shardings from
    `state_shardings`; `jax.jit(init, out_shardings=...)` then has every device compute only its own
    shards (random initialisers included: JAX's threefry is partitionable), so no device and no
    host ever holds the whole state. For Aurora 1.3B with AdamW that is ~15 GiB which FSDP over 8
    devices turns into ~2 GiB each, at initialisation as in every step.

    Args:
        init: a pure function of `args` returning the state (e.g. `Strategy.init_state` with its
            batch and optimiser bound). Arrays it closes over become constants of the program.
        args: its arguments as they will be passed (placed on the mesh already, if large).
        mesh: the device mesh.
        rules, min_shard_size: as for `state_shardings`.

    Returns:
        `(fn, shardings)`: call `fn(*args)` for the state.
    """
    abstract = jax.eval_shape(init, *args)
    shardings = state_shardings(abstract, mesh, rules, min_shard_size)
    return jax.jit(init, out_shardings=shardings), shardings


def in_mesh(fn: Callable[..., Any], mesh: Mesh) -> Callable[..., Any]:
    """`fn` traced with `mesh` in context, so that the model's activation sharding hints
    (`aurora.model.partitioning`) keep activations split by rows over the batch axes."""

    @functools.wraps(fn)
    def traced(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return traced


def put_state(state: Any, shardings: Any) -> Any:
    """Place a (host or single-device) state on the mesh; every process holds the same values."""

    def put(sharding: NamedSharding, x: Any) -> jax.Array:
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, shardings, state)


def _batch_spec(leaf: Any, batch_axis: int, rows: int) -> P:
    shape = np.shape(leaf)
    if len(shape) > batch_axis and shape[batch_axis] == rows:
        return P(*([None] * batch_axis), BATCH_AXES)
    return P()


def example_shardings(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """`NamedSharding`s for one `Batch` whose rows lie on `batch_axis`: every field that carries the
    rows is split over the data axes; static fields and scalars are replicated."""
    rows = int(np.shape(batch.metadata.time)[batch_axis])
    static = list(batch.static_vars.values())

    def leaf(x: Any) -> NamedSharding:
        return NamedSharding(
            mesh, P() if any(x is s for s in static) else _batch_spec(x, batch_axis, rows)
        )

    return jax.tree_util.tree_map(leaf, batch)


def batch_shardings(batch: Any, mesh: Mesh) -> Any:
    """`NamedSharding`s for a Trainer batch `(inputs, stacked targets)` (this process's rows).

    Inputs carry the batch on axis 0 (fields `(b, t, ...)`, `time` `(b,)`), stacked targets on
    axis 1 (`(K, b, ...)`); static fields and scalars are replicated. The global batch, this
    process's rows times the number of processes, must split evenly over the mesh.
    """
    inputs, targets = batch
    rows = int(np.shape(inputs.metadata.time)[0])
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if (rows * jax.process_count()) % shards:
        raise ValueError(
            f"The global batch of {rows * jax.process_count()} rows cannot be split over {shards} "
            f"devices (data x fsdp); make the global batch size a multiple of {shards}."
        )
    return example_shardings(inputs, mesh, 0), example_shardings(targets, mesh, 1)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host batch -> global arrays on the mesh.

    With one process the batch is the global batch; with several, each process passes its own rows
    (the pipeline shards by process) and `jax.make_array_from_process_local_data` assembles them.
    """
    shardings = batch_shardings(batch, mesh)
    return jax.tree_util.tree_map(
        lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)), shardings, batch
    )


def detect_cluster() -> tuple[str, int] | None:
    """The cluster that `jax.distributed.initialize()` would find here, and its process count.

    JAX's own detection, in its own order (SLURM, Open MPI, Kubernetes with the `kubernetes`
    package, Cloud TPU VMs and GKE TPU pods, and any environment a plugin registers); the opt-in
    ones (mpi4py) only when asked for by name. JAX has no public API for it, so this reads
    `jax._src.clusters`; a JAX without it detects nothing (explicit flags still work).

    Returns:
        `(environment name, process count)`, or None outside a cluster, or where the environment
        is present but cannot say how many processes it has (e.g. a Kubernetes pod outside a Job).
    """
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # pragma: no cover - a future JAX
        return None
    for env in ClusterEnv._cluster_types:
        if env.opt_in_only_method:
            continue
        try:
            if not env.is_env_present():
                continue
            return env.__name__, int(env.get_process_count())
        except Exception as e:  # present but unusable: say so, run as one process
            log.warning("%s detected but not usable for jax.distributed: %s", env.__name__, e)
            return None
    return None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "auto",
) -> bool:
    """Start JAX's multi-controller runtime when this process is one of several.

    `mode="auto"`: when a coordinator is named (`coordinator_address`, config `distributed.*`, or
    `$JAX_COORDINATOR_ADDRESS`), or when JAX's cluster detection (`detect_cluster`) finds a cluster
    of more than one process; a single-task SLURM job or a lone pod runs without it. `"always"`:
    initialise regardless (JAX fills in what is not given, or fails saying what is missing);
    `"never"`: run as an independent process. Must run before any other JAX call that touches
    devices.

    Returns:
        Whether `jax.distributed` is initialised.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"distributed.initialize must be auto, always or never, not {mode!r}.")
    if mode == "never":
        return False
    if jax.distributed.is_initialized():
        return True
    named = coordinator_address is not None or "JAX_COORDINATOR_ADDRESS" in os.environ
    if mode == "auto" and not named:
        cluster = detect_cluster()
        if cluster is None or cluster[1] <= 1:
            return False
        log.info("%s: %d processes, starting jax.distributed", *cluster)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
    log.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
