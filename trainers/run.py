"""Build everything a job needs from a config and run it: the library behind `main.py`.

Kept apart from `main.py` (which only parses flags), as in Flax's examples, so tests and
notebooks call `run(config, workdir, mode)` directly.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections

import aurora
from aurora.normalisation import aurora_stats
from callbacks.base import Callback
from callbacks.checkpoint import ModelCheckpoint, OnExceptionCheckpoint
from callbacks.early_stopping import EarlyStopping
from callbacks.ema import EMA
from callbacks.forecast_scores import ForecastScores
from callbacks.grad_stop import GradStop
from callbacks.lr_monitor import LearningRateMonitor
from callbacks.model_summary import ModelSummary
from callbacks.preemption import Preemption
from callbacks.profiler import Profiler
from callbacks.progress import ProgressBar
from callbacks.timer import Timer
from callbacks.writers import make_writers
from trainers import sharding
from trainers.loss import Loss
from trainers.names import resolve
from trainers.strategies.base import Strategy
from trainers.strategies.lora import LoRAStrategy
from trainers.strategies.replay import ReplayStrategy
from trainers.strategies.rollout import RolloutStrategy
from trainers.trainer import Trainer

__all__ = [
    "CALLBACKS",
    "STRATEGIES",
    "build_callbacks",
    "build_data",
    "build_loss",
    "build_model",
    "build_strategy",
    "import_modules",
    "run",
    "target_only_vars",
]

log = logging.getLogger(__name__)

CALLBACKS: dict[str, type[Callback]] = {
    "checkpoint": ModelCheckpoint,
    "on_exception": OnExceptionCheckpoint,
    "grad_stop": GradStop,
    "progress": ProgressBar,
    "lr_monitor": LearningRateMonitor,
    "early_stopping": EarlyStopping,
    "forecast_scores": ForecastScores,
    "timer": Timer,
    "preemption": Preemption,
    "ema": EMA,
    "model_summary": ModelSummary,
    "profiler": Profiler,
}
"""Built-in callbacks by config name; any other `type` is imported as "package.module:Class"."""


def _lora(
    model: Any, *, inner: str = "rollout", loss: Loss | None = None, **kwargs: Any
) -> Strategy:
    """`strategy.name="lora"`: LoRA around `strategy.inner` (train_base / learning rates stay here,
    every other field goes to the inner strategy)."""
    return LoRAStrategy.wrapping(
        resolve(inner, STRATEGIES, "config.strategy.inner"), model, loss=loss, **kwargs
    )


STRATEGIES: dict[str, Callable[..., Strategy]] = {
    "rollout": RolloutStrategy,
    "replay": ReplayStrategy,
    "lora": _lora,
}


def _plain(value: Any) -> Any:
    """ConfigDicts and lists -> dicts and tuples (hashable module arguments)."""
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _extra_stats(data_stats: dict[str, Any] | None) -> dict[str, tuple[float, float]]:
    """The dataset's statistics of variables outside Aurora's normalisation table."""
    table = aurora_stats()
    return {k: tuple(v) for k, v in (data_stats or {}).items() if k not in table}


def _takes(factory: Any, name: str) -> bool:
    """Whether `factory` accepts the keyword argument `name`."""
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def build_model(
    config: ml_collections.ConfigDict, data_stats: dict[str, tuple[float, float]] | None = None
) -> Any:
    """The model `config.model.preset` names, built with `config.model.kwargs`.

    The name is an Aurora preset (`aurora.PRESETS`) or "package.module:Factory" for any Flax
    module with Aurora's `Batch -> Batch` interface (`trainers.models`). The dataset's statistics
    of variables outside Aurora's table go to the factory's `surf_stats`, if it takes one.
    Precision and rematerialisation are set later, by the Trainer (`config.trainer.precision`,
    `remat`), through `trainers.models.configure_model`.
    """
    kwargs = _plain(config.model.get("kwargs", {}))
    factory = resolve(config.model.preset, aurora.PRESETS, "config.model.preset")
    extra = _extra_stats(data_stats)
    if extra and _takes(factory, "surf_stats"):
        kwargs["surf_stats"] = {**extra, **kwargs.get("surf_stats", {})}
    return factory(**kwargs)


def build_loss(config: ml_collections.ConfigDict) -> Loss:
    """The loss `config.loss` names (`trainers.loss.Loss.from_config`)."""
    return Loss.from_config(_plain(config.loss))


def build_strategy(
    config: ml_collections.ConfigDict,
    model: Any,
    data_stats: dict[str, tuple[float, float]] | None = None,
) -> Strategy:
    """The strategy `config.strategy` names, with the loss of `config.loss`.

    A model without `surf_stats` (not Aurora) gets the dataset's statistics of variables outside
    Aurora's table as the strategy's `stats`, so the loss can normalise them.
    """
    kwargs = _plain(config.strategy)
    name = kwargs.pop("name")
    cls = resolve(name, STRATEGIES, "config.strategy.name")
    extra = _extra_stats(data_stats)
    if extra and getattr(model, "surf_stats", None) is None:
        kwargs.setdefault("stats", extra)
    strategy = cls(model, loss=build_loss(config), **kwargs)
    step_hours = getattr(strategy, "step_hours", config.data.step_hours)
    if float(step_hours) != float(config.data.step_hours):
        raise ValueError(
            f"strategy.step_hours={step_hours} differs from "
            f"data.step_hours={config.data.step_hours}."
        )
    return strategy


def build_callbacks(config: ml_collections.ConfigDict, workdir: Path) -> list[Callback]:
    callbacks = []
    for key, spec in _plain(config.get("callbacks", {})).items():
        spec = dict(spec)
        kind = spec.pop("type", key)
        cls = resolve(kind, CALLBACKS, "callback type")
        callbacks.append(cls(**spec))
    return callbacks


def target_only_vars(model: Any) -> dict[str, tuple[str, ...]]:
    """The model's output-only variables as `Pipeline`'s target-only ones: the data hold them as
    targets, never as inputs (none for a model without them)."""
    return {
        "target_only_surf_vars": tuple(getattr(model, "output_only_surf_vars", ())),
        "target_only_atmos_vars": tuple(getattr(model, "output_only_atmos_vars", ())),
    }


def build_data(
    config: ml_collections.ConfigDict,
    workdir: Path,
    rollout_steps: int,
    target_only: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the dataset and return its statistics and pipelines.

    Every kind of registered builder (TFDS class, `SourceBuilder` class, function) is read the
    same way: its splits and statistics through `data_builders.registry.builder_splits` /
    `builder_stats`. In a multi-host run only process 0 calls ``download_and_prepare()``; the
    others wait for it at a barrier and then open what it built.

    Args:
        config: The job config (``data.builder``, ``data.builder_config`` and the pipeline
            fields of ``data``).
        workdir: The run's folder; ``<workdir>/datasets`` is the default ``data_dir``, passed to
            builders that take one.
        rollout_steps: Targets per example.
        target_only: `Pipeline`'s target-only variables (`target_only_vars` of the model).

    Returns:
        ``{"stats": {...}, "train": Pipeline}`` plus ``"validation"`` and ``"test"`` pipelines
        for the splits the dataset has.
    """
    from data_builders.pipeline import Pipeline, open_source
    from data_builders.registry import builder_splits, builder_stats

    builder_config = _plain(config.data.builder_config)
    builder_config["data_dir"] = builder_config.get("data_dir") or str(workdir / "datasets")
    builder = _prepared_builder(config.data.builder, builder_config)
    process, processes = jax.process_index(), jax.process_count()

    def pipeline(split: str, train: bool) -> Pipeline:
        return Pipeline(
            open_source(builder, split),
            step_hours=config.data.step_hours,
            rollout_steps=rollout_steps,
            batch_size=config.data.batch_size,
            shuffle=train,
            seed=config.seed,
            shard_index=process,
            shard_count=processes,
            drop_remainder=train,
            num_threads=config.data.num_threads,
            prefetch_buffer_size=config.data.prefetch_buffer_size,
            num_workers=config.data.get("num_workers", 0),
            lead_times_hours=tuple(config.data.get("lead_times_hours", ())),
            **(target_only or {}),
        )

    splits = builder_splits(builder)
    if "train" not in splits:
        raise ValueError(f"dataset builder {config.data.builder!r} has no 'train' split: {splits}")
    out: dict[str, Any] = {"stats": builder_stats(builder)}
    out["train"] = pipeline("train", True)
    if "validation" in splits:
        out["validation"] = pipeline("validation", False)
    if "test" in splits:
        out["test"] = pipeline("test", False)
    return out


def _prepared_builder(name: str, builder_config: dict[str, Any]) -> Any:
    """`get_builder(name, **builder_config)` after ``download_and_prepare()`` by process 0.

    With several processes the others wait at a barrier until process 0 has built the dataset
    (one build, no conflicting writes to the shared folder), then create their builder, which
    reads what was written. Process 0 reaches the barrier even when its build fails, so the
    others stop waiting and fail on the missing dataset instead of hanging.
    """
    from data_builders.registry import get_builder

    builds = jax.process_index() == 0
    try:
        if builds:
            builder = get_builder(name, **builder_config)
            builder.download_and_prepare()
    finally:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"build_data: {name} prepared")
    return builder if builds else get_builder(name, **builder_config)


def import_modules(imports: Any) -> list[Any]:
    """Import the modules of ``config.imports`` (their `register_builder` calls then run).

    Nothing is added to ``sys.path``: a dotted name must be importable as it is (installed, or on
    PYTHONPATH); a path ending in ``.py`` is loaded from that file, so it needs neither. A file is
    imported under its stem (``my_builders.py`` -> ``my_builders``), so "my_builders:MyCallback"
    names its classes in ``callbacks`` or ``strategy.name``; it is loaded once per process.

    Args:
        imports: A sequence of dotted module names and ``.py`` file paths (relative paths are
            relative to the current directory).

    Returns:
        The imported modules, in order.

    Raises:
        ModuleNotFoundError: If a dotted name is not importable.
        FileNotFoundError: If a ``.py`` file does not exist.
        ImportError: If a file's stem names an already imported module from another file.
    """
    if isinstance(imports, str):
        imports = (imports,)
    modules = []
    for entry in imports or ():
        entry = str(entry)
        if entry.endswith(".py"):
            modules.append(_import_file(Path(entry).expanduser().resolve()))
            continue
        try:
            modules.append(importlib.import_module(entry))
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"config.imports: cannot import {entry!r} ({e}). Nothing is added to sys.path: "
                "install the package, set PYTHONPATH, or give the module's file path "
                '("path/to/module.py").',
                name=e.name,
            ) from e
    return modules


def _import_file(path: Path) -> Any:
    """The module defined by the file `path`, imported under the file's stem."""
    import importlib.util
    import sys

    if not path.is_file():
        raise FileNotFoundError(f"config.imports: no file {path}")
    name = path.stem
    loaded = sys.modules.get(name)
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve() == path:
            return loaded
        raise ImportError(
            f"config.imports: {path} would be imported as {name!r}, which is already the module "
            f"{loaded!r}; rename the file"
        )
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"config.imports: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _init_params(config: ml_collections.ConfigDict, model: aurora.Aurora) -> Any:
    """The starting parameters `config.init` names (None: a fresh initialisation).

    Published weights (`init.pretrained`) and PyTorch files go through the conversion cache of
    `aurora.pretrained`. With `init.strict=False` the parameters the checkpoint lacks get the
    values the Trainer's own fresh initialisation would give them (the same PRNG key).
    """
    from aurora.convert import fit_params
    from aurora.pretrained import download, load_converted, model_rules

    init = config.init
    checkpoint = init.get("pytorch_checkpoint")
    if init.get("pretrained"):
        checkpoint = download(init.pretrained, revision=init.get("revision") or None)
    if checkpoint:
        strict = bool(init.get("strict", True))
        flat = load_converted(
            checkpoint, model.patch_size, model.max_history_size, **model_rules(model)
        )
        if strict and model.use_lora and not any(p[-1].startswith("lora_") for p in flat):
            # Pretrained weights without adapters: the LoRA strategy adds fresh ones (B = 0).
            model = model.clone(use_lora=False)
        init_rng, _ = jax.random.split(jax.random.PRNGKey(config.seed))  # as Trainer.init_state
        params, report = fit_params(flat, model, strict=strict, rng=init_rng)
        if not strict:
            log.info("config.init.strict=False: %s", report.summary())
        return params
    if init.get("orbax_checkpoint"):  # parameters only, or a training checkpoint's
        from trainers.checkpointing import load_params

        return load_params(config.init.orbax_checkpoint)
    return None


def _mesh_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The Trainer's mesh and partition rules from `config.mesh` (every device of every process)."""
    mesh_config = config.get("mesh") or ml_collections.ConfigDict({"data": -1, "fsdp": 1})
    return {
        "mesh": sharding.make_mesh(
            data=mesh_config.get("data", -1), fsdp=mesh_config.get("fsdp", 1)
        ),
        "sharding_rules": tuple(
            (str(r[0]), tuple(r[1])) for r in _plain(mesh_config.get("rules", ()))
        ),
        "min_shard_size": int(mesh_config.get("min_shard_size", 2**18)),
    }


def _eval_data(config: ml_collections.ConfigDict, data: dict[str, Any]) -> Any:
    split = config.eval.get("split", "test")
    pipeline = data.get(split) or data.get("validation")
    if pipeline is None:
        raise ValueError(f"The dataset has no {split!r} or 'validation' split to evaluate on.")
    return pipeline


def _init_provenance(init: ml_collections.ConfigDict) -> dict[str, Any]:
    """The starting weights `config.init` names (empty: trained from scratch), and
    `strict: False` when they were loaded non-strictly."""
    source = {k: v for k, v in _plain(init).items() if v and k != "strict"}
    if source and not init.get("strict", True):
        source["strict"] = False
    return source


def _provenance(config: ml_collections.ConfigDict, trainer: Trainer) -> dict[str, Any]:
    """What produced a score table or forecast: model, weights (checkpoint step) and the run."""
    restored = trainer.restored_checkpoint  # the one config.trainer.ckpt_path named
    return {
        "model_preset": config.model.preset,
        "checkpoint_step": trainer.global_step if restored is not None else None,
        "checkpoint_dir": str(restored.parent) if restored is not None else None,
        "init": _init_provenance(config.init),
        "strategy": config.strategy.name,
    }


def _init_hours(config: ml_collections.ConfigDict) -> tuple[int, ...] | None:
    """`config.eval.init_hours` (WB2's 00 and 12 UTC by default); empty: every init."""
    hours = tuple(config.eval.get("init_hours", (0, 12)))
    return tuple(int(h) for h in hours) if hours else None


def _climatology(
    config: ml_collections.ConfigDict, model: aurora.Aurora, source: Any, train_source: Any
) -> tuple[Any, dict[str, Any]]:
    """The climatology `config.eval.climatology` names, and what to record of it.

    A path or URL: a WB2-layout store (`trainers.evaluation.open_climatology`). ``train-mean``:
    the training split's per-point mean, never the evaluated period's own (that would leak its
    truth into the baseline).
    """
    from trainers.evaluation import TRAIN_MEAN, open_climatology, source_mean
    from trainers.evaluation.states import model_variables

    name = str(config.eval.get("climatology", TRAIN_MEAN))
    if name == TRAIN_MEAN:
        if train_source is None:
            raise ValueError("eval.climatology='train-mean' needs a train split")
        about = (
            f"per-grid-point mean of the {len(train_source.times)} states of {train_source.name}"
        )
        return source_mean(train_source), {"climatology_source": about}
    surf, atmos, _ = model_variables(model, source)
    clim = open_climatology(
        name, surf=surf, atmos=atmos, levels=source.levels, lat=source.lat, lon=source.lon
    )
    return clim, {"climatology_source": name}


def _score(
    config: ml_collections.ConfigDict,
    trainer: Trainer,
    pipeline: Any,
    workdir: Path,
    train_source: Any = None,
) -> dict[str, Any]:
    """WeatherBench2-style scores of rollouts from the 00/12 UTC initial times, with baselines
    and figures."""
    from trainers.evaluation import run_evaluation

    state = trainer.load(pipeline)
    provenance = _provenance(config, trainer)
    climatology, about = _climatology(config, trainer.strategy.model, pipeline.source, train_source)
    provenance.update(about)
    step = float(config.data.step_hours)
    lead_hours = tuple(config.eval.get("lead_hours", ()))
    return run_evaluation(
        trainer.strategy.model,
        state.params,
        pipeline.source,
        steps=config.eval.steps,
        climatology=climatology,
        out_dir=workdir / "eval",
        provenance=provenance,
        step_hours=config.data.step_hours,
        batch_size=config.eval.batch_size,
        figures=config.eval.figures,
        map_variables=tuple(config.eval.map_variables),
        map_levels=tuple(config.eval.map_levels),
        map_lead_steps=tuple(config.eval.map_lead_steps),
        init_hours=_init_hours(config),
        lead_steps=tuple(round(float(h) / step) for h in lead_hours) or None,
        grids=tuple(config.eval.get("grids", ())),
        members=int(config.eval.get("members", 1)),
        seed=int(config.seed),
    )


def _forecast(
    config: ml_collections.ConfigDict, trainer: Trainer, pipeline: Any, workdir: Path
) -> dict[str, Path]:
    """Forecasts from the evaluation split's initial times: WB2 zarr and CF netCDF files."""
    from trainers.evaluation import predict

    state = trainer.load(pipeline)
    return predict(
        trainer.strategy.model,
        state.params,
        pipeline.source,
        steps=config.eval.steps,
        out_dir=workdir / "predictions",
        provenance=_provenance(config, trainer),
        step_hours=config.data.step_hours,
        batch_size=config.eval.batch_size,
        init_hours=_init_hours(config),
        formats=tuple(config.eval.get("forecast_formats", ("zarr", "netcdf"))),
        members=int(config.eval.get("members", 1)),
        seed=int(config.seed),
    )


def run(
    config: ml_collections.ConfigDict, workdir: str | Path, mode: str = "fit"
) -> dict[str, Any]:
    """Run `mode` (fit | validate | test | predict) and return a summary of what happened."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    import_modules(config.get("imports", ()))
    # The model's output-only variables do not depend on the data's statistics.
    target_only = target_only_vars(build_model(config))
    data = build_data(config, workdir, config.strategy.steps, target_only)
    model = build_model(config, data["stats"])
    strategy = build_strategy(config, model, data["stats"])
    trainer = Trainer(
        strategy,
        optimizer=config.optimizer,
        callbacks=build_callbacks(config, workdir),
        writers=make_writers(
            list(_plain(config.get("writers", {})).values()), workdir, jax.process_index() == 0
        ),
        workdir=workdir,
        config=config,
        seed=config.seed,
        init_params=_init_params(config, model),
        **_mesh_kwargs(config),
        **_plain(config.trainer),
    )
    summary: dict[str, Any] = {"workdir": str(workdir), "mode": mode}
    for callback in trainer.callbacks:  # callbacks that roll the model out read the val split
        if hasattr(callback, "attach_source") and data.get("validation") is not None:
            callback.attach_source(data["validation"].source)
    try:
        if mode == "fit":
            trainer.fit(data["train"], data.get("validation"))
            summary["metrics"] = dict(trainer.callback_metrics)
        elif mode == "validate":
            summary["metrics"] = trainer.validate(data["validation"])
        elif mode == "test":
            summary["metrics"] = trainer.test(_eval_data(config, data))
            summary["evaluation"] = _score(
                config, trainer, _eval_data(config, data), workdir, data["train"].source
            )
        elif mode == "predict":
            paths = _forecast(config, trainer, _eval_data(config, data), workdir)
            summary["forecasts"] = {k: str(v) for k, v in paths.items()}
            summary["forecast"] = str(paths.get("netcdf", paths.get("zarr")))
        else:
            raise ValueError(f"Unknown mode {mode!r}: use fit, validate, test or predict.")
    finally:
        for writer in trainer.writers:
            writer.close()
        checkpoint = trainer.checkpoint_callback
        if checkpoint is not None:
            checkpoint.close()
    summary["global_step"] = trainer.global_step
    summary["outputs"] = {p.name: str(p) for p in sorted(workdir.iterdir()) if p.name != "datasets"}
    return summary
