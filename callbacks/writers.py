"""Metric writers with CLU's `MetricWriter` interface, without TensorFlow.

Why our own: in clu 0.0.12 `import clu.metric_writers` imports TensorFlow, far too heavy for a
trainer that otherwise needs none. The abstract class below keeps CLU's method names and signatures
(`write_scalars(step, scalars)`, `write_hparams(hparams)`, `flush()`, ...), so code written against
CLU's writers, including a CLU writer itself, drops in.

Every write takes an explicit integer `step` (the trainer passes `state.step`), so curves line up
across writers and across resumed runs whatever order the calls come in.

Writers:

* :class:`TensorBoardWriter` -- TensorBoard event files through `tensorboardX` (no TensorFlow).
* :class:`WandbWriter` -- Weights & Biases; `mode="offline"` writes a local run directory and needs
  no network (sync later with `wandb sync DIR`). `wandb` is imported only when one is built.
* :class:`CsvWriter` -- long format, one row per scalar: ``step,tag,value,wall_time``. Long rather
  than wide because train and validation metrics arrive at different steps and new tags may appear
  mid-run; a wide file would need its header rewritten. Pivot with
  ``pandas.read_csv(p).pivot_table(index="step", columns="tag", values="value")``. Reopening an
  existing file appends rows and never writes a second header (resume).
* :class:`JsonlWriter` -- one JSON object per call: ``{"step": 10, "wall_time": ..., "train/loss":
  0.5}`` for scalars (texts likewise, with string values) and ``{"hparams": {...}, "wall_time":
  ...}`` for hyper-parameters. Non-finite floats are written as Python's `json` writes them
  (``NaN``, ``Infinity``), so a diverged loss stays visible.
* :class:`MultiWriter` fans every call out; :class:`NoopWriter` is what processes other than 0 get.

:func:`make_writers` builds writers from simple config dicts such as ``{"type": "tensorboard"}``.
"""

from __future__ import annotations

import abc
import csv
import json
import logging
import operator
import os
import pathlib
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "CsvWriter",
    "JsonlWriter",
    "MetricWriter",
    "MultiWriter",
    "NoopWriter",
    "TensorBoardWriter",
    "WandbWriter",
    "flatten_hparams",
    "make_writers",
]

log = logging.getLogger(__name__)

Array = Any  # numpy or jax array
Scalar = Any  # int, float, numpy scalar, 0-d numpy/jax array


# --------------------------------------------------------------------------------------------------
# Interface (CLU's shape)
# --------------------------------------------------------------------------------------------------


class MetricWriter(abc.ABC):
    """CLU's writer interface. A writer that cannot store a kind of data ignores it (logging once)."""

    @abc.abstractmethod
    def write_summaries(
        self, step: int, values: Mapping[str, Array], metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Saves arbitrary tensors (custom plugins); writers without tensor support store scalars."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """Writes scalar values for `step`; consecutive calls may carry different tags."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, Array]) -> None:
        """Writes images shaped [N, H, W, C] or [H, W, C] (C = 1 or 3; floats in [0, 1] or uint8)."""

    @abc.abstractmethod
    def write_videos(self, step: int, videos: Mapping[str, Array]) -> None:
        """Writes videos shaped [N, T, H, W, C] or [T, H, W, C]."""

    @abc.abstractmethod
    def write_audios(self, step: int, audios: Mapping[str, Array], *, sample_rate: int) -> None:
        """Writes audio clips shaped [N, T, C] with values in [-1, 1]."""

    @abc.abstractmethod
    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """Writes text snippets for `step`."""

    @abc.abstractmethod
    def write_histograms(
        self, step: int, arrays: Mapping[str, Array], num_buckets: Mapping[str, int] | None = None
    ) -> None:
        """Writes histograms of `arrays` (bucket count per tag from `num_buckets`)."""

    @abc.abstractmethod
    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Writes hyper-parameters once per run (nested mappings are flattened with '.')."""

    @abc.abstractmethod
    def flush(self) -> None:
        """Writes out anything buffered."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flushes and releases files; calling the writer afterwards is undefined."""


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _as_step(step: Any) -> int:
    """The step as a Python int; floats are refused so a wrong argument order fails loudly."""
    try:
        return int(operator.index(step))
    except TypeError:
        arr = np.asarray(step)
        if arr.shape == () and np.issubdtype(arr.dtype, np.integer):
            return int(arr)
        raise TypeError(f"step must be an integer, got {step!r}") from None


def _as_float(value: Scalar) -> float:
    """A host float from a Python/numpy/jax scalar (fetching a device array synchronises)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"scalar expected, got shape {arr.shape}")
    return float(arr.reshape(()))


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flattens nested mappings to dotted keys; CLU's `write_hparams` wants a flat mapping."""
    if hasattr(hparams, "to_dict"):  # ml_collections.ConfigDict
        hparams = hparams.to_dict()
    flat: dict[str, Any] = {}
    for key, value in hparams.items():
        name = f"{prefix}{key}"
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def _simple_hparam(value: Any) -> bool | int | float | str:
    """TensorBoard's hparams plugin takes bool/int/float/str only; anything else is shown as str."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


class _WarnOnce:
    """Logs "writer X ignores Y" once per (writer, kind), not at every step."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, writer: object, kind: str, why: str = "") -> None:
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning("%s ignores %s%s", type(writer).__name__, kind, f" ({why})" if why else "")


def _png(image: np.ndarray) -> bytes:
    """Encodes an [H, W, C] uint8 image (C = 1, 3 or 4) as PNG; avoids a Pillow dependency."""
    height, width, channels = image.shape
    color_type = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (
            struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def _to_uint8_nhwc(images: Array) -> np.ndarray:
    """[N, H, W, C] uint8 from CLU's image convention ([H, W, C] allowed; floats in [0, 1])."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"images must be [N, H, W, C] or [H, W, C] with C in 1/3/4, got {arr.shape}"
        )
    if arr.dtype != np.uint8:
        arr = (np.clip(np.nan_to_num(arr.astype(np.float64)), 0.0, 1.0) * 255.0 + 0.5).astype(
            np.uint8
        )
    return arr


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


class NoopWriter(MetricWriter):
    """Accepts and drops everything: what non-zero processes hold, so callers need no `if`."""

    def write_summaries(self, step, values, metadata=None) -> None: ...
    def write_scalars(self, step, scalars) -> None: ...
    def write_images(self, step, images) -> None: ...
    def write_videos(self, step, videos) -> None: ...
    def write_audios(self, step, audios, *, sample_rate) -> None: ...
    def write_texts(self, step, texts) -> None: ...
    def write_histograms(self, step, arrays, num_buckets=None) -> None: ...
    def write_hparams(self, hparams) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class MultiWriter(MetricWriter):
    """Fans each call out to several writers, so the trainer talks to one object."""

    def __init__(self, writers: Iterable[MetricWriter]) -> None:
        self.writers: list[MetricWriter] = list(writers)

    def write_summaries(self, step, values, metadata=None) -> None:
        for w in self.writers:
            w.write_summaries(step, values, metadata)

    def write_scalars(self, step, scalars) -> None:
        for w in self.writers:
            w.write_scalars(step, scalars)

    def write_images(self, step, images) -> None:
        for w in self.writers:
            w.write_images(step, images)

    def write_videos(self, step, videos) -> None:
        for w in self.writers:
            w.write_videos(step, videos)

    def write_audios(self, step, audios, *, sample_rate) -> None:
        for w in self.writers:
            w.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts) -> None:
        for w in self.writers:
            w.write_texts(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        for w in self.writers:
            w.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams) -> None:
        for w in self.writers:
            w.write_hparams(hparams)

    def flush(self) -> None:
        for w in self.writers:
            w.flush()

    def close(self) -> None:
        for w in self.writers:
            w.close()


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in `logdir`, written by tensorboardX (no TensorFlow needed).

    Hyper-parameters go into the same run directory (tensorboardX's `add_hparams` would open a
    sub-run), so the HPARAMS tab shows them next to this run's scalars. Images are PNG-encoded here
    (no Pillow). Videos and audio are ignored: they need moviepy / soundfile and no Aurora workflow
    writes them.
    """

    def __init__(self, logdir: str | os.PathLike[str], flush_secs: int = 30) -> None:
        from tensorboardX import SummaryWriter

        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(logdir=str(self.logdir), flush_secs=flush_secs)
        self._warn = _WarnOnce()

    def _add(self, summary: Any, step: int) -> None:
        self._writer._get_file_writer().add_summary(summary, _as_step(step))

    def write_summaries(self, step, values, metadata=None) -> None:
        from tensorboardX.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboardX.proto.tensor_pb2 import TensorProto
        from tensorboardX.proto.tensor_shape_pb2 import TensorShapeProto

        for tag, value in values.items():
            arr = np.asarray(value, dtype=np.float32)
            tensor = TensorProto(
                dtype="DT_FLOAT",
                float_val=arr.reshape(-1).tolist(),
                tensor_shape=TensorShapeProto(
                    dim=[TensorShapeProto.Dim(size=d) for d in arr.shape]
                ),
            )
            md = (metadata or {}).get(tag) if isinstance(metadata, Mapping) else metadata
            if isinstance(md, bytes):
                md = SummaryMetadata.FromString(md)
            kwargs = {"metadata": md} if md is not None else {}
            self._add(Summary(value=[Summary.Value(tag=tag, tensor=tensor, **kwargs)]), step)

    def write_scalars(self, step, scalars) -> None:
        step = _as_step(step)
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, _as_float(value), global_step=step)

    def write_images(self, step, images) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        for tag, value in images.items():
            batch = _to_uint8_nhwc(value)
            for i, img in enumerate(batch):
                name = tag if len(batch) == 1 else f"{tag}/image/{i}"
                h, w, c = img.shape
                proto = Summary.Image(
                    height=h, width=w, colorspace=c, encoded_image_string=_png(img)
                )
                self._add(Summary(value=[Summary.Value(tag=name, image=proto)]), step)

    def write_videos(self, step, videos) -> None:
        self._warn(self, "videos", "needs moviepy")

    def write_audios(self, step, audios, *, sample_rate) -> None:
        self._warn(self, "audios", "needs soundfile")

    def write_texts(self, step, texts) -> None:
        step = _as_step(step)
        for tag, text in texts.items():
            self._writer.add_text(tag, str(text), global_step=step)

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        step = _as_step(step)
        for tag, values in arrays.items():
            bins: Any = "tensorflow"
            if num_buckets and tag in num_buckets:
                bins = int(num_buckets[tag])
            self._writer.add_histogram(
                tag, np.asarray(values, dtype=np.float64).reshape(-1), step, bins=bins
            )

    def write_hparams(self, hparams) -> None:
        from tensorboardX.summary import hparams as hparams_summaries

        flat = {k: _simple_hparam(v) for k, v in flatten_hparams(hparams).items()}
        for summary in hparams_summaries(flat, {}):
            self._writer._get_file_writer().add_summary(summary)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandbWriter(MetricWriter):
    """Weights & Biases run; `mode="offline"` writes `dir/wandb/offline-run-*` with no network.

    `wandb` is imported here, not at module import, so it stays an optional dependency and costs
    nothing to runs that do not use it. Steps go to `run.log(..., step=step)`: W&B drops a write
    whose step is below one it already has, which on a resumed run (same `id`, `resume="allow"`)
    is exactly the overlap we do not want twice. Extra keyword arguments go to `wandb.init`
    (`name`, `id`, `resume`, `tags`, `group`, `settings`, ...). By default W&B stays silent and
    does not capture the console, so the progress bar's output is left alone.
    """

    def __init__(
        self,
        project: str,
        dir: str | os.PathLike[str],
        mode: str = "offline",
        config: Mapping[str, Any] | None = None,
        **init_kwargs: Any,
    ) -> None:
        import wandb

        self.dir = pathlib.Path(dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if "settings" not in init_kwargs:
            init_kwargs["settings"] = wandb.Settings(silent=True, console="off")
        if config is not None:  # W&B cannot serialise an ml_collections.ConfigDict itself
            config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        self._wandb = wandb
        self.run = wandb.init(
            project=project, dir=str(self.dir), mode=mode, config=config, **init_kwargs
        )
        self._warn = _WarnOnce()

    def write_summaries(self, step, values, metadata=None) -> None:
        scalars = {k: v for k, v in values.items() if np.asarray(v).size == 1}
        others = {k: v for k, v in values.items() if k not in scalars}
        if scalars:
            self.write_scalars(step, scalars)
        if others:
            self.write_histograms(step, others)

    def write_scalars(self, step, scalars) -> None:
        self.run.log({k: _as_float(v) for k, v in scalars.items()}, step=_as_step(step))

    def write_images(self, step, images) -> None:
        try:
            logged = {
                k: [self._wandb.Image(img) for img in _to_uint8_nhwc(v)] for k, v in images.items()
            }
        except ImportError as e:  # wandb.Image needs Pillow
            self._warn(self, "images", str(e))
            return
        self.run.log(logged, step=_as_step(step))

    def write_videos(self, step, videos) -> None:
        self._warn(self, "videos", "not supported here")

    def write_audios(self, step, audios, *, sample_rate) -> None:
        self._warn(self, "audios", "not supported here")

    def write_texts(self, step, texts) -> None:
        self.run.log({k: str(v) for k, v in texts.items()}, step=_as_step(step))

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        logged = {}
        for tag, values in arrays.items():
            bins = int(num_buckets[tag]) if num_buckets and tag in num_buckets else 64
            hist = np.histogram(np.asarray(values, dtype=np.float64).reshape(-1), bins=bins)
            logged[tag] = self._wandb.Histogram(np_histogram=hist)
        self.run.log(logged, step=_as_step(step))

    def write_hparams(self, hparams) -> None:
        self.run.config.update(flatten_hparams(hparams), allow_val_change=True)

    def flush(self) -> None:
        """W&B streams records to its own service; there is nothing to flush from here."""

    def close(self) -> None:
        """Finishes the run. W&B's service process may land the last records on disk a moment
        later; `wandb.teardown()` (or process exit) waits for it."""
        self.run.finish()


class _LocalFileWriter(MetricWriter):
    """Shared by the CSV and JSONL writers: one open file, and kinds of data a text file cannot hold
    are skipped with one warning each (subclasses override what they do store)."""

    _file: Any
    _warn: _WarnOnce

    def write_summaries(self, step, values, metadata=None) -> None:
        scalars = {k: v for k, v in values.items() if np.asarray(v).size == 1}
        if len(scalars) < len(values):
            self._warn(self, "non-scalar summaries")
        self.write_scalars(step, scalars)

    def write_images(self, step, images) -> None:
        self._warn(self, "images")

    def write_videos(self, step, videos) -> None:
        self._warn(self, "videos")

    def write_audios(self, step, audios, *, sample_rate) -> None:
        self._warn(self, "audios")

    def write_texts(self, step, texts) -> None:
        self._warn(self, "texts")

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        self._warn(self, "histograms")

    def write_hparams(self, hparams) -> None:
        self._warn(self, "hparams")

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class CsvWriter(_LocalFileWriter):
    """Scalars as CSV rows ``step,tag,value,wall_time`` (long format; see the module docstring).

    Opened in append mode: a resumed run adds rows to the same file, and the header is written only
    when the file is new or empty. A file whose header differs is refused rather than corrupted.
    Only scalars are stored; texts, images, histograms and hparams are ignored (logged once).
    """

    HEADER = ("step", "tag", "value", "wall_time")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._check_header()
        self._file = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._csv = csv.writer(self._file)
        if self._file.tell() == 0:
            self._csv.writerow(self.HEADER)
        self._warn = _WarnOnce()

    def _check_header(self) -> None:
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="", encoding="utf-8") as f:
                first = next(csv.reader(f), None)
            if tuple(first or ()) != self.HEADER:
                raise ValueError(
                    f"{self.path} exists with header {first}, expected {list(self.HEADER)}"
                )

    def write_scalars(self, step, scalars) -> None:
        step = _as_step(step)
        now = time.time()
        for tag, value in scalars.items():
            self._csv.writerow((step, tag, repr(_as_float(value)), f"{now:.3f}"))


class JsonlWriter(_LocalFileWriter):
    """One JSON object per line (see the module docstring for the record shapes); appends on resume.

    Lines are flushed as written: a JSONL file is what scripts tail while training runs.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._warn = _WarnOnce()

    def _write(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write_scalars(self, step, scalars) -> None:
        if scalars:
            values = {k: _as_float(v) for k, v in scalars.items()}
            self._write({"step": _as_step(step), "wall_time": time.time(), **values})

    def write_texts(self, step, texts) -> None:
        if texts:
            strings = {k: str(v) for k, v in texts.items()}
            self._write({"step": _as_step(step), "wall_time": time.time(), **strings})

    def write_hparams(self, hparams) -> None:
        flat = {k: _simple_hparam(v) for k, v in flatten_hparams(hparams).items()}
        self._write({"hparams": flat, "wall_time": time.time()})


# --------------------------------------------------------------------------------------------------
# Construction from config
# --------------------------------------------------------------------------------------------------

_DEFAULT_PATHS = {
    "tensorboard": "tensorboard",
    "csv": "metrics.csv",
    "jsonl": "metrics.jsonl",
    "wandb": ".",
}


def _resolve(
    workdir: pathlib.Path, value: str | os.PathLike[str] | None, default: str
) -> pathlib.Path:
    """Relative paths in configs are relative to the run's workdir, so a config is portable."""
    path = pathlib.Path(value if value is not None else default)
    return path if path.is_absolute() else workdir / path


def _build_one(spec: Mapping[str, Any], workdir: pathlib.Path) -> MetricWriter:
    spec = dict(spec)
    kind = str(spec.pop("type", "")).lower()
    if kind not in _DEFAULT_PATHS:
        raise ValueError(f"unknown writer type {kind!r}; expected one of {sorted(_DEFAULT_PATHS)}")
    if kind == "tensorboard":
        logdir = _resolve(workdir, spec.pop("logdir", spec.pop("path", None)), _DEFAULT_PATHS[kind])
        return TensorBoardWriter(logdir, **spec)
    if kind in ("csv", "jsonl"):
        path = _resolve(workdir, spec.pop("path", None), _DEFAULT_PATHS[kind])
        if spec:
            raise ValueError(f"unexpected options for {kind} writer: {sorted(spec)}")
        return CsvWriter(path) if kind == "csv" else JsonlWriter(path)
    project = spec.pop("project", "aurora")
    directory = _resolve(workdir, spec.pop("dir", None), _DEFAULT_PATHS[kind])
    return WandbWriter(project=project, dir=directory, **spec)


def make_writers(
    config_list: Sequence[Mapping[str, Any]] | None,
    workdir: str | os.PathLike[str],
    is_global_zero: bool,
) -> list[MetricWriter]:
    """Writers from dicts like ``{"type": "tensorboard"}``, ``{"type": "csv", "path": "m.csv"}``,
    ``{"type": "wandb", "project": "x", "mode": "offline"}``.

    Keys other than `type` are the writer's constructor arguments; paths (`logdir`, `path`, `dir`)
    are relative to `workdir`. Defaults: `workdir/tensorboard`, `workdir/metrics.csv`,
    `workdir/metrics.jsonl`, wandb under `workdir/wandb`. Processes other than 0 get one
    :class:`NoopWriter` per entry, so all processes run the same code and only process 0 touches
    files (and the configs are still validated everywhere).
    """
    specs = [s.to_dict() if hasattr(s, "to_dict") else dict(s) for s in (config_list or [])]
    for spec in specs:
        if str(spec.get("type", "")).lower() not in _DEFAULT_PATHS:
            known = sorted(_DEFAULT_PATHS)
            raise ValueError(f"unknown writer type {spec.get('type')!r}; expected one of {known}")
    if not is_global_zero:
        return [NoopWriter() for _ in specs]
    workdir = pathlib.Path(workdir)
    return [_build_one(spec, workdir) for spec in specs]
