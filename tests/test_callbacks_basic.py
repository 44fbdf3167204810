"""Metric writers, ProgressBar, EarlyStopping, LearningRateMonitor and Timer.

The writers are tested on their own; the callbacks in the real `Trainer`, fitting the tiny model of
tests/test_trainer.py for a few steps (one fit serves several tests where it reads naturally). A
clock advanced by the steps makes times and rates exact; each test checks an effect a user would
see: lines printed, rows the writers received and files read back, `should_stop` set at the right
step, state restored from a real checkpoint.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import pathlib
import struct
import time
from types import SimpleNamespace
from typing import Any

import ml_collections
import numpy as np
import pytest

from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint
from callbacks.early_stopping import EarlyStopping
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.progress import ProgressBar
from callbacks.timer import Timer, parse_duration
from callbacks.writers import (
    CsvWriter,
    JsonlWriter,
    MetricWriter,
    MultiWriter,
    NoopWriter,
    TensorBoardWriter,
    make_writers,
)
from tests.helpers import tiny_model
from tests.test_trainer import OPTIM, _data, _example
from trainers.data import InMemoryData
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

# --------------------------------------------------------------------------------------------------
# Readers: independent of the writers under test
# --------------------------------------------------------------------------------------------------


def _records(path: pathlib.Path) -> list[bytes]:
    """Records of a TFRecord file (TensorBoard's event format), checking both masked CRCs."""
    from tensorboardX.crc32c import crc32c

    def masked(data: bytes) -> int:
        crc = crc32c(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        assert length_crc == masked(header)
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert body_crc == masked(body)
        out.append(body)
        pos += 16 + length
    return out


def _tb_events(logdir: pathlib.Path) -> list[Any]:
    from tensorboardX.proto.event_pb2 import Event

    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    return [Event.FromString(r) for f in files for r in _records(f)]


def _tb_scalars(logdir: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for ev in _tb_events(logdir):
        for v in ev.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def _wandb_history(run_file: pathlib.Path) -> list[dict[str, Any]]:
    """History rows from W&B's run file: LevelDB-log framing (32 KiB blocks) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: skip it
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos : pos + length], pos + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record.FromString(pending)
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def test_tensorboard_writer_scalars_texts_histograms_hparams(tmp_path):
    w = TensorBoardWriter(tmp_path / "tb")
    w.write_hparams({"optim": {"lr": 1e-3, "schedule": "cosine"}, "steps": 10, "shape": (2, 3)})
    w.write_scalars(1, {"train/loss": np.float32(2.5), "lr": 1e-3})
    w.write_scalars(2, {"train/loss": 2.0})
    w.write_scalars(2, {"val/loss": np.asarray(1.75)})  # 0-d array, as callbacks fetch them
    w.write_texts(2, {"note": "hello"})
    w.write_histograms(2, {"weights": np.arange(100.0)}, num_buckets={"weights": 10})
    w.write_images(2, {"map": np.linspace(0, 1, 4 * 5 * 3).reshape(4, 5, 3)})
    w.close()

    scalars = _tb_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(1, 2.5), (2, 2.0)]
    assert scalars["val/loss"] == [(2, 1.75)]
    assert scalars["lr"] == [(1, pytest.approx(1e-3))]
    events = _tb_events(tmp_path / "tb")
    by_tag = {v.tag: (ev, v) for ev in events for v in ev.summary.value}
    assert by_tag["note/text_summary"][1].tensor.string_val == [b"hello"]
    hist_ev, hist = by_tag["weights"]
    assert hist_ev.step == 2 and hist.histo.num == 100 and hist.histo.max == 99.0
    _image_ev, image = by_tag["map"]
    assert (image.image.height, image.image.width, image.image.colorspace) == (4, 5, 3)
    assert image.image.encoded_image_string.startswith(b"\x89PNG")
    hparams = [v for v in by_tag if v.startswith("_hparams_")]
    assert "_hparams_/session_start_info" in hparams
    from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

    content = by_tag["_hparams_/session_start_info"][1].metadata.plugin_data.content
    start = HParamsPluginData.FromString(content).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["optim.schedule"].string_value == "cosine"
    assert start.hparams["shape"].string_value == "(2, 3)"


def test_images_encode_as_png_with_their_pixels_and_channels(tmp_path):
    from PIL import Image

    from callbacks.images import encode_png, to_uint8_nhwc

    floats = np.linspace(0, 1, 4 * 5 * 3).reshape(4, 5, 3)
    (pixels,) = to_uint8_nhwc(floats)
    assert pixels.dtype == np.uint8 and pixels[0, 0, 0] == 0 and pixels[-1, -1, -1] == 255
    np.testing.assert_array_equal(pixels, np.round(floats * 255).astype(np.uint8))
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4, 1) * 20
    rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    for image, mode in ((pixels, "RGB"), (grey, "L"), (rgba, "RGBA")):
        decoded = Image.open(io.BytesIO(encode_png(image)))
        assert decoded.mode == mode
        np.testing.assert_array_equal(np.asarray(decoded).reshape(image.shape), image)

    w = TensorBoardWriter(tmp_path / "tb")
    w.write_images(3, {"grey": grey[None].repeat(2, axis=0)})
    w.write_histograms(3, {"weights": np.array([-2.0, 0.5, 0.5, 3.0])})  # TensorFlow's buckets
    w.close()
    by_tag = {v.tag: v for ev in _tb_events(tmp_path / "tb") for v in ev.summary.value}
    assert sorted(by_tag) == ["grey/image/0", "grey/image/1", "weights"]
    histo = by_tag["weights"].histo
    assert histo.num == 4 and sum(histo.bucket) == 4 and (histo.min, histo.max) == (-2.0, 3.0)
    assert by_tag["grey/image/1"].image.colorspace == 1
    decoded = Image.open(io.BytesIO(by_tag["grey/image/1"].image.encoded_image_string))
    np.testing.assert_array_equal(np.asarray(decoded), grey[..., 0])


def test_writers_refuse_non_integer_step(tmp_path):
    w = JsonlWriter(tmp_path / "m.jsonl")
    with pytest.raises(TypeError):
        w.write_scalars(1.5, {"a": 1.0})
    w.write_scalars(np.int64(3), {"a": 1.0})  # numpy / jax integer scalars are fine
    w.close()
    assert json.loads((tmp_path / "m.jsonl").read_text())["step"] == 3


def test_csv_writer_long_format_appends_without_second_header(tmp_path):
    path = tmp_path / "metrics.csv"
    w = CsvWriter(path)
    w.write_scalars(1, {"train/loss": 2.0, "lr": 0.5})
    w.write_scalars(2, {"val/loss": float("nan")})
    w.write_texts(2, {"ignored": "x"})  # CSV holds scalars only
    w.close()
    w = CsvWriter(path)  # resumed run
    w.write_scalars(3, {"train/loss": 1.0})
    w.close()

    rows = list(csv.reader(path.open()))
    assert rows[0] == ["step", "tag", "value", "wall_time"]
    assert sum(r == rows[0] for r in rows) == 1
    body = [(int(r[0]), r[1], float(r[2])) for r in rows[1:]]
    assert body[:2] == [(1, "train/loss", 2.0), (1, "lr", 0.5)]
    assert body[2][:2] == (2, "val/loss") and np.isnan(body[2][2])
    assert body[3] == (3, "train/loss", 1.0)


def test_csv_writer_refuses_foreign_file(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        CsvWriter(path)


def test_jsonl_writer_records_and_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = JsonlWriter(path)
    w.write_hparams({"model": {"embed_dim": 64}})
    w.write_scalars(5, {"train/loss": 0.25})
    w.close()
    w = JsonlWriter(path)
    w.write_scalars(6, {"train/loss": 0.125, "val/rmse_2t": 1.5})
    w.write_texts(6, {"msg": "ok"})
    w.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["hparams"] == {"model.embed_dim": 64}
    assert {k: v for k, v in lines[1].items() if k != "wall_time"} == {
        "step": 5,
        "train/loss": 0.25,
    }
    assert lines[2]["step"] == 6 and lines[2]["val/rmse_2t"] == 1.5
    assert lines[3]["msg"] == "ok"


def test_wandb_writer_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from callbacks.writers import WandbWriter

    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))  # keep the user's ~/.cache clean
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    w = WandbWriter(
        project="aurora-test", dir=tmp_path, mode="offline", config={"lr": 1e-3}, settings=settings
    )
    w.write_scalars(3, {"train/loss": 1.5})
    w.write_scalars(5, {"train/loss": 1.25, "lr": 0.5})
    w.close()
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    # W&B's service process may write the last records just after `finish()` returns.
    deadline = time.monotonic() + 15.0
    while len(rows := _wandb_history(pathlib.Path(runs[0]))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [(r["_step"], r["train/loss"]) for r in rows] == [(3, 1.5), (5, 1.25)]
    assert rows[1]["lr"] == 0.5


class _Recorder(MetricWriter):
    """Records calls; also proves the abstract interface is implementable as CLU's is."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def write_summaries(self, step, values, metadata=None):
        self.calls.append(("summaries", step))

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_images(self, step, images):
        self.calls.append(("images", step))

    def write_videos(self, step, videos):
        self.calls.append(("videos", step))

    def write_audios(self, step, audios, *, sample_rate):
        self.calls.append(("audios", step, sample_rate))

    def write_texts(self, step, texts):
        self.calls.append(("texts", step))

    def write_histograms(self, step, arrays, num_buckets=None):
        self.calls.append(("histograms", step))

    def write_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


def test_metric_writer_is_abstract_and_multiwriter_fans_out():
    with pytest.raises(TypeError):
        MetricWriter()  # type: ignore[abstract]
    a, b = _Recorder(), _Recorder()
    m = MultiWriter([a, b])
    m.write_scalars(7, {"x": 1.0})
    m.write_audios(7, {"s": np.zeros((1, 4, 1))}, sample_rate=16000)
    m.write_hparams({"h": 1})
    m.flush()
    m.close()
    expected = [
        ("scalars", 7, {"x": 1.0}),
        ("audios", 7, 16000),
        ("hparams", {"h": 1}),
        ("flush",),
        ("close",),
    ]
    assert a.calls == expected and b.calls == expected


def test_make_writers_from_config_and_non_zero_process(tmp_path):
    import ml_collections

    cfg = [{"type": "tensorboard"}, {"type": "csv"}, {"type": "jsonl", "path": "logs/m.jsonl"}]
    writers = make_writers(
        ml_collections.ConfigDict({"writers": cfg}).writers, tmp_path, is_global_zero=True
    )
    assert [type(w) for w in writers] == [TensorBoardWriter, CsvWriter, JsonlWriter]
    for w in writers:
        w.write_scalars(1, {"train/loss": 3.0})
        w.close()
    assert _tb_scalars(tmp_path / "tensorboard")["train/loss"] == [(1, 3.0)]
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1].startswith("1,train/loss,3.0,")
    assert json.loads((tmp_path / "logs" / "m.jsonl").read_text())["train/loss"] == 3.0

    other = tmp_path / "rank1"
    writers = make_writers(cfg, other, is_global_zero=False)
    assert len(writers) == 3 and all(isinstance(w, NoopWriter) for w in writers)
    for w in writers:
        w.write_scalars(1, {"a": 1.0})
    assert not other.exists()

    with pytest.raises(ValueError, match="unknown writer type"):
        make_writers([{"type": "mlflow"}], tmp_path, is_global_zero=False)


# --------------------------------------------------------------------------------------------------
# The callbacks in the real Trainer: a tiny model fitted for a few steps, a clock that the steps
# advance (so that times and rates are exact), the rows the writers received
# --------------------------------------------------------------------------------------------------


class Clock:
    """Monotonic seconds that move only when `Ticks` says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Ticks(Callback):
    """Advances `clock` as if each optimiser step took `step_s` and each validation batch
    `val_batch_s`; first among the callbacks, so that the others see the time at a step's end."""

    def __init__(self, clock: Clock, step_s: float, val_batch_s: float = 0.0) -> None:
        self.clock, self.step_s, self.val_batch_s = clock, step_s, val_batch_s

    def on_train_batch_end(self, trainer, outputs, batch, batch_idx):
        self.clock.now += self.step_s

    def on_validation_batch_end(self, trainer, outputs, batch, batch_idx):
        self.clock.now += self.val_batch_s


def _rows(recorder: _Recorder) -> dict[str, dict[int, float]]:
    """`{tag: {step: value}}` of the scalars a writer received."""
    rows: dict[str, dict[int, float]] = {}
    for call in recorder.calls:
        if call[0] == "scalars":
            for tag, value in call[2].items():
                rows.setdefault(tag, {})[call[1]] = float(value)
    return rows


@pytest.fixture(scope="module")
def model():
    return tiny_model()


ACCUMULATING = ml_collections.ConfigDict(
    {"learning_rate": 1e-2, "warmup_steps": 0, "schedule": "constant"}
)
"""The optimiser of tests/test_trainer.py's accumulation test, whose compiled step this reuses."""


def _fit(
    model, workdir, callbacks, data, val_data=None, *, writers=(), optimizer=OPTIM, **kwargs
) -> Trainer:
    """`Trainer.fit` of the tiny model with the strategy and optimiser of tests/test_trainer.py
    (so that the persistent cache serves their compiled steps); `kwargs` are the Trainer's."""
    trainer = Trainer(
        RolloutStrategy(model, steps=2, backprop="all"),
        optimizer=optimizer,
        callbacks=callbacks,
        writers=list(writers),
        workdir=workdir,
        **{"log_every_n_steps": 1, **kwargs},
    )
    trainer.fit(data, val_data)
    return trainer


def _val_line(step: int, metrics: dict[str, float]) -> str:
    return " | ".join(
        [f"validation @ step {step}", *(f"{k} {v:.5g}" for k, v in sorted(metrics.items()))]
    )


@pytest.fixture(scope="module")
def run(model, tmp_path_factory):
    """Six steps (4 batches an epoch), metrics logged every 2, validation (2 batches) every 3;
    each step takes 0.5 s and each validation batch 1 s; then a stand-alone validation."""
    workdir = tmp_path_factory.mktemp("run")
    clock, plain, tty = Clock(), io.StringIO(), io.StringIO()
    recorder = _Recorder()
    writers = make_writers(
        [{"type": "csv"}, {"type": "tensorboard"}, {"type": "jsonl"}], workdir, is_global_zero=True
    )
    early = EarlyStopping(patience=2)
    timer = Timer(duration=3600, clock=clock)
    callbacks = [
        Ticks(clock, step_s=0.5, val_batch_s=1.0),
        ProgressBar(stream=plain, tty=False, clock=clock),  # every log_every_n_steps
        ProgressBar(refresh_every_n_steps=3, stream=tty, tty=True, clock=clock),
        LearningRateMonitor(),  # every log_every_n_steps
        LearningRateMonitor(logging_interval_steps=1, name="lr/each"),
        timer,
        early,
    ]
    data = _data(model, n=4)
    trainer = _fit(
        model,
        workdir,
        callbacks,
        data,
        data,
        writers=[*writers, recorder],
        max_steps=6,
        log_every_n_steps=2,
        val_check_interval=3,
        limit_val_batches=2,
    )
    early_after_fit = early.state_dict()
    stand_alone = trainer.validate(data)
    for w in writers:
        w.close()
    return SimpleNamespace(
        trainer=trainer,
        workdir=workdir,
        plain=plain.getvalue(),
        tty=tty.getvalue(),
        rows=_rows(recorder),
        early=early,
        early_after_fit=early_after_fit,
        timer=timer,
        stand_alone=stand_alone,
    )


def _val_metrics(run, step: int) -> dict[str, float]:
    return {tag: by_step[step] for tag, by_step in run.rows.items() if tag.startswith("val/")}


# --------------------------------------------------------------------------------------------------
# ProgressBar
# --------------------------------------------------------------------------------------------------


def test_progress_bar_prints_plain_lines_off_a_terminal(run):
    """Every log_every_n_steps and at the last step; the loss is the latest one fetched (a step
    late, so step 4 shows step 2's); steps/s leaves the validations out, the ETA counts them."""
    loss = run.rows["train/loss"]
    assert sorted(loss) == [2, 4, 6]
    assert run.plain.splitlines() == [
        f"epoch 0 | step 2/6 (33%) | 2 steps/s | ETA 0:00:02 | loss {loss[2]:.5g}",
        _val_line(3, _val_metrics(run, 3)),
        # 3 steps in 3.5 s since the first (2 s of it validation): 2 steps left take 2.3 s
        f"epoch 0 | step 4/6 (67%) | 2 steps/s | ETA 0:00:02 | loss {loss[2]:.5g} (step 2)",
        f"epoch 1 | step 6/6 (100%) | 2 steps/s | ETA 0:00:00 | loss {loss[6]:.5g}",
        _val_line(6, _val_metrics(run, 6)),
        _val_line(6, run.stand_alone),  # a stand-alone validation prints too
    ]
    assert run.stand_alone["val/loss"] == pytest.approx(run.rows["val/loss"][6], rel=1e-6)


def test_progress_bar_redraws_in_place_on_a_terminal(run):
    loss = run.rows["train/loss"]
    assert run.tty == (
        f"\repoch 0 | step 3/6 (50%) | 2 steps/s | ETA 0:00:02 | loss {loss[2]:.5g} (step 2)\n"
        + _val_line(3, _val_metrics(run, 3))
        + "\n"
        + f"\repoch 1 | step 6/6 (100%) | 2 steps/s | ETA 0:00:00 | loss {loss[6]:.5g}\n"
        + _val_line(6, _val_metrics(run, 6))
        + "\n"
        + _val_line(6, run.stand_alone)
        + "\n"
    )


# --------------------------------------------------------------------------------------------------
# LearningRateMonitor, Timer, EarlyStopping and the writers in the same run
# --------------------------------------------------------------------------------------------------


def test_lr_monitor_logs_the_rate_of_each_logged_update(run):
    """The rate that made step s: OPTIM's warm-up reaches its peak at the second update."""
    peak = OPTIM.learning_rate
    expected = {s: peak * min(s / OPTIM.warmup_steps, 1.0) for s in range(1, 7)}
    assert run.rows["lr/each"] == pytest.approx(expected)
    assert run.rows["lr"] == pytest.approx({s: expected[s] for s in (2, 4, 6)})


def test_timer_counts_training_and_validations_during_fit(run):
    """6 steps of 0.5 s and 2 validations of 2 s; the stand-alone validation after fit is not
    training time."""
    assert run.timer.time_elapsed() == pytest.approx(7.0)
    assert run.timer.state_dict()["elapsed_s"] == pytest.approx(7.0)
    assert not run.trainer.should_stop


def test_early_stopping_tracks_the_best_and_ignores_stand_alone_validation(run):
    val = run.rows["val/loss"]
    best = min(val[3], val[6])
    assert run.early_after_fit == {
        "monitor": "val/loss",
        "mode": "min",
        "best_score": pytest.approx(best),
        "wait_count": 0 if val[6] < val[3] else 1,
        "stopped_step": None,
    }
    assert run.early.state_dict() == run.early_after_fit  # trainer.validate() does not count


def test_writers_hold_the_rows_a_user_can_pivot(run):
    """CSV, TensorBoard and JSONL hold what the trainer logged (the rows the recorder got)."""
    rows = list(csv.DictReader((run.workdir / "metrics.csv").open()))
    csv_rows = {(int(r["step"]), r["tag"]): float(r["value"]) for r in rows}
    for tag in ("train/loss", "lr", "lr/each", "val/loss"):
        for step, value in run.rows[tag].items():
            assert csv_rows[(step, tag)] == pytest.approx(value), (step, tag)
    assert {s for s, tag in csv_rows if tag == "train/loss"} == {2, 4, 6}
    steps, values = zip(*_tb_scalars(run.workdir / "tensorboard")["val/loss"], strict=True)
    assert steps == (3, 6, 6)  # fit's two validations, then the stand-alone one
    val = run.rows["val/loss"]
    assert values == pytest.approx([val[3], val[6], run.stand_alone["val/loss"]])
    lines = [json.loads(line) for line in (run.workdir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in lines if "train/loss" in r] == [
        (s, pytest.approx(v)) for s, v in sorted(run.rows["train/loss"].items())
    ]


# --------------------------------------------------------------------------------------------------
# Stopping runs
# --------------------------------------------------------------------------------------------------


def test_parse_duration_forms():
    assert parse_duration("00:01:00:00") == 3600.0
    assert parse_duration("00:00:02:30") == 150.0
    assert parse_duration("01:30") == 90.0
    assert parse_duration(12) == 12.0
    assert parse_duration({"minutes": 2}) == 120.0
    for bad in ("1:2:3:4:5", "ab", 0):
        with pytest.raises(ValueError):
            parse_duration(bad)


@pytest.mark.slow  # CI time
def test_timer_budget_is_for_the_whole_run_across_resumes(model, tmp_path):
    """A job stopped after 4 s of training (1 s a step) resumes from its checkpoint and stops at
    the 10 s budget; resumed once more, it stops before any step. With gradient accumulation the
    learning rate is logged once per optimiser step."""
    clock, recorder = Clock(), _Recorder()
    data = _data(model, n=4)  # 2 optimiser steps an epoch

    def job(max_steps: int, writers=()) -> tuple[Trainer, Timer]:
        timer = Timer(duration=10, clock=clock)
        callbacks = [Ticks(clock, step_s=1.0), timer, ModelCheckpoint(every_n_steps=4)]
        callbacks.append(LearningRateMonitor(logging_interval_steps=1))
        trainer = _fit(
            model,
            tmp_path,
            callbacks,
            data,
            writers=writers,
            max_steps=max_steps,
            optimizer=ACCUMULATING,
            accumulate_grad_batches=2,
        )
        return trainer, timer

    trainer, timer = job(4, writers=[recorder])
    assert trainer.global_step == 4 and not trainer.should_stop
    assert timer.state_dict()["elapsed_s"] == pytest.approx(4.0)
    assert _rows(recorder)["lr"] == pytest.approx(
        dict.fromkeys((1, 2, 3, 4), ACCUMULATING.learning_rate)
    )

    clock.now += 3600.0  # time between jobs is not training time
    trainer, timer = job(100)
    assert trainer.should_stop and trainer.global_step == 10
    assert timer.time_elapsed() == pytest.approx(10.0)

    trainer, timer = job(100)  # resumed already over budget
    assert trainer.should_stop and trainer.global_step == 10


@pytest.mark.parametrize(
    "first_job_steps",
    [
        pytest.param(5, marks=pytest.mark.slow),  # CI time; its last checkpoint is step 5's
        4,  # its last checkpoint is written after step 4's validation
    ],
)
def test_early_stopping_patience_min_delta_and_max_mode_survive_a_resume(
    model, tmp_path, first_job_steps
):
    """One example to train and validate on, so that val/loss falls at every check: in "max"
    mode it stops improving after the first check, and in "min" mode with min_delta 1 no check
    improves enough. A job ends after the check at step 4; the resumed one keeps each callback's
    best and wait count (two states, one class) and stops at step 6: patience 2 of "max" spent
    at checks 4 and 6, as in an uninterrupted run (a fresh state would stop at step 10)."""
    data = InMemoryData([_example(model, 0)] * 2, shuffle=False)

    def callbacks():
        return [
            EarlyStopping(min_delta=1.0, patience=3),
            EarlyStopping(mode="max", patience=2),
            EarlyStopping(monitor="val/rmse_2t", strict=False),  # never logged: skipped
            ModelCheckpoint(every_n_steps=2),
        ]

    recorder = _Recorder()
    first = callbacks()
    options = dict(val_check_interval=2, limit_val_batches=1, writers=[recorder])
    trainer = _fit(model, tmp_path, first, data, data, max_steps=first_job_steps, **options)
    assert trainer.global_step == first_job_steps and not trainer.should_stop
    val = _rows(recorder)["val/loss"]
    assert first[1].state_dict()["wait_count"] == 1 and first[1].best_score == val[2]

    resumed = callbacks()
    trainer = _fit(model, tmp_path, resumed, data, data, max_steps=20, **options)
    val = _rows(recorder)["val/loss"]
    assert val[2] > val[4] > val[6], val
    assert trainer.should_stop and trainer.global_step == 6 and sorted(val) == [2, 4, 6]
    at_min, at_max, loose = (cb.state_dict() for cb in resumed[:3])
    assert at_max == {
        "monitor": "val/loss",
        "mode": "max",
        "best_score": val[2],
        "wait_count": 2,
        "stopped_step": 6,
    }
    assert (at_min["best_score"], at_min["wait_count"], at_min["stopped_step"]) == (val[2], 2, None)
    assert (loose["best_score"], loose["wait_count"]) == (None, 0)


def test_off_process_zero_nothing_is_printed_or_written_and_a_nan_score_stops(model, tmp_path):
    """A diverged validation (NaN inputs) stops at its first check; on a process other than 0 the
    progress bar prints nothing and the writers get nothing, but the stop is the same."""
    inputs, targets = _example(model, 0)
    nan = inputs.replace(
        surf_vars={**inputs.surf_vars, "2t": np.full_like(inputs.surf_vars["2t"], np.nan)}
    )
    stream, recorder = io.StringIO(), _Recorder()
    trainer = Trainer(
        RolloutStrategy(model, steps=2, backprop="all"),
        optimizer=OPTIM,
        callbacks=[ProgressBar(refresh_every_n_steps=1, stream=stream), EarlyStopping(patience=10)],
        writers=[recorder],
        workdir=tmp_path,
        max_steps=10,
        val_check_interval=2,
        log_every_n_steps=1,
    )
    trainer.is_global_zero = False
    trainer.fit(_data(model, n=4), InMemoryData([(nan, targets)], shuffle=False))
    assert trainer.should_stop and trainer.global_step == 2
    assert np.isnan(trainer.callback_metrics["val/loss"])
    assert stream.getvalue() == "" and recorder.calls == []


def test_early_stopping_refuses_a_metric_that_is_never_logged(model, tmp_path):
    with pytest.raises(RuntimeError, match="val/rmse_2t"):
        _fit(
            model,
            tmp_path,
            [EarlyStopping(monitor="val/rmse_2t")],
            _data(model, n=4),
            _data(model, n=1),
            max_steps=4,
            val_check_interval=2,
        )


def test_early_stopping_on_train_epoch_end(model, tmp_path):
    """Monitoring the training loss at each epoch's end: one example, two batches an epoch, a
    falling loss, so "max" mode with patience 1 stops at the end of the second epoch."""
    recorder = _Recorder()
    early = EarlyStopping(monitor="train/loss", mode="max", check_on="train_epoch_end", patience=1)
    data = InMemoryData([_example(model, 0)] * 2, shuffle=False)
    trainer = _fit(model, tmp_path, [early], data, writers=[recorder], max_steps=100)
    loss = _rows(recorder)["train/loss"]
    assert loss[4] < loss[2], loss
    assert trainer.should_stop and trainer.global_step == 4 and trainer.current_epoch == 2
    assert (early.best_score, early.stopped_step) == (pytest.approx(loss[2]), 4)
