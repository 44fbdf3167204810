"""What the Trainer needs from data, and an in-memory implementation for tests and small jobs.

The Trainer consumes a :class:`DataSource`: `iterator(epoch)` returns a :class:`StatefulIterator`
over `(inputs, targets)` pairs — `inputs` an `aurora.Batch` with history, `targets` a sequence of
one-step `Batch`es — whose position can be saved (`get_state()`, JSON-serialisable) and restored
(`set_state()`), so that a resumed run sees exactly the batches an uninterrupted run would.
`data_builders.pipeline` provides the real one (Grain over a TFDS data source).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from aurora.batch import Batch

__all__ = ["DataSource", "Example", "FirstBatches", "InMemoryData", "StatefulIterator"]

Example = tuple[Batch, Sequence[Batch]]


class StatefulIterator(Protocol):
    def __iter__(self) -> Iterator[Example]: ...
    def __next__(self) -> Example: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


class DataSource(Protocol):
    def iterator(self, epoch: int) -> StatefulIterator: ...


class _ListIterator:
    def __init__(self, items: Sequence[Example], order: np.ndarray):
        self._items, self._order, self._position = items, order, 0

    def __iter__(self) -> _ListIterator:
        return self

    def __next__(self) -> Example:
        if self._position >= len(self._order):
            raise StopIteration
        item = self._items[int(self._order[self._position])]
        self._position += 1
        return item

    def get_state(self) -> dict[str, Any]:
        return {"position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self._position = int(state["position"])


class InMemoryData:
    """A list of examples, reshuffled every epoch from `(seed, epoch)` (so resumable exactly)."""

    def __init__(self, examples: Sequence[Example], *, shuffle: bool = True, seed: int = 0):
        self.examples = list(examples)
        self.shuffle = shuffle
        self.seed = seed

    def __len__(self) -> int:
        return len(self.examples)

    def iterator(self, epoch: int) -> _ListIterator:
        order = np.arange(len(self.examples))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        return _ListIterator(self.examples, order)


class FirstBatches:
    """The first `n` examples of `source`'s epoch-0 order, the same in every epoch (what
    `overfit_batches` trains and validates on). Other attributes (e.g. `states_at`) are the
    source's."""

    def __init__(self, source: DataSource, n: int):
        self.source = source
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getattr__(self, name: str) -> Any:
        source = self.__dict__.get("source")  # absent while copy or pickle rebuild the object
        if source is None:
            raise AttributeError(name)
        return getattr(source, name)

    def iterator(self, epoch: int) -> _FirstIterator:
        return _FirstIterator(self.source.iterator(0), self.n)


class _FirstIterator:
    """At most `n` examples of `inner`; its position is saved with `inner`'s."""

    def __init__(self, inner: StatefulIterator, n: int):
        self._inner, self._n, self._position = inner, n, 0

    def __iter__(self) -> _FirstIterator:
        return self

    def __next__(self) -> Example:
        if self._position >= self._n:
            raise StopIteration
        example = next(self._inner)
        self._position += 1
        return example

    def get_state(self) -> dict[str, Any]:
        return {"inner": self._inner.get_state(), "position": self._position}

    def set_state(self, state: dict[str, Any]) -> None:
        self._inner.set_state(state["inner"])
        self._position = int(state["position"])
