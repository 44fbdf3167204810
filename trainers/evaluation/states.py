"""A `WeatherSource`'s states by time: init times, model inputs and truths as stacked arrays.

Times are int seconds since 1970 throughout, as in the source; a forecast from ``now`` needs the
two history states ``now - step`` and ``now``.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from aurora.model.aurora import Aurora
from data_builders.pipeline import WeatherSource, find_windows

State = dict[str, dict[str, np.ndarray]]
"""One time's fields: ``{"surf": {name: (h, w)}, "atmos": {name: (c, h, w)}}``, float32."""

__all__ = [
    "WB2_INIT_HOURS",
    "SourceStates",
    "init_times",
    "model_variables",
    "scored_variables",
    "step_seconds",
]

WB2_INIT_HOURS = (0, 12)
"""WeatherBench2 initialises its forecasts at 00 and 12 UTC."""


def init_times(
    source: WeatherSource, step_hours: float = 6, hours: Sequence[int] | None = None
) -> np.ndarray:
    """Init times whose two history states (``now - step`` and ``now``) are both in the source.

    Args:
        source: the states.
        step_hours: the model's time step in hours.
        hours: keep only inits at these hours of the day (UTC), e.g. `WB2_INIT_HOURS`;
            None: every hour.

    Returns:
        Sorted int64 seconds since 1970, shape `(n,)`.
    """
    inits = find_windows(source.times, step_seconds(step_hours), 0)
    if hours is None:
        return inits
    seconds_of_day = inits % 86400
    return inits[np.isin(seconds_of_day, [int(h) * 3600 for h in hours])]


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
    """Reads the source's states by time and stacks them into arrays.

    Given `uses` (how many times each time will be asked for, over a whole job), every state is
    read once: it is kept from its first use to its last and then dropped, so the truth of a
    valid time is shared by every forecast that needs it and memory holds only the states some
    pending forecast still needs. Without `uses` each `stack` call reads what it needs.

    Args:
        source: the states.
        surf: the surface variables to read.
        atmos: the atmospheric variables to read.
        uses: int seconds -> how many times `stack` will be asked for that time; None: no
            sharing between calls.

    Attributes:
        reads: records read so far, by time (for tests and benchmarks).
        most_kept: the most states kept at once.
    """

    def __init__(
        self,
        source: WeatherSource,
        surf: Sequence[str],
        atmos: Sequence[str],
        uses: Mapping[int, int] | None = None,
    ) -> None:
        self.source, self.surf, self.atmos = source, tuple(surf), tuple(atmos)
        self.index = {int(t): i for i, t in enumerate(source.times)}
        self._pending = None if uses is None else Counter({int(t): n for t, n in uses.items()})
        self._kept: dict[int, State] = {}
        self.reads: Counter[int] = Counter()
        self.most_kept = 0

    def has(self, t: int) -> bool:
        """Whether the source has the state at time `t` (int seconds)."""
        return int(t) in self.index

    def stack(
        self, times: np.ndarray, rows: int | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The states at `times`, cut to the first `rows` latitudes (all by default).

        Each entry of `times` that the source has counts as one use of that time.

        Args:
            times: int seconds, shape `(b, T)`.
            rows: how many latitude rows to keep.

        Returns:
            Surface `{name: (b, T, h, w)}` and atmospheric `{name: (b, T, c, h, w)}` float32
            arrays; a time not in the source gives zeros.
        """
        times = np.asarray(times, np.int64)
        wanted = Counter(int(t) for t in times.ravel() if self.has(t))
        states = {t: self._take(t, n) for t, n in wanted.items()}
        out: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] = ({}, {})
        for group, names, dest in (("surf", self.surf, out[0]), ("atmos", self.atmos, out[1])):
            zeros = np.zeros(self._shape(group), np.float32)
            for name in names:
                fields = [
                    [states[int(t)][group][name] if int(t) in states else zeros for t in row]
                    for row in times
                ]
                dest[name] = np.stack([np.stack(row) for row in fields])[..., :rows, :]
        return out

    def _take(self, t: int, n: int) -> State:
        """The state at `t`, used `n` times: read on first use, dropped after the last."""
        state = self._kept.get(t)
        if state is None:
            state = self._read(t)
        if self._pending is None:
            return state
        self._pending[t] -= n
        if self._pending[t] > 0:
            self._kept[t] = state
            self.most_kept = max(self.most_kept, len(self._kept))
        else:
            self._kept.pop(t, None)
        return state

    def _read(self, t: int) -> State:
        record = self.source.records[self.index[t]]
        if int(record["time"]) != t:
            raise ValueError(f"{self.source.name}: record for {t} holds time {int(record['time'])}")
        self.reads[t] += 1
        return {
            "surf": {k: np.asarray(record["surf"][k], np.float32) for k in self.surf},
            "atmos": {k: np.asarray(record["atmos"][k], np.float32) for k in self.atmos},
        }

    def _shape(self, group: str) -> tuple[int, ...]:
        h, w = len(self.source.lat), len(self.source.lon)
        return (h, w) if group == "surf" else (len(self.source.levels), h, w)


_FIRST: weakref.WeakKeyDictionary[WeatherSource, dict[str, dict[str, None]]] = (
    weakref.WeakKeyDictionary()
)


def model_variables(model: Aurora, source: WeatherSource) -> tuple[list[str], list[str], list[str]]:
    """The model's variables that the source has (its first record is read once to see).

    These are read for the inputs and for the truth: the variables a batch may hold
    (`input_surf_vars`, e.g. `AuroraWave`'s wind direction `dwi`), then those a prediction
    holds (`output_surf_vars`, e.g. its `mwd` where `surf_vars` has `mwd_sin`, `mwd_cos` and
    `mwd_density`); `scored_variables` keeps the latter.

    Args:
        model: the model (its `input_surf_vars`, `output_surf_vars`, `atmos_vars` and
            `static_vars`; a model without the first two: `surf_vars`).
        source: the states.

    Returns:
        The surface, atmospheric and static variable names, in the model's order.

    Raises:
        ValueError: the source has none of the model's atmospheric variables.
    """
    first = _FIRST.get(source)
    if first is None:  # read once per source: the variables a record holds
        record = source.records[0]
        first = _FIRST[source] = {g: dict.fromkeys(record.get(g, {})) for g in ("surf", "atmos")}
    names = dict.fromkeys((*_surf_vars(model, "input"), *_surf_vars(model, "output")))
    surf = [v for v in names if v in first.get("surf", {})]
    atmos = [v for v in model.atmos_vars if v in first.get("atmos", {})]
    static = [v for v in model.static_vars if v in source.static]
    if not atmos:
        raise ValueError(
            f"{source.name}: none of the model's atmospheric variables {model.atmos_vars}"
        )
    return surf, atmos, static


def _surf_vars(model: Aurora, kind: str) -> tuple[str, ...]:
    return tuple(getattr(model, f"{kind}_surf_vars", model.surf_vars))


def scored_variables(model: Aurora, surf: Sequence[str]) -> list[str]:
    """The surface variables of `surf` (read by `model_variables`) that a prediction holds and
    a forecast is scored on (not the inputs only it needs, such as `AuroraWave`'s `dwi`)."""
    output = set(_surf_vars(model, "output"))
    return [v for v in surf if v in output]
