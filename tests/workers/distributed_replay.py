"""One process of a two-process replay fit (started by tests/test_replay_strategy.py).

    python -m tests.workers.distributed_replay PROCESS_ID NUM_PROCESSES PORT WORKDIR

Each process starts `jax.distributed` on localhost, reads its own shard of the bundled sample
(its own dataset rows), trains `ReplayStrategy` through the Trainer on a mesh over all processes'
devices with a checkpoint at the last step, then restores that checkpoint into a new Trainer.
It writes `<WORKDIR>/process_<i>.json`: its own dataset input times, and its buffer (entries and
a digest of each entry's decoded history) and sampling state at the end of training and after
the restore.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from trainers.sharding import initialize_distributed, make_mesh

STEPS = 3
REPLAY = {"capacity": 6, "refresh_every": 2, "max_lead_hours": ((0, 18),), "seed": 7}


def fingerprint(strategy: Any) -> dict[str, Any]:
    """The buffer's entries (times and a digest of the decoded history) and sampling state."""
    buffer = strategy.buffer
    entries = []
    for e in buffer.entries:
        history = np.stack([buffer.state(n) for n in e.states])
        digest = hashlib.sha256(history.tobytes()).hexdigest()[:16]
        entries.append([e.time, e.rollout_step, e.target_time, digest])
    return {"entries": entries, "host_state": json.loads(json.dumps(strategy.host_state()))}


def main(process_id: int, num_processes: int, port: int, workdir: str) -> None:
    initialize_distributed(f"localhost:{port}", num_processes, process_id)
    from callbacks.checkpoint import ModelCheckpoint
    from data_builders.pipeline import Pipeline
    from data_builders.registry import load_source
    from tests.test_replay_strategy import DATA, OPTIM, VARS, _model
    from trainers.strategies.replay import ReplayStrategy
    from trainers.trainer import Trainer

    root = Path(workdir)
    source = load_source(
        "hres",
        "train",
        data_dir=root / f"datasets_{process_id}",
        paths=[DATA / "hres_pl_20240603T00-20240604T18_6h_10deg.nc"],
        static_paths=[DATA / "era5_static_z_lsm_0.25deg.nc"],
        levels=(500, 850),
        **VARS,
    )

    def pipeline() -> Pipeline:
        return Pipeline(
            source,
            rollout_steps=1,
            batch_size=1,
            num_threads=0,
            seed=1,
            shard_index=process_id,
            shard_count=num_processes,
        )

    fresh: list[int] = []

    class Recording(ReplayStrategy):
        def add_fresh(self, example: Any) -> None:
            fresh.extend(int(t) for t in np.asarray(example[0].metadata.time).reshape(-1))
            super().add_fresh(example)

    trainer = Trainer(
        Recording(_model(), **REPLAY),
        optimizer=OPTIM,
        mesh=make_mesh(),
        callbacks=[ModelCheckpoint(every_n_steps=STEPS)],
        workdir=root / "run",
        max_steps=STEPS,
        log_every_n_steps=1,
    )
    trainer.fit(pipeline())
    trained = fingerprint(trainer.strategy)

    probe = Trainer(
        ReplayStrategy(_model(), **REPLAY),
        optimizer=OPTIM,
        mesh=make_mesh(),
        callbacks=[ModelCheckpoint(directory=root / "run" / "checkpoints")],
        workdir=root / "run",
        max_steps=STEPS,
    )
    probe.load(pipeline(), ckpt_path=root / "run" / "checkpoints" / str(STEPS))
    result = {"fresh_times": fresh, "trained": trained, "restored": fingerprint(probe.strategy)}
    (root / f"process_{process_id}.json").write_text(json.dumps(result))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
