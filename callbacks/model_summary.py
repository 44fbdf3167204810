"""`ModelSummary`: parameters per module, trainable and frozen, at the start of fit.

Lightning's `ModelSummary`, for a Flax parameter tree: a module is a path of the tree above its
leaves (`encoder/surf_token_embeds`), and which leaves train is the strategy's `trainable`
(`trainers.strategies.trainable.Trainable`; LoRA freezes the base). The table is rendered by
`clu.parameter_overview.make_table`; only shapes are read, so a sharded state is never gathered.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
from clu import parameter_overview
from flax import traverse_util

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["ModelSummary", "ModuleRow", "summarize"]


@dataclasses.dataclass
class ModuleRow:
    """One module's parameter counts (element counts) and size."""

    name: str
    trainable: int = 0
    frozen: int = 0
    total: int = 0
    bytes: int = 0

    def add(self, size: int, nbytes: int, trains: bool) -> None:
        self.trainable += size if trains else 0
        self.frozen += 0 if trains else size
        self.total += size
        self.bytes += nbytes


def summarize(params: Any, trainable: Any = None, max_depth: int = 1) -> list[ModuleRow]:
    """Parameter counts per module, and a last row `"total"`.

    Args:
        params: the parameter tree (arrays or shape structs: only shapes and dtypes are read).
        trainable: a `Trainable` (its `label(path)` is "frozen" for frozen leaves); None: every
            leaf trains.
        max_depth: modules up to this many path components deep (1: the top-level modules); -1:
            every module; 0: the total only.

    Returns:
        A row per module, parents before their children in the tree's order, then the total.
    """
    rows: dict[tuple[str, ...], ModuleRow] = {}
    total = ModuleRow("total")
    for path, leaf in traverse_util.flatten_dict(dict(params)).items():
        size = int(np.prod(np.shape(leaf)))
        nbytes = size * np.dtype(leaf.dtype).itemsize
        trains = trainable is None or trainable.label(path) != "frozen"
        total.add(size, nbytes, trains)
        module = path[:-1]
        depth = len(module) if max_depth < 0 else min(max_depth, len(module))
        for d in range(1, depth + 1):
            prefix = module[:d]
            if prefix not in rows:
                rows[prefix] = ModuleRow("/".join(prefix))
            rows[prefix].add(size, nbytes, trains)
    return [*rows.values(), total]


class ModelSummary(Callback):
    """Print the parameters per module, trainable and frozen, when fit starts (process 0).

    `rows` keeps the counts, the last row the totals.

    Args:
        max_depth: as for :func:`summarize`: 1 the top-level modules, -1 every module, 0 totals.
        stream: where to print (default: `sys.stdout` at the time fit starts).
    """

    def __init__(self, max_depth: int = 1, stream: TextIO | None = None):
        self.max_depth = int(max_depth)
        self.stream = stream
        self.rows: list[ModuleRow] = []

    def table(self) -> str:
        """The rows as a text table, then Lightning's totals lines."""
        *modules, total = self.rows
        lines = [parameter_overview.make_table(modules)] if modules else []
        lines += [
            f"Trainable params: {total.trainable:,}",
            f"Non-trainable params: {total.frozen:,}",
            f"Total params: {total.total:,}",
            f"Total estimated model params size (MB): {total.bytes / 1e6:,.1f}",
        ]
        return "\n".join(lines)

    def on_fit_start(self, trainer: Trainer) -> None:
        trainable = getattr(trainer.strategy, "trainable", None)
        self.rows = summarize(trainer.state.params, trainable, self.max_depth)
        if not trainer.is_global_zero:
            return
        print(self.table(), file=self.stream or sys.stdout, flush=True)
