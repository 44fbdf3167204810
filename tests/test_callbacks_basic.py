"""Metric writers, ProgressBar, EarlyStopping, LearningRateMonitor and Timer, with a fake trainer.

The fake trainer has the attributes the real one exposes to callbacks and calls the hooks in the
order the real loop does (see `_fit`); each test checks an effect a user would see: files read back,
`should_stop` set at the right step, state restored, lines printed.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import pathlib
import struct
import time
from typing import Any

import numpy as np
import pytest

from callbacks.base import Callback
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
# A fake trainer that calls the hooks as trainers/trainer.py does
# --------------------------------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds that advance only when the fake training loop says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTrainer:
    """The attributes callbacks may use, and a loop with the real trainer's hook order.

    Per optimiser step: `on_train_batch_start` and `on_before_optimizer_step` per micro-batch, the
    (fake) step advancing the clock by `step_seconds`, then `global_step += 1`, `train/loss` into
    `callback_metrics` every `log_every_n_steps`, `on_train_batch_end`, and every `val_every` steps
    a validation whose mean metrics land in `callback_metrics` before `on_validation_epoch_end` /
    `on_validation_end`; the loop ends when `should_stop` is set or `max_steps` is reached.
    """

    def __init__(
        self,
        callbacks: list[Callback],
        *,
        max_steps: int | None = None,
        log_every_n_steps: int = 1,
        writers: list[MetricWriter] | None = None,
        lr_fn=lambda step: 0.1,
        is_global_zero: bool = True,
        clock: FakeClock | None = None,
        step_seconds: float = 0.5,
        val_seconds: float = 0.0,
        workdir: pathlib.Path | None = None,
    ) -> None:
        self.callbacks = callbacks
        self.max_steps = max_steps
        self.estimated_stepping_batches = max_steps
        self.log_every_n_steps = log_every_n_steps
        self.writers = writers or []
        self.lr_fn = lr_fn
        self.is_global_zero = is_global_zero
        self.clock = clock or FakeClock()
        self.step_seconds = step_seconds
        self.val_seconds = val_seconds
        self.workdir = workdir or pathlib.Path(".")
        self.config = None
        self.global_step = 0
        self.current_epoch = 0
        self.should_stop = False
        self.callback_metrics: dict[str, float] = {}

    def learning_rate(self) -> float:
        return float(self.lr_fn(self.global_step))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.is_global_zero or not metrics:
            return
        for w in self.writers:
            w.write_scalars(self.global_step if step is None else int(step), metrics)

    def call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def validate(self, val_loss: float, extra: dict[str, float] | None = None) -> None:
        self.call("on_validation_start")
        self.call("on_validation_epoch_start")
        for i in range(2):
            self.call("on_validation_batch_start", None, i)
            self.clock.now += self.val_seconds / 2
            self.call("on_validation_batch_end", {"loss": np.float32(val_loss)}, None, i)
        means = {"val/loss": float(val_loss), **(extra or {})}
        self.callback_metrics.update(means)
        self.log_metrics(means)
        self.call("on_validation_epoch_end")
        self.call("on_validation_end")

    def fit(
        self,
        losses: list[float],
        *,
        val_every: int | None = None,
        val_losses: list[float] | None = None,
        accumulate: int = 1,
        steps_per_epoch: int = 1000,
    ) -> None:
        """One optimiser step per entry of `losses` (until stopped), `steps_per_epoch` per epoch;
        the validations take their loss from `val_losses` in turn."""
        val_iter = iter(val_losses or [])
        self.call("setup", "fit")
        self.call("on_fit_start")
        self.call("on_train_start")
        i, stop = 0, False
        while i < len(losses) and not stop and not self.should_stop:
            self.call("on_train_epoch_start")
            for batch_idx, loss in enumerate(losses[i : i + steps_per_epoch]):
                i += 1
                for micro in range(accumulate):
                    self.call("on_train_batch_start", None, batch_idx * accumulate + micro)
                    self.call("on_before_optimizer_step")
                    self.clock.now += self.step_seconds / accumulate
                self.global_step += 1
                outputs = {"loss": np.float32(loss), "grad_norm": np.float32(1.0)}
                if self.global_step % self.log_every_n_steps == 0:
                    self.callback_metrics["train/loss"] = float(loss)
                    self.log_metrics({"train/loss": float(loss)})
                self.call("on_train_batch_end", outputs, None, (batch_idx + 1) * accumulate - 1)
                if val_every and self.global_step % val_every == 0:
                    self.validate(next(val_iter))
                if self.should_stop or (
                    self.max_steps is not None and self.global_step >= self.max_steps
                ):
                    stop = True
                    break
            else:
                self.call("on_train_epoch_end")
                self.current_epoch += 1
        self.call("on_train_end")
        self.call("on_fit_end")
        self.call("teardown", "fit")


# --------------------------------------------------------------------------------------------------
# ProgressBar
# --------------------------------------------------------------------------------------------------


def test_progress_bar_plain_lines_when_not_a_tty(capsys):
    clock = FakeClock()
    bar = ProgressBar(refresh_every_n_steps=5, clock=clock)
    trainer = FakeTrainer([bar], max_steps=20, clock=clock, step_seconds=0.5, val_seconds=5.0)
    trainer.fit([float(20 - k) for k in range(20)], val_every=10, val_losses=[0.5, 0.25])
    trainer.validate(0.5, {"val/rmse_2t": 1.25})  # stand-alone validation prints too
    out = capsys.readouterr().out
    assert "\r" not in out
    assert out.splitlines() == [
        "epoch 0 | step 5/20 (25%) | 2 steps/s | ETA 0:00:08 | loss 16",
        "epoch 0 | step 10/20 (50%) | 2 steps/s | ETA 0:00:05 | loss 11",
        "validation @ step 10 | val/loss 0.5",
        # steps/s leaves the 5 s validation out; the ETA (14 steps in 12 s so far) counts it
        "epoch 0 | step 15/20 (75%) | 2 steps/s | ETA 0:00:04 | loss 6",
        "epoch 0 | step 20/20 (100%) | 2 steps/s | ETA 0:00:00 | loss 1",
        "validation @ step 20 | val/loss 0.25",
        "validation @ step 20 | val/loss 0.5 | val/rmse_2t 1.25",
    ]


def test_progress_bar_defaults_to_log_interval_and_prints_last_step(capsys):
    clock = FakeClock()
    trainer = FakeTrainer([ProgressBar(clock=clock)], max_steps=7, log_every_n_steps=3, clock=clock)
    trainer.fit([1.0] * 7)
    steps = [line.split(" | ")[1] for line in capsys.readouterr().out.splitlines()]
    assert steps == ["step 3/7 (43%)", "step 6/7 (86%)", "step 7/7 (100%)"]


def test_progress_bar_redraws_in_place_on_a_tty():
    clock, stream = FakeClock(), io.StringIO()
    bar = ProgressBar(refresh_every_n_steps=2, stream=stream, tty=True, clock=clock)
    FakeTrainer([bar], max_steps=4, clock=clock).fit(
        [3.0, 2.0, 1.0, 0.5], val_every=4, val_losses=[0.75]
    )
    out = stream.getvalue()
    assert out.startswith("\repoch 0 | step 2/4 (50%)")
    assert "\repoch 0 | step 4/4 (100%)" in out
    # the validation line starts on a fresh line and the output ends with a newline
    assert "loss 0.5\nvalidation @ step 4 | val/loss 0.75\n" in out and out.endswith("\n")
    assert out.count("\n") == 2


def test_progress_bar_is_silent_off_process_zero(capsys):
    FakeTrainer([ProgressBar(refresh_every_n_steps=1)], max_steps=3, is_global_zero=False).fit(
        [1.0] * 3
    )
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------------
# EarlyStopping
# --------------------------------------------------------------------------------------------------


def test_early_stopping_stops_after_patience_checks_without_improvement():
    es = EarlyStopping(monitor="val/loss", patience=2, min_delta=0.05)
    trainer = FakeTrainer([es], max_steps=100)
    # improvements: 1.0 (first), 0.8; then 0.78 is within min_delta (no), 0.9 (no) -> stop
    trainer.fit([1.0] * 100, val_every=5, val_losses=[1.0, 0.8, 0.78, 0.9, 0.1, 0.1])
    assert trainer.should_stop and trainer.global_step == 20
    assert es.state_dict() == {
        "monitor": "val/loss",
        "mode": "min",
        "best_score": 0.8,
        "wait_count": 2,
        "stopped_step": 20,
    }


def test_early_stopping_max_mode_and_non_finite():
    es = EarlyStopping(monitor="val/acc", mode="max", patience=1)
    trainer = FakeTrainer([es], max_steps=100)
    trainer.call("setup", "fit")
    for acc in (0.5, 0.6):
        trainer.callback_metrics["val/acc"] = acc
        es.on_validation_end(trainer)
    assert not trainer.should_stop and es.best_score == 0.6
    trainer.callback_metrics["val/acc"] = 0.55
    es.on_validation_end(trainer)
    assert trainer.should_stop

    es = EarlyStopping(patience=10)
    trainer = FakeTrainer([es], max_steps=100)
    trainer.fit([1.0] * 100, val_every=3, val_losses=[1.0, float("nan"), 0.5])
    assert trainer.should_stop and trainer.global_step == 6


def test_early_stopping_state_round_trip_keeps_patience_on_resume():
    es = EarlyStopping(patience=3)
    trainer = FakeTrainer([es], max_steps=4)
    trainer.fit([1.0] * 4, val_every=2, val_losses=[0.5, 0.6])  # best 0.5, one check without gain
    assert not trainer.should_stop
    saved = json.loads(json.dumps(es.state_dict()))  # checkpoints store it as JSON

    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(saved)
    assert (resumed.best_score, resumed.wait_count) == (0.5, 1)
    trainer = FakeTrainer([resumed], max_steps=100)
    trainer.global_step = 4
    trainer.fit([1.0] * 96, val_every=2, val_losses=[0.7, 0.55, 0.4])
    assert trainer.should_stop and trainer.global_step == 8  # two more checks, not three
    assert resumed.state_key != EarlyStopping(monitor="val/rmse_2t").state_key


def test_early_stopping_on_train_epoch_end():
    es = EarlyStopping(monitor="train/loss", check_on="train_epoch_end", patience=1)
    trainer = FakeTrainer([es], max_steps=100)
    trainer.fit([1.0] * 5 + [0.5] * 5 + [0.7] * 5 + [0.1] * 5, steps_per_epoch=5)
    assert trainer.should_stop and trainer.global_step == 15 and trainer.current_epoch == 3


def test_early_stopping_strict_missing_metric_and_standalone_validate():
    es = EarlyStopping(monitor="val/rmse_2t")
    with pytest.raises(RuntimeError, match="val/rmse_2t"):
        FakeTrainer([es], max_steps=10).fit([1.0] * 10, val_every=2, val_losses=[1.0] * 5)

    es = EarlyStopping(monitor="val/rmse_2t", strict=False)
    trainer = FakeTrainer([es], max_steps=4)
    trainer.fit([1.0] * 4, val_every=2, val_losses=[1.0, 1.0])
    assert not trainer.should_stop

    es = EarlyStopping(patience=1)
    trainer = FakeTrainer([es])
    for loss in (1.0, 2.0, 3.0):  # trainer.validate() outside fit does not count
        trainer.validate(loss)
    assert not trainer.should_stop and es.best_score is None


# --------------------------------------------------------------------------------------------------
# LearningRateMonitor
# --------------------------------------------------------------------------------------------------


def test_lr_monitor_logs_the_rate_of_each_logged_update(tmp_path):
    writer = JsonlWriter(tmp_path / "m.jsonl")
    schedule = lambda count: 0.01 * (count + 1)
    trainer = FakeTrainer(
        [LearningRateMonitor(logging_interval_steps=2)],
        max_steps=6,
        writers=[writer],
        lr_fn=schedule,
    )
    trainer.fit([1.0] * 6, accumulate=2)
    writer.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    assert lrs == [(2, pytest.approx(0.02)), (4, pytest.approx(0.04)), (6, pytest.approx(0.06))]


def test_lr_monitor_defaults_to_log_every_n_steps():
    rec = _Recorder()
    trainer = FakeTrainer(
        [LearningRateMonitor(name="train/lr")],
        max_steps=9,
        log_every_n_steps=3,
        writers=[rec],
        lr_fn=float,
    )
    trainer.fit([1.0] * 9)
    assert [c[1:] for c in rec.calls if "train/lr" in c[2]] == [
        (3, {"train/lr": 2.0}),
        (6, {"train/lr": 5.0}),
        (9, {"train/lr": 8.0}),
    ]


# --------------------------------------------------------------------------------------------------
# Timer
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


def test_timer_stops_at_budget_and_resumed_run_counts_on():
    clock = FakeClock()
    timer = Timer(duration="00:00:00:10", clock=clock)
    trainer = FakeTrainer([timer], max_steps=100, clock=clock, step_seconds=1.0)
    trainer.fit([1.0] * 100)
    assert trainer.should_stop and trainer.global_step == 10
    assert timer.time_elapsed() == pytest.approx(10.0)

    # a job killed after 4 s of training, then resumed from its checkpoint
    clock = FakeClock()
    first = Timer(duration=10, clock=clock)
    trainer = FakeTrainer([first], max_steps=4, clock=clock, step_seconds=1.0)
    trainer.fit([1.0] * 4)
    assert not trainer.should_stop
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved["elapsed_s"] == pytest.approx(4.0)

    clock.now += 3600.0  # time between jobs is not training time
    second = Timer(duration=10, clock=clock)
    second.load_state_dict(saved)
    trainer = FakeTrainer([second], max_steps=100, clock=clock, step_seconds=1.0)
    trainer.global_step = 4
    trainer.fit([1.0] * 96)
    assert trainer.should_stop and trainer.global_step == 10

    # resumed when already over budget: stops before any step
    late = Timer(duration=5, clock=clock)
    late.load_state_dict({"elapsed_s": 6.0})
    trainer = FakeTrainer([late], max_steps=100, clock=clock)
    trainer.fit([1.0] * 100)
    assert trainer.should_stop and trainer.global_step == 0


# --------------------------------------------------------------------------------------------------
# Together
# --------------------------------------------------------------------------------------------------


def test_callbacks_together_write_csv_a_user_can_pivot(tmp_path, capsys):
    clock = FakeClock()
    writers = make_writers(
        [{"type": "csv"}, {"type": "tensorboard"}], tmp_path, is_global_zero=True
    )
    callbacks = [
        ProgressBar(refresh_every_n_steps=4, clock=clock),
        LearningRateMonitor(logging_interval_steps=4),
        EarlyStopping(patience=1),
        Timer(duration=3600, clock=clock),
    ]
    trainer = FakeTrainer(
        callbacks, max_steps=40, log_every_n_steps=4, writers=writers, clock=clock
    )
    trainer.fit([1.0 / (k + 1) for k in range(40)], val_every=8, val_losses=[0.5, 0.4, 0.45, 0.3])
    for w in writers:
        w.close()
    assert trainer.should_stop and trainer.global_step == 24  # val/loss rose at step 24
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    tags = {(int(r["step"]), r["tag"]) for r in rows}
    assert {(8, "train/loss"), (8, "lr"), (8, "val/loss"), (24, "val/loss")} <= tags
    steps, values = zip(
        *_tb_scalars(tmp_path / "tensorboard")["val/loss"], strict=True
    )  # float32 in event files
    assert steps == (8, 16, 24) and values == pytest.approx([0.5, 0.4, 0.45])
    assert "validation @ step 24 | val/loss 0.45" in capsys.readouterr().out
