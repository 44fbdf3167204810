"""A `WeatherSource`'s states by time: init times, model inputs and truths as stacked arrays.

Times are int seconds since 1970 throughout, as in the source; a forecast from ``now`` needs the
two history states ``now - step`` and ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from aurora.model.aurora import Aurora
from data_builders.pipeline import WeatherSource, find_windows

__all__ = ["SourceStates", "init_times", "model_variables", "step_seconds"]


def init_times(source: WeatherSource, step_hours: float = 6) -> np.ndarray:
    """Init times whose two history states (``now - step`` and ``now``) are both in the source.

    Args:
        source: the states.
        step_hours: the model's time step in hours.

    Returns:
        Sorted int64 seconds since 1970, shape `(n,)`.
    """
    return find_windows(source.times, step_seconds(step_hours), 0)


def step_seconds(step_hours: float) -> int:
    """The time step in whole seconds.

    Args:
        step_hours: the time step in hours.

    Returns:
        The step in seconds.

    Raises:
        ValueError: `step_hours` is not positive.
    """
    step = round(float(step_hours) * 3600)
    if step <= 0:
        raise ValueError(f"step_hours must be positive, not {step_hours}")
    return step


class SourceStates:
    """Reads the source's states by time and stacks them into arrays (one read per record).

    Args:
        source: the states.
        surf: the surface variables to read.
        atmos: the atmospheric variables to read.
    """

    def __init__(self, source: WeatherSource, surf: Sequence[str], atmos: Sequence[str]) -> None:
        self.source, self.surf, self.atmos = source, tuple(surf), tuple(atmos)
        self.index = {int(t): i for i, t in enumerate(source.times)}

    def has(self, t: int) -> bool:
        """Whether the source has the state at time `t` (int seconds)."""
        return int(t) in self.index

    def stack(
        self, times: np.ndarray, rows: int | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The states at `times`, cut to the first `rows` latitudes (all by default).

        Args:
            times: int seconds, shape `(b, T)`.
            rows: how many latitude rows to keep.

        Returns:
            Surface `{name: (b, T, h, w)}` and atmospheric `{name: (b, T, c, h, w)}` float32
            arrays; a time not in the source gives zeros.
        """
        cache: dict[int, Any] = {}
        out_s: dict[str, np.ndarray] = {}
        out_a: dict[str, np.ndarray] = {}
        for group, names, out in (("surf", self.surf, out_s), ("atmos", self.atmos, out_a)):
            for name in names:
                parts = []
                for row in times:
                    fields = []
                    for t in row:
                        record = self._record(int(t), cache)
                        fields.append(
                            None if record is None else np.asarray(record[group][name], np.float32)
                        )
                    shape = next((f.shape for f in fields if f is not None), None)
                    shape = shape or self._shape(group)
                    fields = [np.zeros(shape, np.float32) if f is None else f for f in fields]
                    parts.append(np.stack(fields))
                out[name] = np.stack(parts)[..., :rows, :]
        return out_s, out_a

    def _record(self, t: int, cache: dict[int, Any]) -> Any:
        if t not in self.index:
            return None
        if t not in cache:
            record = self.source.records[self.index[t]]
            if int(record["time"]) != t:
                raise ValueError(
                    f"{self.source.name}: record for {t} holds time {int(record['time'])}"
                )
            cache[t] = record
        return cache[t]

    def _shape(self, group: str) -> tuple[int, ...]:
        h, w = len(self.source.lat), len(self.source.lon)
        return (h, w) if group == "surf" else (len(self.source.levels), h, w)


def model_variables(model: Aurora, source: WeatherSource) -> tuple[list[str], list[str], list[str]]:
    """The model's variables that the source has.

    Args:
        model: the model (its `surf_vars`, `atmos_vars` and `static_vars`).
        source: the states.

    Returns:
        The surface, atmospheric and static variable names, in the model's order.

    Raises:
        ValueError: the source has none of the model's atmospheric variables.
    """
    first = source.records[0]
    surf = [v for v in model.surf_vars if v in first.get("surf", {})]
    atmos = [v for v in model.atmos_vars if v in first.get("atmos", {})]
    static = [v for v in model.static_vars if v in source.static]
    if not atmos:
        raise ValueError(
            f"{source.name}: none of the model's atmospheric variables {model.atmos_vars}"
        )
    return surf, atmos, static
