"""Train, evaluate or predict with Aurora: `python main.py --config=configs/demo.py --workdir=runs/demo`.

Flags: `--config` (an ml_collections config file; override fields with `--config.a.b=value`),
`--workdir` (checkpoints, datasets, metrics; re-running in the same workdir resumes), `--mode`
(fit | validate | test | predict). The work happens in `trainers.run.run`.
"""

from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from trainers.run import run

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Configuration file (e.g. configs/demo.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, datasets and metrics.")
flags.DEFINE_enum("mode", "fit", ["fit", "validate", "test", "predict"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    summary = run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    print(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    app.run(main)
