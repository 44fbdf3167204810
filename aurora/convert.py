"""PyTorch (microsoft-aurora) state dicts <-> Flax params, by name.

The Flax modules are named after the PyTorch ones, so the mapping is a rule, not a table:

* a numeric path segment joins the previous one: `blocks.1` -> `blocks_1`, `layers.0.1` ->
  `layers_0_1`, `time_mlp.0` -> `time_mlp_0`;
* `Linear.weight` `(out, in)` -> `kernel` `(in, out)`; `LayerNorm.weight` -> `scale`;
* LoRA adapters `lora_qkv.loras.{i}.lora_A` are stacked along a leading axis: `lora_qkv/lora_A[i]`;
* patch-embedding kernels `weights.{var}` keep PyTorch's Conv3d layout.

Conversion is strict: every source key is used once, every Flax parameter is filled, shapes must
match, and the error lists everything missing, extra or mis-shaped. Published checkpoints are
accepted as microsoft-aurora's `load_checkpoint` accepts them: the `net.` prefix and the older
ID-based embedding/head keys are adapted, and a checkpoint with a shorter history is zero-padded.
PyTorch itself is not needed (`load_state_dict`); `main` is the command line.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from aurora.torch_checkpoint import load_torch_checkpoint
from aurora.variables import ATMOS_VARS, STATIC_VARS, SURF_VARS

__all__ = [
    "ConversionError",
    "adapt_checkpoint",
    "convert_pytorch_checkpoint",
    "load_state_dict",
    "main",
    "param_shapes",
    "to_pytorch_state_dict",
]

_LORA = re.compile(r"^(.*)\.loras\.(\d+)\.(lora_[AB])$")
_VAR_CONTAINERS = {"weights", "surf_heads", "atmos_heads"}  # children are variable names


class ConversionError(ValueError):
    """A state dict does not fit the model; the message lists every discrepancy."""


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch `.ckpt`/`.pt` or a `.npz` state dict as float32 numpy arrays.

    PyTorch files are read by :mod:`aurora.torch_checkpoint`, without PyTorch and as safely as
    `torch.load(weights_only=True)`: only tensor-rebuilding globals are allowed. A Lightning-style
    checkpoint's `"state_dict"` entry is unwrapped.

    Args:
        path: A `.ckpt`/`.pt` file or a `.npz` archive.

    Returns:
        Key -> float32 array (`.npz` arrays keep their dtype).
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    state = load_torch_checkpoint(path, float32=True)
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return {k: np.asarray(v) for k, v in state.items()}


def adapt_checkpoint(
    state: Mapping[str, np.ndarray], patch_size: int, max_history_size: int
) -> dict[str, np.ndarray]:
    """Bring a published checkpoint to the current key layout (what `load_checkpoint` does).

    Strips the `net.` prefix, splits the older single embedding and head matrices into one entry
    per variable (in the default variable order, `aurora.variables`) and zero-pads the history
    axis of embedding kernels up to `max_history_size`.

    Args:
        state: A microsoft-aurora state dict.
        patch_size: The model's patch size.
        max_history_size: The model's history length.

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
            weight = d.pop(f"{key}.weight").reshape(patch_size**2, len(names), -1)
            bias = d.pop(f"{key}.bias").reshape(patch_size**2, len(names))
            for i, name in enumerate(names):
                d[f"{prefix}.{name}.weight"] = weight[:, i]
                d[f"{prefix}.{name}.bias"] = bias[:, i]

    split_columns(
        "encoder.surf_token_embeds.weight",
        SURF_VARS + STATIC_VARS,
        "encoder.surf_token_embeds.weights",
    )
    split_columns(
        "encoder.atmos_token_embeds.weight", ATMOS_VARS, "encoder.atmos_token_embeds.weights"
    )
    split_head("decoder.surf_head", SURF_VARS, "decoder.surf_heads")
    split_head("decoder.atmos_head", ATMOS_VARS, "decoder.atmos_heads")

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
        surf_vars={
            v: np.zeros((1, model.max_history_size, h, w), np.float32) for v in model.surf_vars
        },
        static_vars={v: np.zeros((h, w), np.float32) for v in model.static_vars},
        atmos_vars={
            v: np.zeros((1, model.max_history_size, 1, h, w), np.float32) for v in model.atmos_vars
        },
        metadata=Metadata(
            lat=np.linspace(80, -80, h),
            lon=np.linspace(0, 360, w, endpoint=False),
            time=np.zeros((1,), np.int32),
            atmos_levels=(500,),
        ),
    )


def convert_pytorch_checkpoint(
    source: str | Path | Mapping[str, Any], model: Any
) -> dict[str, Any]:
    """A microsoft-aurora state dict (path or mapping) -> Flax `params` for `model`.

    Args:
        source: A checkpoint path (see `load_state_dict`) or a state dict.
        model: The `aurora.Aurora` module to fill.

    Returns:
        The nested Flax `params` dict, numpy arrays.

    Raises:
        ConversionError: listing keys without a target, parameters without a source, and shape
            mismatches.
    """
    state = (
        load_state_dict(source)
        if isinstance(source, (str, Path))
        else {
            k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
            for k, v in source.items()
        }
    )
    state = adapt_checkpoint(state, model.patch_size, model.max_history_size)
    targets = param_shapes(model, _example_batch(model))

    filled: dict[tuple[str, ...], np.ndarray] = {}
    lora_parts: dict[tuple[str, ...], dict[int, np.ndarray]] = {}
    extra, wrong_shape = [], []
    for key, value in state.items():
        lora = _LORA.match(key)
        if lora:
            path, _ = _flax_path(f"{lora.group(1)}.{lora.group(3)}", 0)
            lora_parts.setdefault(path, {})[int(lora.group(2))] = value
            continue
        path, transpose = _flax_path(key, value.ndim)
        if path not in targets:
            extra.append(key)
            continue
        filled[path] = value.T if transpose else value

    for path, parts in lora_parts.items():
        if path not in targets or sorted(parts) != list(range(len(parts))):
            extra.extend(f"{'.'.join(path)}[{i}]" for i in sorted(parts))
            continue
        filled[path] = np.stack([parts[i] for i in range(len(parts))])

    for path, value in filled.items():
        if tuple(value.shape) != targets[path]:
            wrong_shape.append(
                f"{'/'.join(path)}: checkpoint {tuple(value.shape)}, model {targets[path]}"
            )
    missing = sorted("/".join(p) for p in targets if p not in filled)
    if extra or missing or wrong_shape:
        lines = ["The state dict does not match the model."]
        for title, items in (
            ("Unused checkpoint keys", extra),
            ("Parameters not filled", missing),
            ("Shape mismatches", wrong_shape),
        ):
            if items:
                lines.append(
                    f"{title} ({len(items)}): "
                    + ", ".join(sorted(items)[:50])
                    + (" ..." if len(items) > 50 else "")
                )
        raise ConversionError("\n".join(lines))
    return traverse_util.unflatten_dict(
        {k: np.asarray(v, dtype=np.float32) for k, v in filled.items()}
    )


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
        segments: list[str] = []
        for i, part in enumerate(path[:-1]):
            if i > 0 and path[i - 1] in _VAR_CONTAINERS:
                segments.append(part)  # a variable name, never split
            else:
                segments.extend(re.sub(r"_(\d+)(?=(_\d+)*$)", r".\1", part).split("."))
        prefix = ".".join(segments)
        leaf = path[-1]
        if leaf in ("lora_A", "lora_B"):
            for i, adapter in enumerate(value):
                out[f"{prefix}.loras.{i}.{leaf}"] = adapter
        elif leaf == "kernel":
            out[f"{prefix}.weight"] = value.T
        elif leaf == "scale":
            out[f"{prefix}.weight"] = value
        else:
            out[f"{prefix}.{leaf}"] = value
    return out


def main(argv: list[str] | None = None) -> None:
    """The `python -m aurora.convert` command line: a PyTorch checkpoint to an Orbax folder::

        python -m aurora.convert --pytorch-ckpt aurora-0.25-small-pretrained.ckpt \
            --preset AuroraSmallPretrained --out checkpoints/aurora-small

    Args:
        argv: Arguments; None reads `sys.argv`.
    """
    from aurora.model.aurora import PRESETS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pytorch-ckpt", required=True, help="microsoft-aurora .ckpt/.pt or .npz state dict"
    )
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS), help="model preset")
    parser.add_argument("--out", required=True, help="output folder for the Orbax checkpoint")
    parser.add_argument(
        "--model-kwargs",
        default="{}",
        help="JSON overrides of the preset's arguments, "
        'e.g. \'{"use_lora": true, "atmos_vars": ["z", "t"]}\'',
    )
    args = parser.parse_args(argv)

    import orbax.checkpoint as ocp

    kwargs = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.model_kwargs).items()
    }
    model = PRESETS[args.preset](**kwargs)
    params = convert_pytorch_checkpoint(args.pytorch_ckpt, model)
    out = Path(args.out).resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out, params)
    n = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(params))
    print(f"Wrote {n:,} parameters of {args.preset} to {out}")


if __name__ == "__main__":
    main()
