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
resumed run continues identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from aurora.batch import Batch
from aurora.model.aurora import Aurora
from trainers.data import Example
from trainers.loss import Loss, LossConfig, LossFn
from trainers.strategies.base import OUTPUTS, Metrics, Strategy
from trainers.strategies.trainable import TrainableSpec

__all__ = ["Entry", "ReplayBuffer", "ReplayStrategy"]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One buffer entry: an input history and the time its prediction is scored at.

    Fields are host numpy arrays without a batch dimension: `surf[v]` `(2, h, w)`,
    `atmos[v]` `(2, levels, h, w)`. Times are minutes since 1970 (as `Metadata.time`).
    """

    surf: dict[str, np.ndarray]
    atmos: dict[str, np.ndarray]
    time: int
    rollout_step: int
    target_time: int

    @property
    def lead_steps(self) -> int:
        """Model steps from the dataset state to this entry's prediction."""
        return self.rollout_step + 1


class ReplayBuffer:
    """A first-in first-out buffer of `Entry`s with uniform sampling with replacement."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"The replay buffer needs capacity >= 1, not {capacity}.")
        self.capacity = capacity
        self.entries: list[Entry] = []

    def __len__(self) -> int:
        return len(self.entries)

    def push(self, entry: Entry) -> None:
        """Add `entry`, evicting the oldest entries beyond `capacity`."""
        self.entries.append(entry)
        del self.entries[: max(0, len(self.entries) - self.capacity)]

    def sample(self, rng: np.random.Generator, n: int, max_lead_steps: int) -> list[Entry]:
        """Draw entries uniformly with replacement among those within the lead-time cap.

        Args:
            rng: the sampling RNG (advanced).
            n: entries to draw.
            max_lead_steps: the cap on `Entry.lead_steps`.

        Returns:
            `n` entries.
        """
        eligible = [e for e in self.entries if e.lead_steps <= max_lead_steps]
        if not eligible:
            raise RuntimeError(
                f"No replay entry within the lead-time cap of {max_lead_steps} steps."
            )
        return [eligible[i] for i in rng.integers(0, len(eligible), size=n)]

    # --- checkpointing: an index in JSON, the fields as arrays ------------------------------------
    def index(self) -> list[dict[str, int]]:
        """The entries' times and rollout steps, JSON-serialisable, in buffer order."""
        return [
            {"time": e.time, "rollout_step": e.rollout_step, "target_time": e.target_time}
            for e in self.entries
        ]

    def arrays(self) -> dict[str, Any]:
        """The entries' fields stacked in buffer order: `{"surf": {v: (n, 2, h, w)}, "atmos":
        {v: (n, 2, levels, h, w)}}` (empty for an empty buffer)."""
        if not self.entries:
            return {}
        first = self.entries[0]
        return {
            "surf": {v: np.stack([e.surf[v] for e in self.entries]) for v in first.surf},
            "atmos": {v: np.stack([e.atmos[v] for e in self.entries]) for v in first.atmos},
        }

    def restore(self, index: Sequence[dict[str, int]], arrays: dict[str, Any]) -> None:
        """Replace the entries with those of a checkpoint (`index()` and `arrays()` output)."""
        surf, atmos = arrays.get("surf", {}), arrays.get("atmos", {})
        for name, stacked in [*surf.items(), *atmos.items()]:
            if len(stacked) != len(index):
                raise ValueError(
                    f"Replay checkpoint: {len(stacked)} saved {name} fields for "
                    f"{len(index)} entries."
                )
        self.entries = [
            Entry(
                surf={v: np.asarray(x[i]) for v, x in surf.items()},
                atmos={v: np.asarray(x[i]) for v, x in atmos.items()},
                time=int(e["time"]),
                rollout_step=int(e["rollout_step"]),
                target_time=int(e["target_time"]),
            )
            for i, e in enumerate(index)
        ]


def _rows(batch: Batch, group: str) -> list[dict[str, np.ndarray]]:
    fields = getattr(batch, group)
    n = len(np.asarray(batch.metadata.time).reshape(-1))
    return [{v: np.asarray(x[i]) for v, x in fields.items()} for i in range(n)]


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
        self.buffer = ReplayBuffer(capacity)
        self.rng = np.random.default_rng(seed)
        self.updates = 0  # training steps taken (micro-batches), for `refresh_every`
        self.batch_size: int | None = None  # rows per update: the dataset batches' size
        self._pending: list[Entry] = []
        self._data: Any = None
        self._saved_index: list[dict[str, int]] = []

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
            self.buffer.push(Entry(surf, atmos, int(time), step, int(time) + self.step_minutes))
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
        inputs = Batch(
            surf_vars={
                v: np.stack([e.surf[v] for e in self._pending]) for v in self._pending[0].surf
            },
            static_vars=truth.static_vars,
            atmos_vars={
                v: np.stack([e.atmos[v] for e in self._pending]) for v in self._pending[0].atmos
            },
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
        pred = jax.device_get(outputs)
        cap = self.max_lead_steps(trainer.global_step)
        children = []
        for i, parent in enumerate(self._pending):
            time, step = int(pred["time"][i]), int(pred["rollout_step"][i])
            child = Entry(
                surf={v: np.stack([parent.surf[v][1], pred["surf"][v][i, 0]]) for v in parent.surf},
                atmos={
                    v: np.stack([parent.atmos[v][1], pred["atmos"][v][i, 0]]) for v in parent.atmos
                },
                time=time,
                rollout_step=step,
                target_time=time + self.step_minutes,
            )
            children.append(child)
        wanted = [c for c in children if c.lead_steps <= cap]
        present = self._data.has_times([c.target_time * 60 for c in wanted]) if wanted else []
        for child, ok in zip(wanted, present, strict=True):
            if ok:
                self.buffer.push(child)
        self._pending = []
        self.updates += 1

    def host_metrics(self) -> dict[str, float]:
        return {"replay/buffer_size": float(len(self.buffer))}

    def state_dict(self) -> dict[str, Any]:
        return {
            "updates": self.updates,
            "batch_size": self.batch_size,
            "rng": self.rng.bit_generator.state,
            "entries": self.buffer.index(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.updates = int(state["updates"])
        self.batch_size = state.get("batch_size")
        self.rng.bit_generator.state = state["rng"]
        self._saved_index = list(state["entries"])

    def array_state(self) -> dict[str, Any]:
        return self.buffer.arrays()

    def load_array_state(self, arrays: dict[str, Any]) -> None:
        if self._saved_index and not arrays:
            raise ValueError(
                "The checkpoint lists replay entries but holds no replay arrays "
                "(no 'strategy' item)."
            )
        self.buffer.restore(self._saved_index, arrays)

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
            return self.model.apply({"params": params}, row)

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
        loss, terms = self.loss(pred, target, self.stats)
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
