"""PyTorch (microsoft-aurora) state dicts <-> Flax params, by name.

The Flax modules are named after the PyTorch ones, so the mapping is a rule, not a table:

* a numeric path segment joins the previous one: `blocks.1` -> `blocks_1`, `layers.0.1` ->
  `layers_0_1`, `time_mlp.0` -> `time_mlp_0`;
* `Linear.weight` `(out, in)` -> `kernel` `(in, out)`; `LayerNorm.weight` -> `scale`;
* LoRA adapters `lora_qkv.loras.{i}.lora_A` are stacked along a leading axis: `lora_qkv/lora_A[i]`;
* patch-embedding kernels `weights.{var}` keep PyTorch's Conv3d layout.

Conversion has two halves: `to_flax_names` renames a state dict by the rule above (it depends on
the checkpoint only, so `aurora.pretrained` caches its result), and `fit_params` fits the named
arrays to a model. Strict fitting (the default) uses every source key once, fills every Flax
parameter and lists everything missing, extra or mis-shaped. `strict=False` does what
microsoft-aurora's `load_checkpoint(strict=False)` does: it loads what the checkpoint has, leaves
the rest (a new variable's patch embedding and decoder head, LoRA adapters) at a fresh model's
initial values, drops what the model no longer has, and reports the counts by module. Shapes must
match either way. Published checkpoints are accepted as `load_checkpoint` accepts them: the `net.`
prefix and the older ID-based embedding/head keys are adapted, and a checkpoint with a shorter
history is zero-padded. PyTorch itself is not needed (`load_state_dict` reads `.ckpt`/`.pt`,
`.npz` and `.safetensors`); `main` is the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from aurora.torch_checkpoint import load_torch_checkpoint
from aurora.variables import ATMOS_VARS, STATIC_VARS, SURF_VARS

__all__ = [
    "CONVERTER_VERSION",
    "ConversionError",
    "FlatParams",
    "LoadReport",
    "adapt_checkpoint",
    "convert_pytorch_checkpoint",
    "fit_params",
    "load_state_dict",
    "main",
    "param_shapes",
    "save_safetensors",
    "to_flax_names",
    "to_pytorch_state_dict",
]

CONVERTER_VERSION = 1
"""Version of `to_flax_names`' output: bump it whenever the naming rule or `adapt_checkpoint`
changes, so that converted checkpoints cached by `aurora.pretrained` are converted again."""

FlatParams = dict[tuple[str, ...], np.ndarray]
"""Flax parameter path (tuple of names) -> array, as `flax.traverse_util.flatten_dict` gives."""

log = logging.getLogger(__name__)

_LORA = re.compile(r"^(.*)\.loras\.(\d+)\.(lora_[AB])$")
_VAR_CONTAINERS = {"weights", "surf_heads", "atmos_heads"}  # children are variable names


class ConversionError(ValueError):
    """A state dict does not fit the model; the message lists every discrepancy."""


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch `.ckpt`/`.pt`, a `.safetensors` or a `.npz` state dict as numpy arrays.

    PyTorch files are read by :mod:`aurora.torch_checkpoint`, without PyTorch and as safely as
    `torch.load(weights_only=True)`: only tensor-rebuilding globals are allowed. A Lightning-style
    checkpoint's `"state_dict"` entry is unwrapped. Safetensors files hold raw arrays only, so
    they never need unpickling (`save_safetensors` writes them).

    Args:
        path: A `.ckpt`/`.pt` file, a `.safetensors` file or a `.npz` archive.

    Returns:
        Key -> float32 array (`.npz` and `.safetensors` arrays keep their dtype).
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(path)
    state = load_torch_checkpoint(path, float32=True)
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return {k: np.asarray(v) for k, v in state.items()}


def adapt_checkpoint(
    state: Mapping[str, np.ndarray],
    patch_size: int,
    max_history_size: int,
    *,
    surf_vars: tuple[str, ...] = SURF_VARS,
    static_vars: tuple[str, ...] = STATIC_VARS,
    atmos_vars: tuple[str, ...] = ATMOS_VARS,
) -> dict[str, np.ndarray]:
    """Bring a published checkpoint to the current key layout (what `load_checkpoint` does).

    Strips the `net.` prefix, splits the older single embedding and head matrices into one entry
    per variable (by default in the original models' order, `aurora.variables`; Aurora 1.5's
    `_adapt_checkpoint_v1p5` splits them over the model's own variables) and zero-pads the
    history axis of embedding kernels up to `max_history_size`.

    Args:
        state: A microsoft-aurora state dict.
        patch_size: The model's patch size.
        max_history_size: The model's history length.
        surf_vars: The surface variables, in the order of the older matrices' columns.
        static_vars: The static variables, following `surf_vars` in the embedding's columns.
        atmos_vars: The atmospheric variables, in the older matrices' order.

    Returns:
        A new state dict in the current layout.

    Raises:
        ConversionError: If a matrix has the wrong number of variables or a longer history.
    """
    d = {k.removeprefix("net."): np.asarray(v) for k, v in state.items()}

    def split_columns(key: str, names: tuple[str, ...], prefix: str) -> None:
        if key in d:
            weight = d.pop(key)
            if weight.shape[1] != len(names):
                raise ConversionError(
                    f"{key} has {weight.shape[1]} variables, expected {len(names)}."
                )
            for i, name in enumerate(names):
                d[f"{prefix}.{name}"] = weight[:, i : i + 1]

    def split_head(key: str, names: tuple[str, ...], prefix: str) -> None:
        if f"{key}.weight" in d:
            if d[f"{key}.weight"].shape[0] != len(names) * patch_size**2:
                raise ConversionError(
                    f"{key}.weight has {d[f'{key}.weight'].shape[0]} rows, expected "
                    f"{len(names)} variables times {patch_size**2} pixels."
                )
            weight = d.pop(f"{key}.weight").reshape(patch_size**2, len(names), -1)
            bias = d.pop(f"{key}.bias").reshape(patch_size**2, len(names))
            for i, name in enumerate(names):
                d[f"{prefix}.{name}.weight"] = weight[:, i]
                d[f"{prefix}.{name}.bias"] = bias[:, i]

    split_columns(
        "encoder.surf_token_embeds.weight",
        surf_vars + static_vars,
        "encoder.surf_token_embeds.weights",
    )
    split_columns(
        "encoder.atmos_token_embeds.weight", atmos_vars, "encoder.atmos_token_embeds.weights"
    )
    split_head("decoder.surf_head", surf_vars, "decoder.surf_heads")
    split_head("decoder.atmos_head", atmos_vars, "decoder.atmos_heads")

    for key, weight in list(d.items()):
        if key.startswith(
            ("encoder.surf_token_embeds.weights.", "encoder.atmos_token_embeds.weights.")
        ):
            history = weight.shape[2]
            if history > max_history_size:
                raise ConversionError(
                    f"Cannot load {key} with history {history} into a model with "
                    f"max_history_size={max_history_size}."
                )
            if history < max_history_size:  # New history slices start at zero.
                padded = np.zeros(
                    (*weight.shape[:2], max_history_size, *weight.shape[3:]), weight.dtype
                )
                padded[:, :, :history] = weight
                d[key] = padded
    return d


def _flax_path(torch_key: str, ndim: int) -> tuple[tuple[str, ...], bool]:
    """PyTorch key -> (Flax path, transpose?) following the module docstring's rule."""
    parts = torch_key.split(".")
    path: list[str] = []
    for part in parts[:-1]:
        if part.isdigit() and path and path[-1] not in _VAR_CONTAINERS:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    leaf = parts[-1]
    if leaf == "weight" and ndim == 2:
        return (*path, "kernel"), True
    if leaf == "weight" and ndim == 1:
        return (*path, "scale"), False
    return (*path, leaf), False


def param_shapes(model: Any, batch: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat `{path: shape}` of the model's parameters, without allocating them.

    Args:
        model: An `aurora.Aurora` module.
        batch: A batch it accepts (only shapes matter).

    Returns:
        Parameter path (tuple of names) -> shape.
    """
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), batch))
    flat = traverse_util.flatten_dict(variables["params"])
    return {k: tuple(v.shape) for k, v in flat.items()}


def _example_batch(model: Any) -> Any:
    """A tiny batch covering every configured variable, for shape inference."""
    from aurora.batch import Batch, Metadata

    p = model.patch_size
    h, w = 2 * p, 2 * p
    return Batch(
        surf_vars={  # as given to the model: a preset's hooks may derive some of `surf_vars`
            v: np.zeros((1, model.max_history_size, h, w), np.float32)
            for v in model.input_surf_vars
        },
        static_vars={v: np.zeros((h, w), np.float32) for v in model.static_vars},
        atmos_vars={
            v: np.zeros((1, model.max_history_size, 1, h, w), np.float32) for v in model.atmos_vars
        },
        metadata=Metadata(
            lat=np.linspace(80, -80, h),
            lon=np.linspace(0, 360, w, endpoint=False),
            time=np.zeros((1,), np.int32),
            # A level-conditioned model makes every configured level's copy from any one of them.
            atmos_levels=tuple(getattr(model, "level_condition", None) or (500,))[:1],
        ),
    )


def _as_numpy(source: str | Path | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict from a path (`load_state_dict`) or a mapping of arrays or torch tensors."""
    if isinstance(source, (str, Path)):
        return load_state_dict(source)
    return {
        k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        for k, v in source.items()
    }


def to_flax_names(
    state: Mapping[str, np.ndarray],
    patch_size: int,
    max_history_size: int,
    *,
    adapt: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
) -> FlatParams:
    """Adapt a state dict (`adapt_checkpoint`) and rename it by the module docstring's rule.

    The result depends on the checkpoint and on the two arguments only, not on which variables
    the model has, so it can be cached per checkpoint file and fitted to any model later
    (`fit_params`).

    Args:
        state: A microsoft-aurora state dict.
        patch_size: The model's patch size (to split older head matrices).
        max_history_size: The model's history length (embeddings are zero-padded to it).
        adapt: A preset's own adaptation (`Aurora.adapt_state_dict`) instead of
            `adapt_checkpoint`, for presets whose published layout differs.

    Returns:
        Flax path -> float32 array in Flax's layout, LoRA adapters stacked.

    Raises:
        ConversionError: If an adapter list has gaps, or as `adapt_checkpoint` does.
    """
    state = adapt_checkpoint(state, patch_size, max_history_size) if adapt is None else adapt(state)
    flat: FlatParams = {}
    lora_parts: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    for key, value in state.items():
        lora = _LORA.match(key)
        if lora:
            path, _ = _flax_path(f"{lora.group(1)}.{lora.group(3)}", 0)
            lora_parts.setdefault(path, {})[int(lora.group(2))] = value
            continue
        path, transpose = _flax_path(key, value.ndim)
        flat[path] = value.T if transpose else value
    for path, parts in lora_parts.items():
        if sorted(parts) != list(range(len(parts))):
            raise ConversionError(
                f"{_torch_key(path)}: adapters {sorted(parts)} are not numbered 0..n-1."
            )
        flat[path] = np.stack([parts[i] for i in range(len(parts))])
    return {k: np.asarray(v, dtype=np.float32) for k, v in flat.items()}


@dataclass(frozen=True)
class LoadReport:
    """What `fit_params` did with each parameter (Flax paths joined by `/`)."""

    loaded: tuple[str, ...]
    """Model parameters taken from the checkpoint."""
    created: tuple[str, ...]
    """Model parameters the checkpoint lacks, left at a fresh model's initial values."""
    dropped: tuple[str, ...]
    """Checkpoint entries (renamed by `to_flax_names`) the model does not have."""

    def by_module(self, depth: int = 2) -> dict[str, dict[str, int]]:
        """Counts per module (the first `depth` path segments), e.g.
        `{"decoder/surf_heads": {"loaded": 8, "created": 2, "dropped": 0}}`."""
        counts: dict[str, Counter[str]] = {}
        for kind in ("loaded", "created", "dropped"):
            for path in getattr(self, kind):
                module = "/".join(path.split("/")[:depth])
                counts.setdefault(module, Counter())[kind] += 1
        return {
            m: {k: c[k] for k in ("loaded", "created", "dropped")}
            for m, c in sorted(counts.items())
        }

    def summary(self) -> str:
        """A few lines for the log: the totals, then every module that was not fully loaded."""
        lines = [
            f"Loaded {len(self.loaded)} parameters, created {len(self.created)} the checkpoint "
            f"lacks, dropped {len(self.dropped)} the model does not have."
        ]
        for module, c in self.by_module().items():
            if c["created"] or c["dropped"]:
                lines.append(
                    f"  {module}: loaded {c['loaded']}, created {c['created']}, "
                    f"dropped {c['dropped']}"
                )
        return "\n".join(lines)


def _fresh_params(model: Any, paths: list[tuple[str, ...]], rng: jax.Array) -> FlatParams:
    """The initial values of `paths` in a model initialised with `rng` (only those are computed:
    XLA drops the initialisers and the forward pass whose results are not returned)."""
    batch = _example_batch(model)

    def init(key: jax.Array) -> dict[str, jax.Array]:
        flat = traverse_util.flatten_dict(model.init(key, batch)["params"])
        return {"/".join(p): flat[p] for p in paths}

    values = jax.jit(init)(rng)
    return {p: np.asarray(values["/".join(p)]) for p in paths}


def fit_params(
    flat: FlatParams, model: Any, *, strict: bool = True, rng: jax.Array | int = 0
) -> tuple[dict[str, Any], LoadReport]:
    """Fit renamed checkpoint arrays (`to_flax_names`) to `model`'s parameters.

    Args:
        flat: Flax path -> array.
        model: The `aurora.Aurora` module to fill.
        strict: Refuse a checkpoint that lacks a parameter or has one the model does not. With
            False, missing parameters get the values a fresh `model.init(rng, ...)` gives them
            (LoRA adapters start with `B = 0`, so the model predicts as the base does) and extra
            entries are dropped, as `load_checkpoint(strict=False)` does in microsoft-aurora.
        rng: The PRNG key (or seed) for the parameters that are created.

    Returns:
        The nested Flax `params` (numpy arrays) and what was loaded, created and dropped.

    Raises:
        ConversionError: listing shape mismatches, and with `strict` also keys without a target
            and parameters without a source.
    """
    targets = param_shapes(model, _example_batch(model))
    extra = sorted(p for p in flat if p not in targets)
    missing = sorted(p for p in targets if p not in flat)
    wrong_shape = [
        f"{'/'.join(p)}: checkpoint {tuple(v.shape)}, model {targets[p]}"
        for p, v in flat.items()
        if p in targets and tuple(v.shape) != targets[p]
    ]
    if wrong_shape or (strict and (extra or missing)):
        lines = ["The state dict does not match the model."]
        for title, items in (
            ("Unused checkpoint keys", [_torch_key(p) for p in extra] if strict else []),
            ("Parameters not filled", ["/".join(p) for p in missing] if strict else []),
            ("Shape mismatches", wrong_shape),
        ):
            if items:
                lines.append(
                    f"{title} ({len(items)}): "
                    + ", ".join(sorted(items)[:50])
                    + (" ..." if len(items) > 50 else "")
                )
        raise ConversionError("\n".join(lines))
    params = {p: np.asarray(v, dtype=np.float32) for p, v in flat.items() if p in targets}
    if missing:
        key = jax.random.PRNGKey(rng) if isinstance(rng, int) else rng
        params |= _fresh_params(model, missing, key)
    report = LoadReport(
        loaded=tuple("/".join(p) for p in sorted(p for p in flat if p in targets)),
        created=tuple("/".join(p) for p in missing),
        dropped=tuple("/".join(p) for p in extra),
    )
    return traverse_util.unflatten_dict(params), report


def convert_pytorch_checkpoint(
    source: str | Path | Mapping[str, Any],
    model: Any,
    *,
    strict: bool = True,
    rng: jax.Array | int = 0,
) -> dict[str, Any]:
    """A microsoft-aurora state dict (path or mapping) -> Flax `params` for `model`.

    Args:
        source: A checkpoint path (see `load_state_dict`) or a state dict.
        model: The `aurora.Aurora` module to fill.
        strict: As for `fit_params`; without it, the report is logged.
        rng: The PRNG key (or seed) of parameters the checkpoint lacks (`strict=False`).

    Returns:
        The nested Flax `params` dict, numpy arrays.

    Raises:
        ConversionError: As `fit_params` does.
    """
    flat = to_flax_names(
        _as_numpy(source),
        model.patch_size,
        model.max_history_size,
        adapt=getattr(model, "adapt_state_dict", None),
    )
    params, report = fit_params(flat, model, strict=strict, rng=rng)
    if not strict:
        log.info("Non-strict load. %s", report.summary())
    return params


def _torch_key(path: tuple[str, ...]) -> str:
    """A Flax path's PyTorch key (the inverse of `_flax_path`); LoRA adapters as `loras.*`."""
    segments: list[str] = []
    for i, part in enumerate(path[:-1]):
        if i > 0 and path[i - 1] in _VAR_CONTAINERS:
            segments.append(part)  # a variable name, never split
        else:
            segments.extend(re.sub(r"_(\d+)(?=(_\d+)*$)", r".\1", part).split("."))
    prefix, leaf = ".".join(segments), path[-1]
    if leaf in ("lora_A", "lora_B"):
        return f"{prefix}.loras.*.{leaf}"
    return f"{prefix}.{'weight' if leaf in ('kernel', 'scale') else leaf}"


def to_pytorch_state_dict(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params -> a microsoft-aurora state dict (numpy), the inverse of the naming rule.

    Args:
        params: Nested Flax `params`.

    Returns:
        PyTorch key -> numpy array in PyTorch's layout.
    """
    out: dict[str, np.ndarray] = {}
    for path, value in traverse_util.flatten_dict(dict(params)).items():
        value = np.asarray(jax.device_get(value))
        key = _torch_key(path)
        if path[-1] in ("lora_A", "lora_B"):
            for i, adapter in enumerate(value):
                out[key.replace(".*.", f".{i}.")] = adapter
        else:
            # Contiguous, as writers of raw buffers (safetensors) expect: a transposed view
            # would be written in the wrong order.
            out[key] = np.ascontiguousarray(value.T if path[-1] == "kernel" else value)
    return out


def save_safetensors(params: Mapping[str, Any], path: str | Path) -> Path:
    """Write Flax params as a microsoft-aurora state dict in safetensors format.

    Safetensors holds raw arrays and a JSON header, so sharing weights this way never requires
    unpickling. The file loads here with `load_state_dict` / `convert_pytorch_checkpoint` and in
    PyTorch with `model.load_state_dict(safetensors.torch.load_file(path))`.

    Args:
        params: Nested Flax `params`.
        path: The file to write.

    Returns:
        The path written.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    save_file(to_pytorch_state_dict(params), path, metadata={"format": "pt"})
    return path


def main(argv: list[str] | None = None) -> None:
    """The `python -m aurora.convert` command line, in either direction::

        # a microsoft-aurora checkpoint -> an Orbax folder (or --format safetensors: one file)
        python -m aurora.convert --pytorch-ckpt aurora-0.25-small-pretrained.ckpt \
            --preset AuroraSmallPretrained --out checkpoints/aurora-small
        # Flax params in an Orbax folder (e.g. fine-tuned) -> a microsoft-aurora safetensors file
        python -m aurora.convert --orbax-ckpt runs/x/export/params --format safetensors \
            --out aurora-finetuned.safetensors

    Args:
        argv: Arguments; None reads `sys.argv`.
    """
    from aurora.model.presets import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--pytorch-ckpt",
        help="microsoft-aurora state dict: .ckpt/.pt, .safetensors or .npz (needs --preset)",
    )
    source.add_argument("--orbax-ckpt", help="Orbax folder of Flax params (to write safetensors)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model preset")
    parser.add_argument(
        "--out", required=True, help="output: a folder (orbax) or a file (safetensors)"
    )
    parser.add_argument(
        "--format",
        choices=("orbax", "safetensors"),
        default="orbax",
        help="orbax: Flax params; safetensors: the microsoft-aurora state dict (PyTorch names)",
    )
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-strict: parameters the checkpoint lacks start at their initial values",
    )
    parser.add_argument(
        "--model-kwargs",
        default="{}",
        help="JSON overrides of the preset's arguments, "
        'e.g. \'{"use_lora": true, "atmos_vars": ["z", "t"]}\'',
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import orbax.checkpoint as ocp

    out = Path(args.out).resolve()
    if args.orbax_ckpt:
        with ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(Path(args.orbax_ckpt).resolve())
    else:
        if not args.preset:
            parser.error("--pytorch-ckpt needs --preset")
        kwargs = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads(args.model_kwargs).items()
        }
        model = PRESETS[args.preset](**kwargs)
        params = convert_pytorch_checkpoint(args.pytorch_ckpt, model, strict=args.strict)
    if args.format == "safetensors":
        save_safetensors(params, out)
    else:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(out, params)
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    print(f"Wrote {n:,} parameters to {out} ({args.format})")


if __name__ == "__main__":
    main()
