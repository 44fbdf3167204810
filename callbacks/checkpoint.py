"""Checkpoints with Orbax's `CheckpointManager`: exact resume, best-k, async writes.

A checkpoint holds two or three items:

* `state`: the whole `TrainState` (params, optimiser state, step, RNG, strategy extras);
* `meta` (JSON): global step, the data iterator's position, every callback's `state_dict()`, the
  strategy's host state (e.g. a replay buffer's index and RNG) and the run's config;
* `strategy` (only when the strategy has any): the strategy's host arrays (`array_state()`, e.g.
  the replay buffer's fields), as numpy arrays.

A `Trainer` with a `ModelCheckpoint` resumes from the latest checkpoint in its directory
automatically, so re-running the same command after a crash continues where it stopped, on the
same batches. The state is restored onto the current state's shardings, so a run may resume on a
different mesh.

Reliability:

* a damaged latest checkpoint (missing or truncated array files, unreadable `meta`) is reported
  with its path and the reason, moved aside to `<directory>/damaged/<step>` (never deleted) and
  the previous step is restored instead; if none restores, the error names the directory;
* `meta["model"]` holds the model's signature (class, variables, sizes and a digest of the
  parameter tree's paths and shapes); a checkpoint of a different model is refused with a
  `ValueError` saying what differs. Checkpoints without a signature still restore;
* metric files stay consistent with the checkpoints: writers are flushed when a checkpoint is
  written, and on resume the CSV / JSONL rows logged after the restored step (by a run that was
  killed before its next checkpoint) are dropped, so the resumed run logs every step exactly once.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import orbax.checkpoint as ocp

from callbacks.base import Callback

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = ["ModelCheckpoint", "OnExceptionCheckpoint", "model_signature"]

log = logging.getLogger(__name__)

ITEMS = ("state", "meta", "strategy")


def _config_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


SIGNATURE_FIELDS = (
    "surf_vars",
    "static_vars",
    "atmos_vars",
    "patch_size",
    "embed_dim",
    "num_heads",
    "encoder_depths",
    "decoder_depths",
    "latent_levels",
    "max_history_size",
    "use_lora",
    "lora_mode",
    "lora_steps",
    "lora_r",
)
"""Model fields that the signature records readably (besides the class and the parameter tree)."""


def model_signature(model: Any, params: Any = None) -> dict[str, Any]:
    """What identifies a model in a checkpoint: its class, the fields of :data:`SIGNATURE_FIELDS` it
    has, its time step, and (given `params`) the parameter tree's size and a digest of its paths and
    shapes. JSON-serialisable; compare two with :func:`signature_differences`."""
    signature: dict[str, Any] = {"class": type(model).__name__}
    for name in SIGNATURE_FIELDS:
        if hasattr(model, name):
            signature[name] = getattr(model, name)
    if hasattr(model, "timestep"):
        signature["timestep_hours"] = model.timestep.total_seconds() / 3600
    if params is not None:
        leaves = jax.tree_util.tree_leaves_with_path(params)
        shapes = sorted(
            f"{jax.tree_util.keystr(path)}{tuple(getattr(x, 'shape', ()))}" for path, x in leaves
        )
        signature["params"] = {
            "arrays": len(leaves),
            "values": int(sum(int(getattr(x, "size", 1)) for _, x in leaves)),
            "digest": hashlib.sha256("\n".join(shapes).encode()).hexdigest()[:16],
        }
    return json.loads(json.dumps(signature, default=str))  # tuples -> lists, as read back from JSON


def _show(value: Any) -> str:
    if isinstance(value, list):
        return repr(tuple(_show_item(v) for v in value)) if value else "()"
    if isinstance(value, dict) and "digest" in value:
        return f"{value['arrays']} arrays / {value['values']} values (digest {value['digest']})"
    return repr(value)


def _show_item(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Readable differences, e.g. `"atmos_vars ('z', 'u') vs ('z', 'u', 'v')"` (saved vs current);
    fields only one side has are not compared (older or newer signatures). The class name alone
    is not a difference (presets differ only in defaults, which the fields cover)."""
    differences = []
    for key, value in saved.items():
        if key != "class" and key in current and value != current[key]:
            name = "parameter tree" if key == "params" else key
            differences.append(f"{name} {_show(value)} vs {_show(current[key])}")
    return differences


def _writers(writers: Any) -> list[Any]:
    """The writers, with `MultiWriter`s flattened."""
    out = []
    for writer in writers:
        inner = getattr(writer, "writers", None)
        out.extend(_writers(inner) if isinstance(inner, list) else [writer])
    return out


def _csv_step(line: str) -> int | None:
    row = next(csv.reader(io.StringIO(line)), [])
    return int(row[0]) if len(row) == 4 and row[0].lstrip("-").isdigit() else None


def _jsonl_step(line: str) -> int | None:
    record = json.loads(line)
    return int(record["step"]) if "step" in record else -(2**62)  # hparams records stay


def _rewind(path: Path, step: int, step_of: Any, header: int) -> int:
    """Keep the first `header` lines and the lines whose step is at most `step`; the others (and a
    line cut short by a kill, or one that does not parse) are appended to `<path>.dropped`.
    Returns how many lines went."""
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    kept, dropped = lines[:header], []
    for line in lines[header:]:
        try:
            at = step_of(line) if line.endswith("\n") else None
        except ValueError:
            at = None
        keep = at is not None and at <= step
        (kept if keep else dropped).append(line)
    if dropped:
        with open(path.with_name(path.name + ".dropped"), "a", newline="", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in dropped)
        with open(
            path, "r+", newline="", encoding="utf-8"
        ) as f:  # in place: appenders keep appending
            f.write("".join(kept))
            f.truncate()
    return len(dropped)


def rewind_metric_files(writers: Any, step: int) -> None:
    """Make CSV / JSONL metric files end at `step`: a run killed after its last checkpoint logged
    steps that the resumed run logs again (`step=-1`: a run that restarts from scratch). The rows
    taken out go to `<file>.dropped`, not lost. (TensorBoard event files cannot be rewritten;
    TensorBoard shows the later points of a step twice.) Files are rewritten in place, so writers
    that hold them open in append mode keep appending at the new end."""
    from callbacks.writers import CsvWriter, JsonlWriter

    for writer in _writers(writers):
        kind = {CsvWriter: (_csv_step, 1), JsonlWriter: (_jsonl_step, 0)}.get(type(writer))
        if kind is None or not Path(writer.path).exists():
            continue
        writer.flush()
        dropped = _rewind(Path(writer.path), step, *kind)
        if dropped:
            where = (
                f"after step {step} (the run resumes there)"
                if step >= 0
                else "before (no checkpoint: the run starts over)"
            )
            log.warning(
                "Moved %d rows logged %s from %s to %s.dropped.",
                dropped,
                where,
                writer.path,
                writer.path,
            )


class _ModelMismatch(Exception):
    """A checkpoint of another model: never a reason to fall back to an older checkpoint."""


class ModelCheckpoint(Callback):
    """Save every `every_n_steps` (and at the end of training); keep the latest `max_to_keep`.

    With `monitor` (e.g. `"val/loss"`), each save that has the metric is also written to
    `<directory>/best`, which keeps the `save_top_k` best by that metric (`mode="min"` or
    `"max"`). The latest checkpoints stay separate so that resuming always continues from the
    most recent state, never from an older "best" one.
    """

    def __init__(
        self,
        directory: str | Path | None = None,
        every_n_steps: int = 100,
        max_to_keep: int | None = 3,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int | None = None,
        async_checkpointing: bool = True,
    ):
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'.")
        self.directory = Path(directory) if directory is not None else None
        self.every_n_steps = every_n_steps
        self.max_to_keep = max_to_keep
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k if save_top_k is not None else max_to_keep
        self.async_checkpointing = async_checkpointing
        self.manager: ocp.CheckpointManager | None = None
        self.best_manager: ocp.CheckpointManager | None = None
        self.last_saved_step: int | None = None
        self._stage: str | None = None
        self._flush_writers = False

    # --- manager ------------------------------------------------------------------------------------
    def _manager(self, directory: Path, **options: Any) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=self.async_checkpointing, create=True, **options
        )
        return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)

    def _open(self, trainer: Trainer) -> ocp.CheckpointManager:
        if self.manager is None:
            directory = self.directory or (Path(trainer.workdir or ".") / "checkpoints")
            self.directory = Path(directory).absolute()
            self.manager = self._manager(self.directory, max_to_keep=self.max_to_keep)
            if self.monitor:
                self.best_manager = self._manager(
                    self.directory / "best",
                    max_to_keep=self.save_top_k,
                    best_fn=lambda metrics: metrics[self.monitor],
                    best_mode=self.mode,
                    keep_checkpoints_without_metrics=False,
                )
        return self.manager

    def setup(self, trainer: Trainer, stage: str) -> None:
        self._stage = stage
        if stage == "fit" and not trainer.fast_dev_run:
            self._open(trainer)

    def _managers(self) -> list[ocp.CheckpointManager]:
        return [m for m in (self.manager, self.best_manager) if m is not None]

    def wait_until_finished(self) -> None:
        """Block until every checkpoint written so far is complete on disk."""
        for manager in self._managers():
            manager.wait_until_finished()

    def teardown(self, trainer: Trainer, stage: str) -> None:
        self.wait_until_finished()
        self._stage = None

    def close(self) -> None:
        for manager in self._managers():
            manager.close()
        self.manager = self.best_manager = None

    # --- saving -------------------------------------------------------------------------------------
    def save(self, trainer: Trainer, *, force: bool = False) -> bool:
        """Write a checkpoint of the trainer's current state (asynchronously unless configured).

        Nothing is written under `fast_dev_run`, as in Lightning."""
        if trainer.fast_dev_run:
            return False
        manager = self._open(trainer)
        step = trainer.global_step
        if step == self.last_saved_step:
            return False
        meta = {
            "global_step": step,
            "data": trainer.data_state(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in trainer.callbacks},
            "strategy": trainer.strategy.state_dict(),
            "config": _config_json(trainer.config),
            "model": model_signature(trainer.strategy.model, trainer.state.params),
        }
        trainer._call("on_save_checkpoint", meta)
        # Metrics logged up to this step reach their files before the checkpoint can exist (rows
        # other callbacks log for this step after this point are flushed at the next step's start).
        self._flush(trainer)
        self._flush_writers = True
        items = {"state": ocp.args.StandardSave(trainer.state), "meta": ocp.args.JsonSave(meta)}
        arrays = trainer.strategy.array_state()
        if arrays:
            items["strategy"] = ocp.args.PyTreeSave(arrays)
        args = ocp.args.Composite(**items)
        saved = manager.save(step, args=args, force=force)
        if self.best_manager is not None and self.monitor in trainer.callback_metrics:
            metrics = {self.monitor: float(trainer.callback_metrics[self.monitor])}
            self.best_manager.save(step, args=args, metrics=metrics, force=True)
        if saved:
            self.last_saved_step = step
        return saved

    @staticmethod
    def _flush(trainer: Trainer) -> None:
        for writer in trainer.writers:
            try:
                writer.flush()
            except Exception as e:
                log.warning("Could not flush %r: %s", writer, e)

    def on_train_batch_start(self, trainer: Trainer, batch: Any, batch_idx: int) -> None:
        if self._flush_writers:
            self._flush(trainer)
            self._flush_writers = False

    def on_train_batch_end(
        self, trainer: Trainer, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, force=True)

    def on_train_end(self, trainer: Trainer) -> None:
        self.save(trainer, force=True)
        self.wait_until_finished()

    # --- restoring ----------------------------------------------------------------------------------
    def _restore_step(
        self, trainer: Trainer, manager: ocp.CheckpointManager, step: int
    ) -> dict[str, Any]:
        """Read one step; raises on a damaged checkpoint and ValueError on a different model."""
        path = self.directory / str(step)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or "global_step" not in meta or "data" not in meta:
            raise ValueError(
                f"meta is incomplete (keys {sorted(meta) if isinstance(meta, dict) else type(meta).__name__})"
            )
        if meta.get("model"):
            differences = signature_differences(
                meta["model"], model_signature(trainer.strategy.model, trainer.state.params)
            )
            if differences:
                raise _ModelMismatch(
                    f"The checkpoint {path} holds a different model than this run's ({'; '.join(differences)}; "
                    "checkpoint vs this run). Use another workdir or checkpoint directory, or restore the "
                    "model configuration the checkpoint was written with."
                )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, trainer.state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if (path / "strategy").exists():
            items["strategy"] = ocp.args.PyTreeRestore()  # numpy arrays, as saved
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        return {
            "meta": meta,
            "state": restored["state"],
            "strategy": restored["strategy"] if "strategy" in items else {},
        }

    def _set_aside(self, manager: ocp.CheckpointManager, steps: list[int]) -> None:
        """Move damaged steps newer than the restored one to `<directory>/damaged/` (kept for
        inspection; new checkpoints of those steps can then be written)."""
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / "damaged" / str(step)
                n = 1
                while target.exists():
                    target, n = self.directory / "damaged" / f"{step}-{n}", n + 1
                target.parent.mkdir(parents=True, exist_ok=True)
                source.rename(target)
                log.warning("Moved the damaged checkpoint %s to %s.", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("ModelCheckpoint: damaged checkpoints set aside")
        manager.reload()

    def restore_latest(self, trainer: Trainer) -> dict[str, Any] | None:
        """Restore the latest checkpoint into `trainer`; returns the data position, or None.

        A checkpoint that fails to restore is reported (path and reason) and the previous one is
        tried; the damaged ones are moved aside, never deleted. Raises RuntimeError when checkpoints
        exist but none restores, and ValueError when a checkpoint's model differs from this run's.
        """
        manager = self._open(trainer)
        manager.reload()
        steps = sorted(manager.all_steps(), reverse=True)
        incomplete = sorted(p.name for p in self.directory.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"))
        if incomplete:
            log.warning(
                "Ignoring incomplete checkpoint writes in %s: %s",
                self.directory,
                ", ".join(incomplete),
            )
        if not steps:
            if self._stage == "fit" and trainer.is_global_zero:
                rewind_metric_files(trainer.writers, -1)  # a run killed before its first checkpoint
            return None
        failures: list[str] = []
        for step in steps:
            try:
                restored = self._restore_step(trainer, manager, step)
                break
            except _ModelMismatch as e:
                raise ValueError(str(e)) from None
            except Exception as e:
                reason = f"{type(e).__name__}: {e}".strip()
                reason = reason if len(reason) < 500 else reason[:500] + " ..."
                failures.append(f"{self.directory / str(step)}: {reason}")
                log.warning(
                    "Cannot restore the checkpoint %s (%s); trying the previous one.",
                    self.directory / str(step),
                    reason,
                )
        else:
            raise RuntimeError(
                f"No checkpoint in {self.directory} could be restored (steps {steps}); nothing was deleted. "
                "Move the damaged ones away to start afresh, or point the run at another directory.\n"
                + "\n".join(failures)
            )
        if failures:
            self._set_aside(manager, [s for s in steps if s > step])
        meta = restored["meta"]
        trainer.state = restored["state"]
        trainer.global_step = int(meta["global_step"])
        self.last_saved_step = trainer.global_step
        states = meta.get("callbacks", {})
        for cb in trainer.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
        trainer.strategy.load_state_dict(meta.get("strategy") or {})
        trainer.strategy.load_array_state(restored["strategy"])
        trainer._call("on_load_checkpoint", meta)
        if self._stage == "fit" and trainer.is_global_zero:
            rewind_metric_files(trainer.writers, trainer.global_step)
        log.info("Resumed from %s at step %d", self.directory / str(step), trainer.global_step)
        return meta["data"]

    def state_dict(self) -> dict[str, Any]:
        return {"last_saved_step": self.last_saved_step}


class OnExceptionCheckpoint(Callback):
    """On an exception (or Ctrl-C), write a checkpoint through the trainer's `ModelCheckpoint`
    so that nothing since the last periodic save is lost; the next run resumes from it."""

    def on_exception(self, trainer: Trainer, exception: BaseException) -> None:
        checkpoint = trainer.checkpoint_callback
        if checkpoint is None or trainer.state is None or trainer.fast_dev_run:
            return
        leaves = jax.tree_util.tree_leaves(trainer.state)
        if any(getattr(x, "is_deleted", lambda: False)() for x in leaves):
            log.warning("Not saving on exception: the state was consumed by a failing step.")
            return
        checkpoint.save(trainer, force=True)
        checkpoint.manager.wait_until_finished()
        log.info("Saved a checkpoint at step %d after %r", trainer.global_step, exception)
