"""Host RAM, local disk and checkpoint bytes of the replay buffer at 0.25°, from the code's layout.

    .venv/bin/python benchmarks/replay_memory.py [--entries 200 --refresh-every 10 --rows 1]

Nothing is timed. One state is AuroraPretrained's 4 surface and 5 x 13 atmospheric fields on
the 720 x 1440 grid the model sees (721 latitudes cropped to a multiple of the patch size); an
entry is a history of two states plus its times. Bytes per state come from
`trainers.strategies.replay_buffer.encode` and the `.npz` files `ReplayBuffer.save` writes,
measured on small grids and extrapolated linearly (both are exactly linear in h x w). States per
entry and new states per update come from running `ReplayBuffer` itself, with one-value
states, through the paper's replay loop: each update samples `--rows` entries, each pushes its
prediction back, and every `--refresh-every` updates the dataset adds `--rows` fresh entries.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aurora.model.aurora import AuroraPretrained
from trainers.strategies.replay_buffer import BUFFER_DTYPES, Layout, ReplayBuffer, encode

GRID = (720, 1440)
LEVELS = 13
GB = 1e9


def layout() -> Layout:
    model = AuroraPretrained()
    return Layout(tuple(model.surf_vars), tuple((v, LEVELS) for v in model.atmos_vars))


def state_bytes(dtype: str, channels: int, h: int, w: int) -> tuple[int, int]:
    """(bytes in memory, bytes of its checkpoint / spill file) of one stored state."""

    def measure(hh: int, ww: int) -> tuple[int, int]:
        stored = encode(np.ones((channels, hh, ww), np.float32), dtype)
        f = io.BytesIO()
        np.savez(f, **stored)
        return sum(a.nbytes for a in stored.values()), len(f.getvalue())

    (m1, f1), (m2, f2) = measure(2, 2), measure(4, 4)
    per_value_m, per_value_f = (m2 - m1) / 12, (f2 - f1) / 12
    return round(m1 + per_value_m * (h * w - 4)), round(f1 + per_value_f * (h * w - 4))


def simulate(entries: int, refresh_every: int, rows: int, updates: int) -> tuple[float, float]:
    """(states held per entry, new states per update) in the steady state of the replay loop."""
    buffer, rng = ReplayBuffer(entries, "float32"), np.random.default_rng(0)
    one = {"x": np.zeros((2, 1, 1), np.float32)}
    held, added = [], []
    for update in range(updates):
        before = buffer._count
        if update % refresh_every == 0:
            for _ in range(rows):
                buffer.push_history({}, one, update, 0, update + 1)
        parents = buffer.sample(rng, rows, max_lead_steps=10**6)
        buffer.push_children(
            [
                (p, {}, {"x": np.zeros((1, 1), np.float32)}, 0, p.rollout_step + 1, 0)
                for p in parents
            ]
        )
        if update >= updates // 2:
            held.append(len(buffer._states) / len(buffer))
            added.append(buffer._count - before)
    return float(np.mean(held)), float(np.mean(added))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--entries", type=int, default=200)
    parser.add_argument("--refresh-every", type=int, default=10)
    parser.add_argument("--rows", type=int, default=1, help="batch rows per device")
    parser.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    args = parser.parse_args()

    lay = layout()
    per_entry, per_update = simulate(args.entries, args.refresh_every, args.rows, 20_000)
    states = per_entry * args.entries
    print(
        f"{lay.channels} fields per state ({len(lay.surf)} surface + {len(lay.atmos)} x {LEVELS} "
        f"atmospheric) on {GRID[0]} x {GRID[1]}; {args.entries} entries, refresh_every="
        f"{args.refresh_every}, {args.rows} row(s) per update: {per_entry:.3f} states per entry "
        f"({states:.0f} states), {per_update:.2f} new states per update\n"
    )
    print(
        "| stored as | state (GB) | host RAM, all in memory (GB) | host RAM with spill_dir, "
        "buffer_ram_gb=0 (GB) | local disk with spill (GB) | checkpoint per step (GB) | "
        f"checkpoint every {args.every} steps (GB) | before: full float32 rewrite (GB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    old_entry = 2 * lay.channels * GRID[0] * GRID[1] * 4  # two float32 states, nothing shared
    before = args.entries * old_entry  # held in RAM and rewritten by every checkpoint
    for dtype in BUFFER_DTYPES:
        ram, disk = state_bytes(dtype, lay.channels, *GRID)
        in_flight = args.rows * old_entry  # the sampled histories, decoded to float32
        print(
            f"| {dtype} | {ram / GB:.3f} | {states * ram / GB:.1f} | "
            f"{in_flight / GB:.2f} (the sampled rows) | {states * disk / GB:.1f} | "
            f"{per_update * disk / GB:.3f} | "
            f"<= {min(args.every * per_update, states) * disk / GB:.1f} | {before / GB:.1f} |"
        )


if __name__ == "__main__":
    main()
