"""Base configuration: every field the job reads, with production-scale values for Aurora 0.25°.

Variant configs (`demo.py`, `rollout.py`, ...) start from this one and change what differs.
Override anything from the command line, e.g.::

    python main.py --config=configs/default.py --workdir=runs/x \
        --config.trainer.max_steps=2000 --config.model.preset=AuroraSmallPretrained

Sequences are tuples, never lists, because `ml_collections` overrides only tuples from the
command line: ``--config.data.builder_config.paths='("a.nc", "b.nc")'`` (one item: ``'("a.nc",)'``).
"""

from __future__ import annotations

import ml_collections

from aurora.variables import ATMOS_VARS, AURORA_LEVELS, STATIC_VARS, SURF_VARS
from trainers.loss import FINE_TUNING_WEIGHTS


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Modules imported before builders, strategies and callbacks are looked up, so that their
    # `register_builder(...)` calls run: dotted names that must be importable (installed or on
    # PYTHONPATH), or file paths ("path/to/my_builders.py", relative to the current directory)
    # loaded from the file, which needs no PYTHONPATH.
    config.imports = ()

    # --- model: a microsoft-aurora preset name plus overrides of its arguments --------------------
    # or "package.module:Factory": any Flax module with Aurora's Batch -> Batch interface
    # (trainers/models.py; examples/tiny_model.py), built with `kwargs`
    config.model = ml_collections.ConfigDict()
    config.model.preset = (
        "AuroraPretrained"  # Aurora | AuroraPretrained | AuroraSmallPretrained | ...
    )
    config.model.kwargs = ml_collections.ConfigDict({"use_lora": False})

    # --- initial weights: published, a microsoft-aurora file, or an Orbax folder ------------------
    config.init = ml_collections.ConfigDict()
    # A preset whose published weights to start from (aurora.pretrained.CHECKPOINTS), downloaded
    # from the Hugging Face Hub (HF_HOME, HF_HUB_OFFLINE) and converted once (per-user cache).
    config.init.pretrained = ""  # e.g. AuroraPretrained
    config.init.revision = ""  # a Hub revision instead of microsoft-aurora's pinned one
    config.init.pytorch_checkpoint = ""  # e.g. /path/aurora-0.25-pretrained.ckpt (or .safetensors)
    # an Orbax folder: parameters only (`python -m aurora.convert`) or a training checkpoint's,
    # e.g. <workdir>/checkpoints/best/400 (only its parameters are read)
    config.init.orbax_checkpoint = ""
    # False: parameters the checkpoint lacks (new variables, LoRA adapters) start as in a fresh
    # model and entries the model lacks are dropped; the log reports both by module.
    config.init.strict = True

    # --- data: a registered builder (data_builders.registry) and the pipeline ---------------------
    config.data = ml_collections.ConfigDict()
    config.data.builder = "era5"  # era5 | hres | a name you registered
    config.data.builder_config = ml_collections.ConfigDict(
        {
            "data_dir": "",  # default: <workdir>/datasets
            "paths": (),  # ERA5 / HRES files or zarr stores (anything readers.open_dataset reads)
            "static_paths": (),
            "surf_vars": tuple(SURF_VARS),
            "atmos_vars": tuple(ATMOS_VARS),
            "static_vars": tuple(STATIC_VARS),
            "levels": tuple(AURORA_LEVELS),
            "resolution": 0.25,
            "splits": {
                "train": ("2018-01-01", "2020-12-31T18"),
                "validation": ("2021-01-01", "2021-12-31T18"),
            },
        }
    )
    config.data.step_hours = 6  # the model's time step (12 for Aurora12hPretrained)
    # Leads of the last target, drawn per example, for models with variable_lead_time (Aurora
    # 1.5), e.g. (1, 2, 3, 6) on hourly data; (): one step_hours
    config.data.lead_times_hours = ()
    config.data.batch_size = 1  # per process
    config.data.num_threads = 2  # host prefetch threads
    config.data.prefetch_buffer_size = 2
    config.data.num_workers = 0  # Grain worker processes building batches (0: prefetch threads)

    # --- strategy: what one optimisation step is --------------------------------------------------
    config.strategy = ml_collections.ConfigDict()
    config.strategy.name = "rollout"
    config.strategy.steps = 1  # rollout length K
    config.strategy.backprop = "all"  # all | last_k | pushforward
    config.strategy.k = 1  # gradient window for last_k
    config.strategy.average_loss = True
    config.strategy.curriculum = (
        False  # True: traced window that GradStop's schedule changes (full backward cost)
    )

    # --- loss, on normalised variables (trainers/loss.py) -----------------------------------------
    config.loss = ml_collections.ConfigDict()
    # "aurora" (the paper's weighted MAE, Suppl. D.1, weighted by the fields below), "lat_mae",
    # "lat_mse" (latitude-weighted), or "package.module:function" (trainers.loss.LossFn)
    config.loss.name = "aurora"
    config.loss.kwargs = ml_collections.ConfigDict()  # the loss's keyword arguments
    config.loss.lead_weights = ()  # one weight per rollout step; (): the steps' plain mean
    # "aurora"'s keyword arguments (config.loss.kwargs overrides them)
    config.loss.alpha = 0.25
    config.loss.beta = 1.0
    config.loss.gamma = 2.0  # dataset weight: ERA5 2.0, others 1.0
    config.loss.surf_weights = ml_collections.ConfigDict(
        {k: FINE_TUNING_WEIGHTS[k] for k in SURF_VARS}
    )
    config.loss.atmos_weights = ml_collections.ConfigDict(
        {k: FINE_TUNING_WEIGHTS[k] for k in ATMOS_VARS}
    )

    # --- optimiser --------------------------------------------------------------------------------
    config.optimizer = ml_collections.ConfigDict()
    # "adamw" (with b1, b2, weight_decay below), any optax optimiser ("sgd", "lion", ...) or
    # "package.module:function", called as fn(learning_rate=schedule, **kwargs)
    config.optimizer.name = "adamw"
    config.optimizer.kwargs = ml_collections.ConfigDict()
    config.optimizer.learning_rate = 3e-4
    config.optimizer.warmup_steps = 1000
    config.optimizer.schedule = "cosine"  # constant | cosine
    config.optimizer.min_lr_ratio = 0.1
    config.optimizer.weight_decay = 5e-6
    config.optimizer.b1 = 0.9
    config.optimizer.b2 = 0.999

    # --- trainer (Lightning's knobs) --------------------------------------------------------------
    config.trainer = ml_collections.ConfigDict()
    # Lightning's names and meanings (trainers/trainer.py documents each). Fields typed `object`
    # take an int (batches, steps) or a float (a fraction of the data's batches) from the command
    # line, as Lightning's do: --config.trainer.limit_val_batches=0.25.
    config.trainer.max_steps = 10_000
    config.trainer.max_epochs = ml_collections.FieldReference(None, field_type=int)
    config.trainer.min_steps = ml_collections.FieldReference(None, field_type=int)
    config.trainer.min_epochs = ml_collections.FieldReference(None, field_type=int)
    # int: every N optimiser steps; float: a fraction of an epoch; None: at each epoch's end
    config.trainer.val_check_interval = ml_collections.FieldReference(1000, field_type=object)
    config.trainer.check_val_every_n_epoch = ml_collections.FieldReference(1, field_type=int)
    config.trainer.limit_train_batches = ml_collections.FieldReference(None, field_type=object)
    config.trainer.limit_val_batches = ml_collections.FieldReference(50, field_type=object)
    config.trainer.limit_test_batches = ml_collections.FieldReference(None, field_type=object)
    config.trainer.limit_predict_batches = ml_collections.FieldReference(None, field_type=object)
    config.trainer.fast_dev_run = ml_collections.FieldReference(False, field_type=object)  # or N
    config.trainer.num_sanity_val_steps = 0  # Lightning's default is 2 (see the Trainer)
    config.trainer.overfit_batches = ml_collections.FieldReference(0, field_type=object)
    config.trainer.accumulate_grad_batches = 1
    config.trainer.gradient_clip_val = ml_collections.FieldReference(1.0, field_type=float)
    config.trainer.gradient_clip_algorithm = "norm"  # "norm" | "value"
    config.trainer.precision = "bf16-mixed"  # "32" | "bf16-mixed" | "bf16-true"
    config.trainer.remat = "backbone"  # none | backbone | stages | all
    config.trainer.log_every_n_steps = 50
    # Where fit / validate / test / predict start: "last" (the latest checkpoint of the workdir,
    # i.e. resume), "best" (the best by callbacks.checkpoint.monitor), or one checkpoint's path
    # (e.g. <workdir>/checkpoints/best/400).
    config.trainer.ckpt_path = "last"

    # --- callbacks: name -> {type, **kwargs}; `type`: a built-in name or "package.module:Class" ---
    config.callbacks = ml_collections.ConfigDict(
        {
            "checkpoint": {"type": "checkpoint", "every_n_steps": 500, "max_to_keep": 3},
            "on_exception": {"type": "on_exception"},
            "grad_stop": {"type": "grad_stop", "on_nonfinite": "skip"},
            "progress": {"type": "progress"},
            "lr_monitor": {"type": "lr_monitor"},
            "preemption": {"type": "preemption"},
        }
    )

    # --- devices: a (data, fsdp) mesh over every device of every process (trainers/sharding.py) ---
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # -1: the devices left over (pure data parallelism with fsdp = 1)
    config.mesh.fsdp = 1  # e.g. 8 shards each large parameter and its Adam moments over 8 devices
    config.mesh.min_shard_size = 2**18  # parameters with fewer elements stay replicated
    # ((regex on "params/.../kernel", (None, "fsdp")), ...) override FSDP's choice
    config.mesh.rules = ()
    # Multi-host (docs/scaling.md): "auto" starts jax.distributed when a coordinator is named below
    # or JAX detects a cluster of several processes (SLURM, Open MPI, Kubernetes, TPU pods);
    # "always" / "never" force it. Without a cluster manager, name the coordinator "host:port".
    config.distributed = ml_collections.ConfigDict()
    config.distributed.initialize = "auto"
    config.distributed.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    config.distributed.num_processes = ml_collections.FieldReference(None, field_type=int)
    config.distributed.process_id = ml_collections.FieldReference(None, field_type=int)

    # --- evaluation (--mode=test) and forecasts (--mode=predict) ----------------------------------
    config.eval = ml_collections.ConfigDict()
    config.eval.steps = 40  # rollout steps scored / written (40 = 10 days at 6 h)
    config.eval.batch_size = 1  # initial times per model call
    config.eval.split = "test"  # falls back to "validation" when the dataset has no test split
    # ACC's reference and the climatology baseline: a WeatherBench2-layout day-of-year x hour
    # climatology (path or URL; `python -m trainers.evaluation.climatology compute` makes one),
    # here WB2's 1990-2019 ERA5 one; "train-mean": the training split's per-point mean (fallback).
    config.eval.climatology = (
        "https://storage.googleapis.com/weatherbench2/datasets/era5-hourly-climatology/"
        "1990-2019_6h_1440x721.zarr"
    )
    config.eval.init_hours = (0, 12)  # WB2's init times (UTC); () scores every init
    config.eval.lead_hours = ()  # leads to score, e.g. (24, 72, 120, 240); (): every step
    config.eval.grids = ()  # also score on evaluation grids: "1.5deg" (WB2 tables), "0.25deg"
    config.eval.forecast_formats = ("zarr", "netcdf")  # --mode=predict: WB2 zarr and CF netCDF
    # Ensemble members of a stochastic model (keys folded from config.seed and the member index):
    # --mode=predict adds WB2's "realization" dimension, --mode=test adds CRPS and spread/skill.
    config.eval.members = 1
    config.eval.figures = True  # RMSE-vs-lead plots and prediction/truth/difference maps
    config.eval.map_variables = ("2t", "msl", "z", "t", "u")  # maps of these (empty: all) ...
    config.eval.map_levels = (500, 850)  # ... at these levels (atmospheric variables) ...
    config.eval.map_lead_steps = (1, 4, 20, 40)  # ... and these leads (steps), first initial time

    # --- metric writers (process 0 only) ----------------------------------------------------------
    config.writers = ml_collections.ConfigDict(
        {"tensorboard": {"type": "tensorboard"}, "csv": {"type": "csv"}}
    )
    return config
