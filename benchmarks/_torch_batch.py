"""A random microsoft-aurora `Batch` for the `_torch_*` benchmark helpers (reference venv only).

Both helpers time microsoft-aurora on the same kind of input as their JAX side, so the batch is
built in one place: Aurora's variables, 2 history steps, one sample, a fixed time.
"""

from datetime import datetime

import torch

from aurora import Batch, Metadata

SURF_VARS = ("2t", "10u", "10v", "msl")  # aurora.variables is ours, not importable here
STATIC_VARS = ("lsm", "z", "slt")
ATMOS_VARS = ("z", "u", "v", "t", "q")


def random_batch(
    h: int, w: int, levels: tuple[int, ...], gen: torch.Generator, lat: torch.Tensor
) -> Batch:
    """Standard-normal fields on an `h` x `w` grid with latitudes `lat` and `levels`.

    Args:
        h, w: grid size.
        levels: pressure levels in hPa.
        gen: the random generator (seeded by the caller, so both sides see the same data).
        lat: latitudes, shape `(h,)`.

    Returns:
        A batch with surface `(1, 2, h, w)`, static `(h, w)` and atmospheric
        `(1, 2, len(levels), h, w)` fields.
    """
    return Batch(
        surf_vars={k: torch.randn(1, 2, h, w, generator=gen) for k in SURF_VARS},
        static_vars={k: torch.randn(h, w, generator=gen) for k in STATIC_VARS},
        atmos_vars={k: torch.randn(1, 2, len(levels), h, w, generator=gen) for k in ATMOS_VARS},
        metadata=Metadata(
            lat=lat,
            lon=torch.linspace(0, 360, w + 1)[:-1],
            time=(datetime(2020, 6, 1, 12),),
            atmos_levels=levels,
        ),
    )
