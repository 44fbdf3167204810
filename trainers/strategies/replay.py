"""Replay-buffer rollout training (Bodnar et al. 2025, Suppl. D.4): long leads at one step's cost.

The model's own predictions are kept in a host buffer and fed back later as inputs, so every
update is one forward and backward pass whatever the lead time. Each update samples one entry per
batch row (uniformly, with replacement, within a lead-time cap that grows on `max_lead_hours`),
makes one model step and scores it against the ground truth at the entry's valid time
(`Pipeline.states_at`). The prediction becomes a new entry one step further (time and
`rollout_step` advanced as in `aurora.rollout`) if its target is in the data and within the cap.
A fresh dataset batch enters every `refresh_every` updates; the buffer is first-in first-out.

Rows may come from different rollout steps, and LoRA's adapter depends on the step, so `predict`
applies the model row by row (`jax.vmap`). Buffer, RNG and update counter are checkpointed, so a
resumed run continues identically; in a run of several processes each process samples, keeps and
checkpoints its own buffer (of its own rows of the global batch). How the buffer stores its states
(shared between entries, uint16 by default, optionally spilled to disk, checkpointed
incrementally) is `trainers.strategies.replay_buffer`'s business.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from trainers.data import Example
from trainers.loss import Loss, LossConfig, LossFn
from trainers.sharding import BATCH_AXES
from trainers.strategies.base import OUTPUTS, Metrics, Strategy
from trainers.strategies.replay_buffer import Entry, ReplayBuffer
from trainers.strategies.trainable import TrainableSpec

__all__ = ["Entry", "ReplayBuffer", "ReplayStrategy"]


log = logging.getLogger(__name__)


def _rows(batch: Batch, group: str) -> list[dict[str, np.ndarray]]:
    fields = getattr(batch, group)
    n = len(np.asarray(batch.metadata.time).reshape(-1))
    return [{v: np.asarray(x[i]) for v, x in fields.items()} for i in range(n)]


def _local_rows(trainer: Any, local: int, rows: int) -> np.ndarray:
    """Which rows of a global batch of `rows` are this process's `local` rows, in its order.

    The step's outputs hold the whole global batch; each process passed its own rows, which
    `jax.make_array_from_process_local_data` placed on its devices' slices of the batch axis.
    """
    if local == rows:
        return np.arange(rows)
    sharding = jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec(BATCH_AXES))
    indices = sharding.addressable_devices_indices_map((rows,))
    mine = sorted({i for (s,) in indices.values() for i in range(*s.indices(rows))})
    if len(mine) != local:
        raise ValueError(f"{local} replay rows on this process, which holds {len(mine)}/{rows}.")
    return np.asarray(mine)


def _take(x: Any, rows: np.ndarray) -> Any:
    """`x[rows]` of a replicated step output, from this process's own copy (each process takes
    other rows, so this cannot be a global computation), before it is copied to the host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise ValueError(f"Replay needs the step's outputs replicated, not {x.sharding}.")
        x = x.addressable_data(0)
    return x if len(rows) == len(x) else x[rows]


class ReplayStrategy(Strategy):
    """One-step updates on a replay buffer of the model's own predictions; see the module docstring.

    Args:
        model: the Aurora model.
        capacity: buffer entries (FIFO beyond it).
        refresh_every: updates between fresh dataset batches (the first update always takes one).
        max_lead_hours: `(from_step, hours)` pairs: the lead-time cap from each global step on.
        step_hours: the model's time step (must match the data's).
        seed: seed of the sampling RNG (checkpointed with the buffer).
        steps: the data's rollout targets; replay needs just one (the config's `strategy.steps`).
        loss: the loss (a `Loss`, a loss function or Aurora's weights, see `Strategy`).
        stats: normalisation statistics beyond Aurora's table.
        trainable: which parameters train: "all" (default), "lora" (the adapters only, as in the
            paper's replay fine-tuning), a path predicate or a `Trainable`.
        buffer_dtype: how buffer states are stored: "uint16" (default: per-field linear codes,
            error at most 1/131068 of each field's range), "bfloat16" or "float32" (exact); see
            `trainers.strategies.replay_buffer`.
        spill_dir: a local directory for buffer states beyond `buffer_ram_gb` (a directory per
            process and buffer is made in it); None keeps them all in memory.
        buffer_ram_gb: GB of buffer states kept in memory when spilling (default 0: all on disk).
    """

    def __init__(
        self,
        model: Aurora,
        capacity: int = 200,
        refresh_every: int = 10,
        max_lead_hours: Sequence[tuple[int, float]] = ((0, 96), (5000, 240)),
        step_hours: float = 6,
        seed: int = 0,
        steps: int = 1,
        loss: Loss | LossConfig | LossFn | None = None,
        stats: dict[str, tuple[float, float]] | None = None,
        trainable: TrainableSpec = "all",
        buffer_dtype: str = "uint16",
        spill_dir: str | Path | None = None,
        buffer_ram_gb: float | None = None,
    ):
        super().__init__(model, loss, stats, trainable)
        if self.loss.lead_weights:
            raise ValueError(
                "loss.lead_weights weigh the steps of a rollout; replay makes one step per update "
                "from entries of mixed leads: leave lead_weights empty."
            )
        if steps != 1:
            raise ValueError(
                "ReplayStrategy makes one model step per update; set strategy.steps=1, "
                f"not {steps}."
            )
        if refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, not {refresh_every}.")
        self.schedule = sorted((int(s), float(h)) for s, h in max_lead_hours)
        if (
            not self.schedule
            or self.schedule[0][0] > 0
            or min(h for _, h in self.schedule) < step_hours
        ):
            raise ValueError(
                "max_lead_hours must start at step 0 and allow at least one step "
                f"({step_hours} h): {max_lead_hours}."
            )
        self.steps = 1
        self.step_hours = float(step_hours)
        self.step_minutes = round(self.step_hours * 60)
        self.refresh_every = refresh_every
        self.seed = seed
        self.buffer = ReplayBuffer(
            capacity,
            buffer_dtype,
            spill_dir,
            None if buffer_ram_gb is None else round(buffer_ram_gb * 2**30),
        )
        self.rng = np.random.default_rng(seed)
        self.updates = 0  # training steps taken (micro-batches), for `refresh_every`
        self.batch_size: int | None = None  # rows per update: the dataset batches' size
        self._pending: list[Entry] = []
        self._data: Any = None
        self.checkpoint_bytes = 0  # state bytes the last checkpoint wrote

    # --- the lead-time cap ------------------------------------------------------------------------
    def max_lead_hours(self, step: int) -> float:
        """The lead-time cap in hours at global step `step`."""
        return [h for s, h in self.schedule if s <= step][-1]

    def max_lead_steps(self, step: int) -> int:
        """The lead-time cap in model steps at global step `step`."""
        return int(self.max_lead_hours(step) // self.step_hours)

    # --- host side --------------------------------------------------------------------------------
    def train_examples(
        self, trainer: Any, iterator: Iterable[Example], data: Any
    ) -> Iterator[Example]:
        """Buffer samples; a fresh dataset batch enters every `refresh_every` updates.

        Args:
            trainer: gives the global step (for the lead-time cap).
            iterator: the training data's examples, read only when a fresh batch enters.
            data: the training data, read by valid time (`states_at`, `has_times`).

        Returns:
            Examples `(inputs, [target])`, until `iterator` is exhausted.
        """
        if not all(hasattr(data, a) for a in ("states_at", "has_times")):
            raise TypeError(
                "ReplayStrategy reads ground truth by valid time, which "
                f"{type(data).__name__} cannot do: train with a data_builders.pipeline.Pipeline "
                "(or anything with states_at / has_times)."
            )
        self._data = data
        iterator = iter(iterator)
        while True:
            if self.updates % self.refresh_every == 0 or not len(self.buffer):
                try:
                    self.add_fresh(next(iterator))
                except StopIteration:
                    return
            yield self.sample(trainer.global_step)

    def add_fresh(self, example: Example) -> None:
        """A dataset example's inputs enter the buffer, one entry per row.

        Args:
            example: `(inputs, targets)` from the data; the inputs are cropped as the model crops,
                so that they stack with the predictions.
        """
        inputs = example[0].crop(self.model.patch_size)
        times = np.asarray(inputs.metadata.time, np.int64).reshape(-1)
        step = int(np.asarray(inputs.metadata.rollout_step).reshape(-1)[0])
        for surf, atmos, time in zip(
            _rows(inputs, "surf_vars"), _rows(inputs, "atmos_vars"), times, strict=True
        ):
            self.buffer.push_history(surf, atmos, int(time), step, int(time) + self.step_minutes)
        self.batch_size = len(times)

    def sample(self, global_step: int) -> Example:
        """A training example drawn from the buffer.

        Args:
            global_step: the trainer's step (for the lead-time cap).

        Returns:
            `(inputs, [target])`: one entry per row; each row's target is the truth at its
            entry's target time.
        """
        self._pending = self.buffer.sample(
            self.rng, self.batch_size or 1, self.max_lead_steps(global_step)
        )
        truth = self._data.states_at([e.target_time * 60 for e in self._pending]).crop(
            self.model.patch_size
        )
        steps = np.array([e.rollout_step for e in self._pending], np.int32)
        surf, atmos = self.buffer.layout.unpack(
            np.stack([np.stack([self.buffer.state(n) for n in e.states]) for e in self._pending])
        )
        inputs = Batch(
            surf_vars=surf,
            static_vars=truth.static_vars,
            atmos_vars=atmos,
            metadata=truth.metadata.replace(
                time=np.array([e.time for e in self._pending], np.int32), rollout_step=steps
            ),
        )
        target = truth.replace(metadata=truth.metadata.replace(rollout_step=steps + 1))
        return inputs, [target]

    def on_step_outputs(self, trainer: Any, outputs: Any) -> None:
        """Push each row's prediction back as an entry one step further (if within the cap).

        Args:
            trainer: gives the global step (for the lead-time cap).
            outputs: `loss_fn`'s `metrics[OUTPUTS]`: predicted `surf` `{v: (b, 1, h, w)}`,
                `atmos` `{v: (b, 1, levels, h, w)}`, `time` `(b,)`, `rollout_step` `(b,)`.
        """
        rows = _local_rows(trainer, len(self._pending), len(outputs["time"]))
        pred = jax.device_get(jax.tree_util.tree_map(lambda x: _take(x, rows), outputs))
        cap = self.max_lead_steps(trainer.global_step)
        children = []  # (parent, row, time, rollout_step)
        for i, parent in enumerate(self._pending):
            time, step = int(pred["time"][i]), int(pred["rollout_step"][i])
            if step + 1 <= cap:  # the child's lead, `Entry.lead_steps`
                children.append((parent, i, time, step))
        targets = [(time + self.step_minutes) * 60 for _, _, time, _ in children]
        present = self._data.has_times(targets) if children else []
        self.buffer.push_children(
            [
                (
                    parent,
                    {v: x[i, 0] for v, x in pred["surf"].items()},
                    {v: x[i, 0] for v, x in pred["atmos"].items()},
                    time,
                    step,
                    time + self.step_minutes,
                )
                for (parent, i, time, step), ok in zip(children, present, strict=True)
                if ok
            ]
        )
        self._pending = []
        self.updates += 1

    def host_metrics(self) -> dict[str, float]:
        return {"replay/buffer_size": float(len(self.buffer))}

    def host_state(self) -> dict[str, Any]:
        """This process's sampling state, JSON-serialisable (checkpointed with its buffer)."""
        return {
            "updates": self.updates,
            "batch_size": self.batch_size,
            "rng": self.rng.bit_generator.state,
        }

    def state_dict(self) -> dict[str, Any]:
        """What all processes share; each one's buffer and RNG go with `save_process_state`."""
        return {"updates": self.updates, "replay_processes": jax.process_count()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.updates = int(state["updates"])

    def _store(self, directory: Path) -> Path:
        return Path(directory) / "replay" / f"process_{jax.process_index()}"

    def save_process_state(self, directory: Path, step: int) -> None:
        """This process's buffer, incrementally, and sampling state under
        `<directory>/replay/process_<i>/` (`ReplayBuffer.save`)."""
        self.checkpoint_bytes = self.buffer.save(self._store(directory), step, self.host_state())

    def prune_process_state(self, directory: Path, steps: Iterable[int]) -> None:
        store = self._store(directory)
        if (store / "index").is_dir():
            ReplayBuffer.prune(store, steps)

    def load_process_state(self, directory: Path, step: int, shared: dict[str, Any]) -> None:
        """This process's buffer and sampling state of checkpoint `step`; a process the
        checkpoint's run did not have (or a checkpoint without replay) starts with an empty
        buffer."""
        store, saved = self._store(directory), int(shared.get("replay_processes", 0))
        if jax.process_index() >= saved:
            if saved:
                log.warning("No replay buffer of this process in %s; it starts empty.", store)
            self.buffer.clear()
            return
        index = self.buffer.restore(store, step)
        self.updates, self.batch_size = int(index["updates"]), index["batch_size"]
        self.rng.bit_generator.state = index["rng"]
        if jax.process_index() == 0 and jax.process_count() < saved:
            log.warning(
                "The checkpoint holds %d processes' replay buffers; those of processes %d.. are "
                "not restored.",
                saved,
                jax.process_count(),
            )

    # --- pure, jitted by the trainer --------------------------------------------------------------
    def predict(self, params: Any, batch: Batch) -> Batch:
        """One model step; rows with their own `rollout_step` are applied one by one (`jax.vmap`).

        Args:
            params: the model parameters.
            batch: fields `(b, 2, ...)`; `metadata.rollout_step` a scalar or `(b,)`.

        Returns:
            The prediction, fields `(b, 1, ...)`, with time and `rollout_step` advanced.
        """
        meta = batch.metadata
        if jnp.ndim(meta.rollout_step) == 0:
            return super().predict(params, batch)

        def one(surf: dict, atmos: dict, time: jax.Array, step: jax.Array) -> Batch:
            row = batch.replace(
                surf_vars={k: v[None] for k, v in surf.items()},
                atmos_vars={k: v[None] for k, v in atmos.items()},
                metadata=meta.replace(time=time[None], rollout_step=step),
            )
            return self.apply_model(params, row)

        out = jax.vmap(one)(
            batch.surf_vars,
            batch.atmos_vars,
            jnp.asarray(meta.time),
            jnp.asarray(meta.rollout_step),
        )
        first = lambda x: x[:, 0]
        return out.replace(
            surf_vars={k: first(v) for k, v in out.surf_vars.items()},
            atmos_vars={k: first(v) for k, v in out.atmos_vars.items()},
            static_vars={k: v[0] for k, v in out.static_vars.items()},
            metadata=out.metadata.replace(
                time=first(out.metadata.time), rollout_step=out.metadata.rollout_step
            ),
        )

    def loss_fn(
        self, params: Any, inputs: Batch, targets: Batch, controls: dict[str, Any]
    ) -> tuple[jax.Array, Metrics]:
        """One step against each entry's target; the prediction goes back to the host.

        Args:
            params: the model parameters.
            inputs: the sampled entries, fields `(b, 2, ...)`, `rollout_step` `(b,)`.
            targets: one target on a leading axis, fields `(1, b, 1, ...)`.
            controls: unused.

        Returns:
            The loss and metrics (the MAEs, `lead_hours`, and the prediction under `OUTPUTS`).
        """
        pred = self.predict(params, inputs)
        target = jax.tree_util.tree_map(lambda x: x[0], targets)
        loss, terms = self.step_loss(pred, target)
        lead = jnp.asarray(pred.metadata.rollout_step, jnp.float32) * self.step_hours
        outputs = jax.lax.stop_gradient(
            {
                "surf": pred.surf_vars,
                "atmos": pred.atmos_vars,
                "time": pred.metadata.time,
                "rollout_step": pred.metadata.rollout_step,
            }
        )
        return loss, {**terms, "lead_hours": jnp.mean(lead), OUTPUTS: outputs}
