"""Metric writers, ProgressBar, EarlyStopping, LearningRateMonitor and Timer, driven by a fake trainer.

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
import types
from typing import Any

import numpy as np
import pytest

from callbacks.base import Callback
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
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
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
    image_ev, image = by_tag["map"]
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
    assert {k: v for k, v in lines[1].items() if k != "wall_time"} == {"step": 5, "train/loss": 0.25}
    assert lines[2]["step"] == 6 and lines[2]["val/rmse_2t"] == 1.5
    assert lines[3]["msg"] == "ok"


def test_wandb_writer_offline_run_directory(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from callbacks.writers import WandbWriter

    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    settings = wandb.Settings(silent=True, console="off", x_disable_stats=True)
    w = WandbWriter(project="aurora-test", dir=tmp_path, mode="offline", config={"lr": 1e-3}, settings=settings)
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

    def write_summaries(self, step, values, metadata=None): self.calls.append(("summaries", step))
    def write_scalars(self, step, scalars): self.calls.append(("scalars", step, dict(scalars)))
    def write_images(self, step, images): self.calls.append(("images", step))
    def write_videos(self, step, videos): self.calls.append(("videos", step))
    def write_audios(self, step, audios, *, sample_rate): self.calls.append(("audios", step, sample_rate))
    def write_texts(self, step, texts): self.calls.append(("texts", step))
    def write_histograms(self, step, arrays, num_buckets=None): self.calls.append(("histograms", step))
    def write_hparams(self, hparams): self.calls.append(("hparams", dict(hparams)))
    def flush(self): self.calls.append(("flush",))
    def close(self): self.calls.append(("close",))


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
    expected = [("scalars", 7, {"x": 1.0}), ("audios", 7, 16000), ("hparams", {"h": 1}), ("flush",), ("close",)]
    assert a.calls == expected and b.calls == expected


def test_make_writers_from_config_and_non_zero_process(tmp_path):
    cfg = [{"type": "tensorboard"}, {"type": "csv"}, {"type": "jsonl", "path": "logs/m.jsonl"}]
    writers = make_writers(cfg, tmp_path, is_global_zero=True)
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
