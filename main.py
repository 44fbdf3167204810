"""Train, evaluate or predict with Aurora.

Usage: `python main.py --config=configs/demo.py --workdir=runs/demo`.

Flags: `--config` (an ml_collections config file; override fields with `--config.a.b=value`,
sequences as tuples: `--config.data.builder_config.paths='("a.nc", "b.nc")'`; modules registering
your own builders go in `--config.imports='("my_builders.py",)'`, see docs/datasets.md),
`--workdir` (checkpoints, datasets, metrics; re-running in the same workdir resumes), `--mode`
(fit | validate | test | predict). The work happens in `trainers.run.run`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from trainers.run import run
from trainers.sharding import initialize_distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Configuration file (e.g. configs/demo.py).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, datasets and metrics.")
flags.DEFINE_enum("mode", "fit", ["fit", "validate", "test", "predict"], "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    distributed = FLAGS.config.get("distributed") or {}
    initialize_distributed(
        distributed.get("coordinator_address"),
        distributed.get("num_processes"),
        distributed.get("process_id"),
        mode=distributed.get("initialize", "auto"),
    )
    summary = run(FLAGS.config, FLAGS.workdir, FLAGS.mode)
    evaluation = summary.pop("evaluation", None)
    print(json.dumps(summary, indent=1, default=str))
    if evaluation is not None:
        print(protocol_lines(evaluation))
        print(headline_scores(Path(evaluation["scores"])))
        if evaluation.get("members", 1) > 1:
            print(headline_scores(Path(evaluation["scores"]), "crps"))
        print(
            f"scores: {evaluation['scores']}\n"
            f"summary: {Path(evaluation['scores']).with_name('summary.json')}"
        )
        figures = evaluation.get("figures") or []
        if figures:
            print(f"figures ({len(figures)}): {Path(figures[0]).parent}")


HEADLINE = (("z", "500"), ("t", "850"), ("u", "850"), ("2t", ""), ("msl", ""))


def protocol_lines(summary: dict) -> str:
    """How the table below was made: init hours, climatology, grids and what model it scored."""
    hours = summary.get("init_hours_utc")
    inits = "every init" if hours is None else "inits at " + ", ".join(f"{h:02d}" for h in hours)
    lines = [
        f"protocol: {inits} UTC (WeatherBench2), grids {', '.join(summary.get('grids', []))}",
        f"climatology: {summary.get('climatology_source') or summary.get('climatology')}",
    ]
    if not summary.get("init"):  # no published or converted weights: say what was scored
        step = summary.get("checkpoint_step")
        trained = f"for {step} steps" if step else "(untrained)"
        res = summary.get("grid_deg")
        on = f" on {res:g}° data" if res else ""
        lines.append(
            f"model: {summary.get('model_preset')} trained from scratch {trained}{on}, "
            "not Aurora's skill; for that, start from published weights with "
            "--config.init.pretrained=AuroraPretrained (README: Using the model)"
        )
    return "\n".join(lines)


def headline_scores(scores_csv: Path, metric: str = "rmse") -> str:
    """`metric` (a column of ``scores.csv``, e.g. ``crps`` of an ensemble) of the headline
    variables per lead time on the model's grid, next to baselines."""
    with scores_csv.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("grid", "model") == "model"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    lines = [f"{metric.upper():<12}" + " ".join(f"{m:>12}" for m in models)]
    for variable, level in HEADLINE:
        picked = [r for r in rows if r["variable"] == variable and r["level"] == level]
        for lead in dict.fromkeys(r["lead_time_h"] for r in picked):
            score = {r["model"]: float(r[metric]) for r in picked if r["lead_time_h"] == lead}
            name = f"{variable}{level} +{lead}h"
            lines.append(
                f"{name:<12}" + " ".join(f"{score.get(m, float('nan')):12.4g}" for m in models)
            )
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
