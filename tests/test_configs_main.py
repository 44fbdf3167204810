"""`python main.py --config=configs/lora.py` (the README's headline command) and
`configs/rollout.py` run two steps on the bundled sample, with a one-stage model to compile fast.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from tests.helpers import run_main
from trainers.checkpointing import load_params
from trainers.strategies.trainable import is_lora_path

ROOT = Path(__file__).resolve().parents[1]

SMALL = (
    "--config.trainer.max_steps=2",
    "--config.trainer.val_check_interval=2",
    "--config.trainer.limit_val_batches=1",
    "--config.trainer.log_every_n_steps=1",
    "--config.callbacks.checkpoint.every_n_steps=2",
    "--config.model.kwargs.embed_dim=32",
    "--config.model.kwargs.encoder_depths=(1,)",
    "--config.model.kwargs.decoder_depths=(1,)",
    "--config.model.kwargs.encoder_num_heads=(2,)",
    "--config.model.kwargs.decoder_num_heads=(2,)",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared copy of the sample dataset for both runs."""
    return tmp_path_factory.mktemp("datasets")


def _main(config: str, workdir: Path, data_dir: Path, *overrides: str) -> dict:
    result = run_main(
        f"--config={ROOT / 'configs' / config}",
        f"--workdir={workdir}",
        f"--config.data.builder_config.data_dir={data_dir}",
        *SMALL,
        *overrides,
    )
    return json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])


def _logged(workdir: Path) -> dict[str, dict[int, float]]:
    with open(workdir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged: dict[str, dict[int, float]] = {}
    for r in rows:
        logged.setdefault(r["tag"], {})[int(r["step"])] = float(r["value"])
    return logged


def test_lora_config_trains_its_adapters_through_main(tmp_path: Path, data_dir: Path) -> None:
    summary = _main("lora.py", tmp_path, data_dir)
    assert summary["global_step"] == 2 and np.isfinite(summary["metrics"]["val/loss"])
    logged = _logged(tmp_path)
    assert sorted(logged["train/loss"]) == [1, 2] and 2 in logged["val/loss"]
    params = traverse_util.flatten_dict(load_params(tmp_path / "checkpoints" / "2"))
    lora_b = [v for k, v in params.items() if is_lora_path(k) and k[-1] == "lora_B"]
    # B starts at 0; the base's first update unsilences the blocks, so the second moves B.
    assert lora_b and any(np.any(np.asarray(v) != 0) for v in lora_b)


@pytest.mark.slow  # CI time: heavy, and its neighbours cover the same code in CI
def test_rollout_config_trains_on_its_gradient_window_schedule_through_main(
    tmp_path: Path, data_dir: Path
) -> None:
    summary = _main(
        "rollout.py",
        tmp_path,
        data_dir,
        "--config.callbacks.grad_stop.schedule=((0, 1), (1, 2))",  # the window widens at step 2
    )
    assert summary["global_step"] == 2
    logged = _logged(tmp_path)
    for tag in ("train/loss", "train/loss/step1", "train/loss/step2"):
        assert sorted(logged[tag]) == [1, 2] and all(np.isfinite(list(logged[tag].values())))
    assert (tmp_path / "checkpoints" / "2").is_dir()
