"""Metric writers with CLU's `MetricWriter` interface, without TensorFlow.

`import clu.metric_writers` imports TensorFlow, so the interface is re-declared here with CLU's
method names and signatures; a CLU writer drops in. Every write takes an explicit integer `step`,
so curves line up across writers and across resumed runs.

Writers: :class:`TensorBoardWriter` (tensorboardX event files), :class:`WandbWriter` (Weights &
Biases, `wandb` imported only when one is built), :class:`CsvWriter` (long format,
``step,tag,value,wall_time``), :class:`JsonlWriter` (one JSON object per call),
:class:`MultiWriter` (fans out) and :class:`NoopWriter` (processes other than 0).
:func:`make_writers` builds them from config dicts such as ``{"type": "tensorboard"}``.

On resume the trainer calls :meth:`MetricWriter.rewind` with the restored step: the CSV and JSONL
writers move rows logged after it to ``<file>.dropped``. Image encoding is in `callbacks.images`.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import logging
import operator
import os
import pathlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from callbacks.images import encode_png, to_uint8_nhwc

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
    """CLU's writer interface. A writer that cannot store a kind of data ignores it (logging
    once)."""

    @abc.abstractmethod
    def write_summaries(
        self, step: int, values: Mapping[str, Array], metadata: Mapping[str, Any] | None = None
    ) -> None:
        """Saves arbitrary tensors (custom plugins); writers without tensor support store
        scalars."""

    @abc.abstractmethod
    def write_scalars(self, step: int, scalars: Mapping[str, Scalar]) -> None:
        """Writes scalar values for `step`; consecutive calls may carry different tags."""

    @abc.abstractmethod
    def write_images(self, step: int, images: Mapping[str, Array]) -> None:
        """Writes images shaped [N, H, W, C] or [H, W, C] (C = 1, 3 or 4; floats in [0, 1] or
        uint8)."""

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

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step`, because the run resumes from a checkpoint of
        `step` and logs the later steps again (`step=-1`: it starts over, nothing was saved).

        Not part of CLU's interface, hence not abstract: the default keeps everything, which is
        what writers that cannot rewrite their output (TensorBoard event files) or that drop
        repeated steps themselves (W&B) do.

        Args:
            step: the restored global step; records of later steps go.
        """
        del step  # nothing to forget


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
    """Nested mappings as one flat mapping, as CLU's `write_hparams` wants.

    Args:
        hparams: a mapping or `ml_collections.ConfigDict`, possibly nested.
        prefix: prepended to every key.

    Returns:
        `{"a.b.c": value}` for every leaf.
    """
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


def _yaml_safe(value: Any) -> Any:
    """Mappings, sequences and simple values as YAML writes them; anything else as a string."""
    if isinstance(value, Mapping):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _simple_hparam(value)


class _WarnOnce:
    """Logs "writer X ignores Y" once per (writer, kind), not at every step."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def __call__(self, writer: object, kind: str, why: str = "") -> None:
        if kind not in self._seen:
            self._seen.add(kind)
            log.warning("%s ignores %s%s", type(writer).__name__, kind, f" ({why})" if why else "")


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
    """Fans each call out to several writers, so the trainer talks to one object.

    Args:
        writers: the writers, called in this order.
    """

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

    def rewind(self, step: int) -> None:
        for w in self.writers:
            rewind = getattr(w, "rewind", None)  # a CLU writer has none
            if rewind is not None:
                rewind(step)


def _tensorflow_bins() -> list[float]:
    """TensorFlow's default histogram bucket edges (what tensorboardX's `bins="tensorflow"` uses):
    +-1e-12 growing by 10% up to 1e20 in magnitude, and 0."""
    edges, v = [], 1e-12
    while v < 1e20:
        edges.append(v)
        v *= 1.1
    return [-e for e in reversed(edges)] + [0.0] + edges


_TENSORFLOW_BINS = _tensorflow_bins()


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in `logdir`, written by tensorboardX (no TensorFlow needed).

    Hyper-parameters go into the same run directory (tensorboardX's `add_hparams` would open a
    sub-run), so the HPARAMS tab shows them next to this run's scalars. Summaries are built with
    `tensorboardX.summary` and written by tensorboardX's `FileWriter`. Videos and audio are
    ignored: they need moviepy / soundfile and no Aurora workflow writes them.

    Args:
        logdir: the run directory (created if missing).
        flush_secs: how often buffered events are written out.
    """

    def __init__(self, logdir: str | os.PathLike[str], flush_secs: int = 30) -> None:
        from tensorboardX import FileWriter

        self.logdir = pathlib.Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        self._writer = FileWriter(str(self.logdir), flush_secs=flush_secs)
        self._warn = _WarnOnce()

    def _add(self, summary: Any, step: int | None) -> None:
        self._writer.add_summary(summary, None if step is None else _as_step(step))

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
        from tensorboardX.summary import scalar

        step = _as_step(step)
        for tag, value in scalars.items():
            self._add(scalar(tag, _as_float(value)), step)

    def write_images(self, step, images) -> None:
        from tensorboardX.proto.summary_pb2 import Summary

        for tag, value in images.items():
            batch = to_uint8_nhwc(value)
            for i, img in enumerate(batch):
                name = tag if len(batch) == 1 else f"{tag}/image/{i}"
                h, w, c = img.shape
                proto = Summary.Image(
                    height=h, width=w, colorspace=c, encoded_image_string=encode_png(img)
                )
                self._add(Summary(value=[Summary.Value(tag=name, image=proto)]), step)

    def write_videos(self, step, videos) -> None:
        self._warn(self, "videos", "needs moviepy")

    def write_audios(self, step, audios, *, sample_rate) -> None:
        self._warn(self, "audios", "needs soundfile")

    def write_texts(self, step, texts) -> None:
        from tensorboardX.summary import text

        step = _as_step(step)
        for tag, value in texts.items():
            self._add(text(tag, str(value)), step)

    def write_histograms(self, step, arrays, num_buckets=None) -> None:
        from tensorboardX.summary import histogram

        step = _as_step(step)
        for tag, values in arrays.items():
            bins: Any = _TENSORFLOW_BINS
            if num_buckets and tag in num_buckets:
                bins = int(num_buckets[tag])
            values = np.asarray(values, dtype=np.float64).reshape(-1)
            self._add(histogram(tag, values, bins), step)

    def write_hparams(self, hparams) -> None:
        """The HPARAMS dashboard's entry (flat `a.b.c` keys) and, since that dashboard shows
        only runs with metrics it was told of, the same keys as a table under TEXT ("hparams")."""
        from tensorboardX.summary import hparams as hparams_summaries

        flat = {k: _simple_hparam(v) for k, v in flatten_hparams(hparams).items()}
        for summary in hparams_summaries(flat, {}):
            self._add(summary, None)
        rows = "".join(f"| {k} | {v!r} |\n" for k, v in flat.items())
        self.write_texts(0, {"hparams": "| name | value |\n| --- | --- |\n" + rows})

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

    Args:
        project: the W&B project.
        dir: where W&B writes its run directory (created if missing).
        mode: `"offline"`, `"online"` or `"disabled"`, as `wandb.init` takes.
        config: the run's config (a `ConfigDict` is converted to a dict).
        **init_kwargs: more arguments for `wandb.init`.
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
                k: [self._wandb.Image(img) for img in to_uint8_nhwc(v)] for k, v in images.items()
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

    path: pathlib.Path
    _file: Any
    _warn: _WarnOnce
    _header_lines = 0
    """Leading lines that `rewind` always keeps."""

    @staticmethod
    def _step_of(line: str) -> int | None:
        """The step a complete line records; None for a line that is not a record."""
        raise NotImplementedError

    def rewind(self, step: int) -> None:
        """Move the lines logged after `step` (and any line cut short or unreadable, as a killed
        run leaves) to ``<path>.dropped``, so that a resumed run logs every step exactly once.

        The file is rewritten in place, so the open append handle keeps appending at the new end.

        Args:
            step: the restored global step (`-1`: the run starts over; every step goes).
        """
        self.flush()
        if not self.path.exists():
            return
        with open(self.path, newline="", encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        kept, dropped = lines[: self._header_lines], []
        for line in lines[self._header_lines :]:
            try:
                at = self._step_of(line) if line.endswith("\n") else None
            except ValueError:
                at = None
            (kept if at is not None and at <= step else dropped).append(line)
        if not dropped:
            return
        aside = self.path.with_name(self.path.name + ".dropped")
        with open(aside, "a", newline="", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in dropped)
        with open(self.path, "r+", newline="", encoding="utf-8") as f:
            f.write("".join(kept))
            f.truncate()
        where = (
            f"after step {step} (the run resumes there)"
            if step >= 0
            else "before (no checkpoint: the run starts over)"
        )
        log.warning("Moved %d rows logged %s from %s to %s.", len(dropped), where, self.path, aside)

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
    """Scalars as CSV rows ``step,tag,value,wall_time``, one row per scalar.

    Long rather than wide because train and validation metrics arrive at different steps and new
    tags may appear mid-run; a wide file would need its header rewritten. Pivot with
    ``pandas.read_csv(p).pivot_table(index="step", columns="tag", values="value")``.

    Opened in append mode: a resumed run adds rows to the same file, and the header is written only
    when the file is new or empty. A file whose header differs is refused rather than corrupted.
    Scalars are stored; hyper-parameters go to `hparams.yaml` beside the file (nested, as
    Lightning's CSVLogger writes it); texts, images and histograms are ignored (logged once).

    Args:
        path: the CSV file (its directory is created if missing).
    """

    HEADER = ("step", "tag", "value", "wall_time")
    _header_lines = 1

    @staticmethod
    def _step_of(line: str) -> int | None:
        row = next(csv.reader(io.StringIO(line)), [])
        return int(row[0]) if len(row) == 4 and row[0].lstrip("-").isdigit() else None

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

    @property
    def hparams_path(self) -> pathlib.Path:
        return self.path.with_name("hparams.yaml")

    def write_hparams(self, hparams) -> None:
        import yaml

        if hasattr(hparams, "to_dict"):  # ml_collections.ConfigDict
            hparams = hparams.to_dict()
        self.hparams_path.write_text(
            yaml.safe_dump(_yaml_safe(hparams), sort_keys=False), encoding="utf-8"
        )


class JsonlWriter(_LocalFileWriter):
    """One JSON object per line; appends on resume.

    Records: ``{"step": 10, "wall_time": ..., "train/loss": 0.5}`` for scalars (texts likewise,
    with string values) and ``{"hparams": {...}, "wall_time": ...}`` for hyper-parameters.
    Non-finite floats are written as Python's `json` writes them (``NaN``, ``Infinity``), so a
    diverged loss stays visible. Lines are flushed as written: a JSONL file is what scripts tail
    while training runs.

    Args:
        path: the JSONL file (its directory is created if missing).
    """

    @staticmethod
    def _step_of(line: str) -> int | None:
        record = json.loads(line)
        return int(record["step"]) if "step" in record else -(2**62)  # hparams records stay

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

    Args:
        config_list: the writer specs (None: no writers).
        workdir: the run's directory, which relative paths are relative to.
        is_global_zero: whether this is process 0.

    Returns:
        One writer per spec, in order.
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
