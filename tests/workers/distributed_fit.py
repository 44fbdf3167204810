"""One process of a multi-process data-parallel fit (started by tests/test_distributed.py).

    python -m tests.workers.distributed_fit PROCESS_ID NUM_PROCESSES PORT OUT.npz

Each process starts `jax.distributed` on localhost, reads only its own rows of every global
batch, and trains with the Trainer on a mesh over all processes' devices; process 0 writes the
final parameters and the logged loss.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from trainers.sharding import initialize_distributed, make_mesh


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
    initialize_distributed(f"localhost:{port}", num_processes, process_id)
    from tests.test_distributed import fit, global_examples, local_rows

    examples = [local_rows(e, process_id, num_processes) for e in global_examples()]
    trainer = fit(examples, mesh=make_mesh())
    params = jax.tree_util.tree_leaves(trainer.state.params)
    if jax.process_index() == 0:
        arrays = [np.asarray(jax.device_get(p)) for p in params]
        np.savez(out, *arrays, loss=trainer.callback_metrics["train/loss"])
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
