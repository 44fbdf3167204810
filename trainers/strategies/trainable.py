"""Which parameters train, and with which optimiser: a property any strategy takes.

A `Trainable` sorts parameter leaves, by their path, into named optimiser groups; leaves of no
group are frozen. Each group gets AdamW from `trainers.optim.make_optimizer` with its own learning
rate (and any optimiser config field prefixed with the group's `prefix`, e.g. `lora_warmup_steps`).
Frozen leaves get `optax.set_to_zero()` inside `optax.multi_transform`, so the optimiser holds no
state for them, and reach the loss through `stop_gradient`, so their weight gradients are never
formed. `Trainable.all()` (the default) is one plain optimiser over everything.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax

from trainers.optim import clip_gradients, make_optimizer

__all__ = [
    "FROZEN",
    "LORA_LEAVES",
    "KeyPath",
    "ParamGroup",
    "Trainable",
    "TrainableSpec",
    "is_lora_path",
    "key_names",
]

KeyPath = tuple[str, ...]
Params = Any

FROZEN = "frozen"
"""The label of leaves that no group trains."""

LORA_LEAVES = ("lora_A", "lora_B")
"""Names of the adapter parameters (`aurora.model.lora.LoRARollout`)."""


def key_names(path: tuple[Any, ...]) -> KeyPath:
    """A `jax.tree_util` key path as plain names (dict keys, attribute names, indices).

    Args:
        path: the key path `jax.tree_util.tree_map_with_path` passes.

    Returns:
        The names as strings, e.g. `("encoder", "lora_qkv", "lora_A")`.
    """
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def is_lora_path(path: KeyPath) -> bool:
    """Whether a parameter path names an adapter leaf (`.../lora_qkv/lora_A` and the like)."""
    return bool(path) and path[-1] in LORA_LEAVES


def _everything(path: KeyPath) -> bool:
    return True


def _not_lora(path: KeyPath) -> bool:
    return not is_lora_path(path)


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """One optimiser group.

    Attributes:
        name: the group's label (not "frozen").
        match: which parameter paths belong to it (the first matching group of a `Trainable` wins).
        prefix: optimiser config fields `<prefix><field>` override `<field>` for this group.
        learning_rate: the group's peak learning rate; None: the (prefixed) config's.
    """

    name: str
    match: Callable[[KeyPath], bool]
    prefix: str = ""
    learning_rate: float | None = None


@dataclasses.dataclass(frozen=True)
class Trainable:
    """Which parameter leaves train, in which optimiser groups; leaves of no group are frozen.

    Build it with `Trainable.all()`, `Trainable.lora(...)`, `Trainable.where(predicate)`, or from
    a strategy's `trainable` argument with `Trainable.of`.
    """

    groups: tuple[ParamGroup, ...]

    def __post_init__(self) -> None:
        names = [g.name for g in self.groups]
        if not names or FROZEN in names or len(set(names)) != len(names):
            raise ValueError(f"Need distinct parameter group names other than {FROZEN!r}: {names}")

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def all(cls, learning_rate: float | None = None) -> Trainable:
        """Every parameter trains with one optimiser (the config's, or this learning rate)."""
        return cls((ParamGroup("all", _everything, learning_rate=learning_rate),))

    @classmethod
    def lora(
        cls,
        learning_rate: float | None = None,
        *,
        train_base: bool = False,
        base_learning_rate: float | None = None,
    ) -> Trainable:
        """The LoRA adapters train (optimiser fields `lora_*`); the base is frozen or trains too.

        Args:
            learning_rate: the adapters' peak learning rate; default the optimiser config's
                `lora_learning_rate`, else its `learning_rate`.
            train_base: also train every other parameter (optimiser fields `base_*`).
            base_learning_rate: the base's peak learning rate; default the optimiser config's
                `base_learning_rate`, else its `learning_rate`.

        Returns:
            Groups "lora" and, with `train_base`, "base".
        """
        groups = [ParamGroup("lora", is_lora_path, "lora_", learning_rate)]
        if train_base:
            groups.append(ParamGroup("base", _not_lora, "base_", base_learning_rate))
        return cls(tuple(groups))

    @classmethod
    def where(
        cls, predicate: Callable[[KeyPath], bool], learning_rate: float | None = None
    ) -> Trainable:
        """The leaves whose path satisfies `predicate` train; the rest is frozen."""
        return cls((ParamGroup("trained", predicate, learning_rate=learning_rate),))

    @classmethod
    def of(cls, spec: Trainable | str | Callable[[KeyPath], bool]) -> Trainable:
        """A strategy's `trainable` argument as a `Trainable`.

        Args:
            spec: a `Trainable`; "all"; "lora" (adapters only); or a predicate over parameter
                paths (tuples of names, e.g. `("decoder", "head", "kernel")`).

        Returns:
            The `Trainable` it names.
        """
        if isinstance(spec, Trainable):
            return spec
        if spec == "all":
            return cls.all()
        if spec == "lora":
            return cls.lora()
        if callable(spec):
            return cls.where(spec)
        raise ValueError(
            f"trainable must be 'all', 'lora', a predicate over parameter paths or a Trainable, "
            f"not {spec!r}."
        )

    # --- properties -------------------------------------------------------------------------------
    @property
    def is_everything(self) -> bool:
        """Whether this is one group over every leaf: a plain optimiser, nothing frozen."""
        return len(self.groups) == 1 and self.groups[0].match is _everything

    @property
    def uses_adapters(self) -> bool:
        """Whether a group selects the LoRA adapters (so the model must have them)."""
        return any(g.match is is_lora_path for g in self.groups)

    @property
    def adapters_only(self) -> bool:
        """Whether only the LoRA adapters train."""
        return all(g.match is is_lora_path for g in self.groups)

    # --- per-leaf labels --------------------------------------------------------------------------
    def label(self, path: KeyPath) -> str:
        """The group of the leaf at `path`, or "frozen"."""
        return next((g.name for g in self.groups if g.match(path)), FROZEN)

    def labels(self, params: Params) -> Params:
        """The group name (or "frozen") of every leaf.

        Args:
            params: any tree with the parameters' structure (arrays, shape structs, masked trees).

        Returns:
            A tree of the same structure with a string per leaf.
        """
        return jax.tree_util.tree_map_with_path(lambda p, _: self.label(key_names(p)), params)

    def freeze(self, params: Params) -> Params:
        """`stop_gradient` on frozen leaves: their gradient is a symbolic zero, never computed.

        Args:
            params: the parameter tree.

        Returns:
            The same tree (`params` itself when every leaf trains).
        """
        if self.is_everything:
            return params
        return jax.tree_util.tree_map(
            lambda p, label: jax.lax.stop_gradient(p) if label == FROZEN else p,
            params,
            self.labels(params),
        )

    # --- the optimiser ----------------------------------------------------------------------------
    def _group_config(self, config: Any, group: ParamGroup) -> Any:
        """The optimiser config one group sees: `<prefix><field>` overrides `<field>`."""
        prefixes = tuple(g.prefix for g in self.groups if g.prefix)
        if not prefixes and group.learning_rate is None:
            return config
        items = dict(config.items())
        fields = {k: v for k, v in items.items() if not (prefixes and k.startswith(prefixes))}
        if group.prefix:
            fields |= {
                k[len(group.prefix) :]: v for k, v in items.items() if k.startswith(group.prefix)
            }
        if group.learning_rate is not None:
            fields["learning_rate"] = float(group.learning_rate)
        return ml_collections.ConfigDict(fields)

    def make_optimizer(
        self,
        optim_config: Any,
        total_steps: int | None,
        *,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
        """AdamW per group and `set_to_zero` for frozen leaves.

        Frozen leaves are split off first, so clipping (global norm over the trained leaves only,
        as Lightning clips the optimiser's parameters) and `MultiSteps` accumulation (buffers for
        the trained leaves only) run inside the trained branch, and nothing is allocated for the
        frozen ones. `Trainable.all()` without its own learning rate is exactly
        `trainers.optim.make_optimizer`.

        Args:
            optim_config: `trainers.optim.make_optimizer`'s fields, plus any prefixed per group.
            total_steps: optimiser steps of the run (for a cosine schedule), or None.
            gradient_clip_val: clipping of the trained gradients, or None.
            gradient_clip_algorithm: "norm" (their global norm) or "value" (each entry).
            accumulate_grad_batches: micro-batches per optimiser step.

        Returns:
            The transformation and the first group's learning-rate schedule.
        """
        if self.is_everything:
            return make_optimizer(
                self._group_config(optim_config, self.groups[0]),
                total_steps,
                gradient_clip_val=gradient_clip_val,
                gradient_clip_algorithm=gradient_clip_algorithm,
                accumulate_grad_batches=accumulate_grad_batches,
            )
        built = [
            make_optimizer(self._group_config(optim_config, g), total_steps) for g in self.groups
        ]
        trained: optax.GradientTransformation = built[0][0]
        if len(self.groups) > 1:
            trained = optax.multi_transform(
                {g.name: tx for g, (tx, _) in zip(self.groups, built)}, self.labels
            )
        if gradient_clip_val:
            trained = optax.chain(
                clip_gradients(gradient_clip_val, gradient_clip_algorithm), trained
            )
        if accumulate_grad_batches > 1:
            trained = optax.MultiSteps(
                trained, every_k_schedule=accumulate_grad_batches
            ).gradient_transformation()
        tx = optax.multi_transform(
            {"trained": trained, FROZEN: optax.set_to_zero()},
            lambda params: jax.tree_util.tree_map(
                lambda label: FROZEN if label == FROZEN else "trained", self.labels(params)
            ),
        )
        return tx, built[0][1]


TrainableSpec = Trainable | str | Callable[[KeyPath], bool]
"""What a strategy's `trainable` argument accepts: see `Trainable.of`."""
