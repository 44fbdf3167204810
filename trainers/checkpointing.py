"""What a checkpoint holds and how the Trainer saves and restores it (Lightning's checkpoint
connector); storage is an Orbax `CheckpointManager` that the caller owns.

A checkpoint is one step of the manager with the items :data:`ITEMS`: `state` (the whole
`TrainState`), `meta` (JSON: global step, data-iterator position, every callback's
`state_dict()`, the strategy's host state, the run's config and the model's signature) and, when
the strategy has host arrays, `strategy`. What differs between processes (e.g. each one's replay
buffer) each process writes beside the checkpoint (`Strategy.save_process_state`).

Restoring takes the latest checkpoint that reads back, onto the current state's shardings (so a
run may resume on a different mesh). A damaged checkpoint is reported and moved aside to
`<directory>/damaged/<step>`, never deleted; a checkpoint of another model is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
import orbax.checkpoint as ocp

if TYPE_CHECKING:  # pragma: no cover
    from trainers.trainer import Trainer

__all__ = [
    "ITEMS",
    "SIGNATURE_FIELDS",
    "CheckpointConnector",
    "callback_keys",
    "load_params",
    "model_signature",
    "signature_differences",
]

log = logging.getLogger(__name__)

ITEMS = ("state", "meta", "strategy")
"""The item names of every checkpoint (`strategy` only present when the strategy has arrays)."""

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
    """What identifies a model in a checkpoint, so that a run refuses another model's checkpoint.

    Args:
        model: the model; its class, the fields of :data:`SIGNATURE_FIELDS` it has and its
            `timestep` are recorded.
        params: the parameter tree, if any: its size and a digest of its paths and shapes are
            recorded too.

    Returns:
        A JSON-serialisable dict (tuples as lists, as read back from JSON); compare two with
        :func:`signature_differences`.
    """
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
    return json.loads(json.dumps(signature, default=str))


def _show(value: Any) -> str:
    if isinstance(value, list):
        return repr(tuple(_show_item(v) for v in value)) if value else "()"
    if isinstance(value, dict) and "digest" in value:
        return f"{value['arrays']} arrays / {value['values']} values (digest {value['digest']})"
    return repr(value)


def _show_item(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def signature_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Readable differences between two :func:`model_signature` results.

    Fields only one side has are not compared (older or newer signatures), nor is the class name
    alone (presets differ only in defaults, which the fields cover).

    Args:
        saved: the checkpoint's signature.
        current: this run's signature.

    Returns:
        One line per differing field, e.g. `"atmos_vars ('z', 'u') vs ('z', 'u', 'v')"` (saved
        vs current); empty when the models match.
    """
    differences = []
    for key, value in saved.items():
        if key != "class" and key in current and value != current[key]:
            name = "parameter tree" if key == "params" else key
            differences.append(f"{name} {_show(value)} vs {_show(current[key])}")
    return differences


def _config_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def load_params(path: str | Path) -> Any:
    """The parameters saved at `path`: a parameters-only tree (`python -m aurora.convert`) or a
    training checkpoint (`<directory>/<step>`, e.g. `checkpoints/best/400`), of which only the
    parameters are read (not the optimiser state, which is twice their size with Adam).

    Args:
        path: an Orbax folder.

    Returns:
        The parameter tree as numpy arrays on the host.
    """
    path = Path(path).absolute()
    if not (path / "state").is_dir():
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path)
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(path / "state").item_metadata.tree
        params = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree["params"]
        )
        restored = checkpointer.restore(
            path / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": tree["params"]},
                restore_args={"params": params},
                partial_restore=True,
            ),
        )
    return restored["params"]


def callback_keys(callbacks: Sequence[Any]) -> list[str]:
    """Each callback's key in a checkpoint's `callbacks`: its `state_key`, with `#2`, `#3`, ...
    appended to later callbacks whose `state_key` an earlier one already has."""
    keys, seen = [], Counter[str]()
    for cb in callbacks:
        seen[cb.state_key] += 1
        n = seen[cb.state_key]
        keys.append(cb.state_key if n == 1 else f"{cb.state_key}#{n}")
    return keys


def _saved_key(key: str, cls: type, states: dict[str, Any], callbacks: Sequence[Any]) -> str | None:
    """The key of a callback's state among a checkpoint's `states`: its own key; else, for the
    only callback of its class, the only state saved under that class's name (a checkpoint from
    before per-instance keys, keyed by the bare class name, or one whose callback was built with
    other arguments)."""
    if key in states:
        return key
    name = cls.__qualname__
    same_class = [k for k in states if re.split(r"[{#]", k, maxsplit=1)[0] == name]
    if len(same_class) == 1 and sum(type(cb) is cls for cb in callbacks) == 1:
        log.info("Restoring %s's state from the checkpoint's %r.", key, same_class[0])
        return same_class[0]
    return None


class _ModelMismatch(Exception):
    """A checkpoint of another model: never a reason to fall back to an older checkpoint."""


class CheckpointConnector:
    """Gathers a checkpoint from a `Trainer` and puts one back into it.

    The trainer owns one and exposes it through `Trainer.save_checkpoint` and the restore at the
    start of fit / validate / test / predict; callbacks never call it directly.
    """

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    # --- saving ---------------------------------------------------------------------------------
    def dump_meta(self) -> dict[str, Any]:
        """The `meta` item of a checkpoint of the trainer's current state.

        Returns:
            JSON-serialisable dict with `global_step`, `data` (the iterator position), `callbacks`
            (each callback's `state_dict()` by `state_key`), `device_states` (the keys of the
            callbacks' device state in the `TrainState`), `strategy`, `config` and `model`, plus
            whatever the callbacks' `on_save_checkpoint` hooks add.
        """
        trainer = self.trainer
        meta = {
            "global_step": trainer.global_step,
            "data": trainer.data_state(),
            "callbacks": {
                key: cb.state_dict()
                for key, cb in zip(callback_keys(trainer.callbacks), trainer.callbacks)
            },
            "strategy": trainer.strategy.state_dict(),
            "config": _config_json(trainer.config),
            "model": model_signature(trainer.strategy.model, trainer.state.params),
            "device_states": _device_state_keys(trainer.state),
        }
        for cb in trainer.callbacks:
            cb.on_save_checkpoint(trainer, meta)
        return meta

    def save(
        self,
        manager: ocp.CheckpointManager,
        *,
        force: bool = False,
        metrics: dict[str, float] | None = None,
    ) -> bool:
        """Write the trainer's current state as step `global_step` (see `Trainer.save_checkpoint`).

        Args:
            manager: the manager to write into.
            force: write even if `manager`'s save policy would skip this step.
            metrics: what `manager` ranks by when it keeps the best, e.g. `{"val/loss": 0.3}`.

        Returns:
            Whether `manager` wrote it (its save policy may skip a step unless `force`).
        """
        trainer = self.trainer
        meta = self.dump_meta()
        items = {"state": ocp.args.StandardSave(trainer.state), "meta": ocp.args.JsonSave(meta)}
        arrays = trainer.strategy.array_state()
        if arrays:
            items["strategy"] = ocp.args.PyTreeSave(arrays)
        args = ocp.args.Composite(**items)
        directory, step = Path(manager.directory), trainer.global_step
        trainer.strategy.save_process_state(directory, step)  # each process its own, first
        saved = manager.save(step, args=args, metrics=metrics, force=force)
        kept = {*manager.all_steps(), *([step] if saved else [])}
        trainer.strategy.prune_process_state(directory, kept)
        return saved

    # --- restoring ------------------------------------------------------------------------------
    def restore_latest(self, manager: ocp.CheckpointManager) -> dict[str, Any] | None:
        """Restore the latest checkpoint of `manager` into the trainer.

        Sets the trainer's state and global step, every callback's and the strategy's state, then
        calls the callbacks' `on_load_checkpoint`. A checkpoint that fails to read is reported
        (path and reason) and the previous one is tried; the damaged ones are moved aside.

        Args:
            manager: the checkpoints to restore from; the trainer's state must exist (its shapes
                and shardings are the restore target).

        Returns:
            The data position saved with the checkpoint (`epoch`, `batch_idx`, `iterator`), or
            None when `manager` holds no checkpoint.

        Raises:
            RuntimeError: checkpoints exist but none restores.
            ValueError: the latest readable checkpoint holds a different model.
        """
        directory = Path(manager.directory)
        manager.reload()
        steps = sorted(manager.all_steps(), reverse=True)
        incomplete = sorted(p.name for p in directory.glob(f"*{ocp.utils.TMP_DIR_SUFFIX}*"))
        if incomplete:
            log.warning(
                "Ignoring incomplete checkpoint writes in %s: %s", directory, ", ".join(incomplete)
            )
        if not steps:
            return None
        failures: list[str] = []
        for step in steps:
            try:
                restored = self._read(manager, step)
                break
            except _ModelMismatch as e:
                raise ValueError(str(e)) from None
            except Exception as e:
                reason = f"{type(e).__name__}: {e}".strip()
                reason = reason if len(reason) < 500 else reason[:500] + " ..."
                failures.append(f"{directory / str(step)}: {reason}")
                log.warning(
                    "Cannot restore the checkpoint %s (%s); trying the previous one.",
                    directory / str(step),
                    reason,
                )
        else:
            raise RuntimeError(
                f"No checkpoint in {directory} could be restored (steps {steps}); nothing was "
                "deleted. Move the damaged ones away to start afresh, or point the run at another "
                "directory.\n" + "\n".join(failures)
            )
        if failures:
            _set_aside(manager, [s for s in steps if s > step])
        return self._apply(restored, directory / str(step))

    def restore_path(self, path: str | Path) -> dict[str, Any]:
        """Restore the checkpoint at `path` into the trainer (as `restore_latest` does).

        Args:
            path: one checkpoint, `<directory>/<step>` as a `CheckpointManager` writes it, e.g.
                `checkpoints/best/400`.

        Returns:
            The data position saved with the checkpoint.

        Raises:
            FileNotFoundError: `path` is not a checkpoint.
            ValueError: it holds a different model.
        """
        path = Path(path).absolute()
        if not (path / "meta").is_dir() or not path.name.isdigit():
            raise FileNotFoundError(
                f"{path} is not a training checkpoint (a <directory>/<step> folder with 'state' "
                "and 'meta', e.g. checkpoints/400 or checkpoints/best/400)."
            )
        options = ocp.CheckpointManagerOptions(read_only=True, create=False)
        with ocp.CheckpointManager(path.parent, options=options, item_names=ITEMS) as manager:
            try:
                restored = self._read(manager, int(path.name))
            except _ModelMismatch as e:
                raise ValueError(str(e)) from None
        return self._apply(restored, path)

    def _apply(self, restored: dict[str, Any], path: Path) -> dict[str, Any]:
        """Put a read checkpoint into the trainer; returns its data position."""
        trainer = self.trainer
        meta = restored["meta"]
        trainer.state = restored["state"]
        trainer.global_step = int(meta["global_step"])
        states = meta.get("callbacks", {})
        for cb, key in zip(trainer.callbacks, callback_keys(trainer.callbacks)):
            saved = _saved_key(key, type(cb), states, trainer.callbacks)
            if saved is not None:
                cb.load_state_dict(states[saved])
        trainer.strategy.load_state_dict(meta.get("strategy") or {})
        trainer.strategy.load_array_state(restored["strategy"])
        trainer.restored_checkpoint = path
        for cb in trainer.callbacks:
            cb.on_load_checkpoint(trainer, meta)
        log.info("Restored %s at step %d", path, trainer.global_step)
        return meta["data"]

    def _read(self, manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
        """Read one step; raises on a damaged checkpoint and `_ModelMismatch` on another model."""
        trainer = self.trainer
        path = Path(manager.directory) / str(step)
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict) or "global_step" not in meta or "data" not in meta:
            keys = sorted(meta) if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"meta is incomplete (keys {keys})")
        if meta.get("model"):
            differences = signature_differences(
                meta["model"], model_signature(trainer.strategy.model, trainer.state.params)
            )
            if differences:
                raise _ModelMismatch(
                    f"The checkpoint {path} holds a different model than this run's "
                    f"({'; '.join(differences)}; checkpoint vs this run). Use another workdir or "
                    "checkpoint directory, or restore the model configuration the checkpoint was "
                    "written with."
                )
        saved, current = meta.get("device_states"), _device_state_keys(trainer.state)
        if saved is not None and saved != current:
            raise _ModelMismatch(
                f"The checkpoint {path} holds the device state of the callbacks {saved} but this "
                f"run's callbacks keep {current} (an EMA added, removed or given other "
                "arguments?). Use the callbacks it was written with, another workdir, or start a "
                "new run from its parameters (config.init.orbax_checkpoint)."
            )
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, trainer.state)
        items = {"state": ocp.args.StandardRestore(abstract)}
        if (path / "strategy").exists():
            items["strategy"] = ocp.args.PyTreeRestore()  # numpy arrays, as saved
        restored = manager.restore(step, args=ocp.args.Composite(**items))
        trainer.strategy.load_process_state(path.parent, step, meta.get("strategy") or {})
        return {
            "meta": meta,
            "state": restored["state"],
            "strategy": restored["strategy"] if "strategy" in items else {},
        }


def _device_state_keys(state: Any) -> list[str]:
    """The keys of the callbacks' device state (`Callback.init_device_state`) in `state`."""
    extras = state.extras if isinstance(state.extras, dict) else {}
    return sorted(extras.get("callbacks", {}))


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Move damaged steps newer than the restored one to `<directory>/damaged/` (kept for
    inspection; new checkpoints of those steps can then be written)."""
    directory = Path(manager.directory)
    if jax.process_index() == 0:
        for step in steps:
            source = directory / str(step)
            target = directory / "damaged" / str(step)
            n = 1
            while target.exists():
                target, n = directory / "damaged" / f"{step}-{n}", n + 1
            target.parent.mkdir(parents=True, exist_ok=True)
            source.rename(target)
            log.warning("Moved the damaged checkpoint %s to %s.", source, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("checkpointing: damaged checkpoints set aside")
    manager.reload()
