"""The climatology baseline and ACC reference: given fields, a function of time, or a mean.

Without a given climatology the per-grid-point mean over all of a source's states stands in:
in-sample and over a short period, so a weak stand-in for a multi-year climatology;
`climatology_kind` says which was used, for the evaluation summary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from aurora.batch import Batch
from data_builders.pipeline import WeatherSource

__all__ = ["Climatology", "Fields", "climatology_batch", "climatology_kind", "source_mean"]

Fields = Mapping[str, Mapping[str, np.ndarray]]
"""``{"surf": {name: (h, w)}, "atmos": {name: (c, h, w)}}`` on the source's grid."""
Climatology = Fields | Callable[[int], Fields] | None
"""Fields on the source's grid; or a function of the valid time (int seconds since 1970), e.g.
WB2's day-of-year/hour climatology; None: the source's mean (`source_mean`)."""


def source_mean(source: WeatherSource) -> Fields:
    """Per-grid-point mean over all the source's states (summed in float64): the default.

    Args:
        source: the states.

    Returns:
        float32 `Fields` of every surface and atmospheric variable the records hold.
    """
    sums: dict[str, dict[str, np.ndarray]] = {"surf": {}, "atmos": {}}
    for i in range(len(source.records)):
        record = source.records[i]
        for group in ("surf", "atmos"):
            for name, x in record.get(group, {}).items():
                sums[group][name] = sums[group].get(name, 0.0) + np.asarray(x, np.float64)
    n = len(source.records)
    return {g: {k: (v / n).astype(np.float32) for k, v in d.items()} for g, d in sums.items()}


def climatology_kind(climatology: Climatology, source: WeatherSource) -> str:
    """Human-readable description of the climatology an evaluation uses (for the summary).

    Args:
        climatology: the climatology given to the evaluation.
        source: the evaluated states (their mean is the default).

    Returns:
        One line, starting ``source mean`` or ``given``.
    """
    if climatology is None:
        return (
            f"source mean: per-grid-point mean of the {len(source.times)} states of "
            f"{source.name} (in-sample, not a multi-year climatology)"
        )
    if callable(climatology):
        return "given: a function of valid time"
    return "given: time-independent fields"


def climatology_batch(clim: Climatology, valid: np.ndarray, like: Batch) -> Batch:
    """Climatology fields for each valid time, shaped like `like` and cut to its latitudes.

    Args:
        clim: fields, or a function of the valid time (not None: resolve the default first).
        valid: valid times, int seconds, shape `(b,)`.
        like: a batch of shape `(b, 1, ...)` whose variables, grid and metadata to use.

    Returns:
        float32 fields of shape `(b, 1, h, w)` / `(b, 1, c, h, w)` with `like`'s metadata.
    """
    rows = like.spatial_shape[0]

    def pick(group: str, name: str) -> np.ndarray:
        fields = [(clim(int(t)) if callable(clim) else clim)[group][name] for t in valid]
        return np.stack([np.asarray(f, np.float32)[..., :rows, :] for f in fields])[:, None]

    return Batch(
        surf_vars={k: pick("surf", k) for k in like.surf_vars},
        static_vars={},
        atmos_vars={k: pick("atmos", k) for k in like.atmos_vars},
        metadata=like.metadata,
    )
