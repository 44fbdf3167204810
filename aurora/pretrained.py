"""Aurora's published weights in one call: download, convert once, load from a cache afterwards.

`from_pretrained("AuroraPretrained")` does what microsoft-aurora's
`AuroraPretrained().load_checkpoint()` does: each preset names its file in the Hugging Face Hub
repository `microsoft/aurora` and a pinned revision (the same as microsoft-aurora 2.0.1's), which
`huggingface_hub.hf_hub_download` fetches, so `HF_HOME`, `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
tokens behave as they do for every Hub user.

Converting the PyTorch pickle (5 GB for the 1.3 B models) is the slow part, so its result
(`aurora.convert.to_flax_names`, which does not depend on the model's variables) is kept as a
safetensors file in the per-user cache (`aurora.cache.cache_dir("converted")`), keyed by the
checkpoint's SHA-256 (the Hub's blob name when the file comes from a Hub cache, so nothing is
hashed), the converter's version and the two model arguments the renaming depends on. Every later
load reads that file and only fits it to the model (`aurora.convert.fit_params`), which also
applies `strict=False`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from aurora.cache import cache_dir
from aurora.convert import (
    CONVERTER_VERSION,
    FlatParams,
    fit_params,
    load_state_dict,
    to_flax_names,
)
from aurora.model.aurora import Aurora
from aurora.model.presets import PRESETS

__all__ = [
    "CHECKPOINTS",
    "HubCheckpoint",
    "download",
    "from_pretrained",
    "load_converted",
    "load_params",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubCheckpoint:
    """A file in a Hugging Face Hub repository at a pinned commit."""

    name: str
    revision: str
    repo: str = "microsoft/aurora"


_PINNED = "0be7e57c685dac86b78c4a19a3ab149d13c6a3dd"
CHECKPOINTS: dict[str, HubCheckpoint] = {
    "Aurora": HubCheckpoint("aurora-0.25-finetuned.ckpt", _PINNED),
    "AuroraPretrained": HubCheckpoint("aurora-0.25-pretrained.ckpt", _PINNED),
    "AuroraSmallPretrained": HubCheckpoint("aurora-0.25-small-pretrained.ckpt", _PINNED),
    "AuroraSmall": HubCheckpoint("aurora-0.25-small-pretrained.ckpt", _PINNED),
    "Aurora12hPretrained": HubCheckpoint(
        "aurora-0.25-12h-pretrained.ckpt", "15e76e47b65bf4b28fd2246b7b5b951d6e2443b9"
    ),
    "AuroraHighRes": HubCheckpoint("aurora-0.1-finetuned.ckpt", _PINNED),
    "AuroraAirPollution": HubCheckpoint(
        "aurora-0.4-air-pollution.ckpt", "1764d5630a53d3d7a7d169ca335236fc343e4bfc"
    ),
    "AuroraV1p5": HubCheckpoint(
        "aurora-0.25-v1.5.ckpt", "a96afd7ee6d65e3bd2d476f3be798a25a56f2296"
    ),
    "AuroraV1p5Ensemble": HubCheckpoint(
        "aurora-0.25-v1.5-ensemble.ckpt", "a96afd7ee6d65e3bd2d476f3be798a25a56f2296"
    ),
    "AuroraWave": HubCheckpoint(
        "aurora-0.25-wave.ckpt", "74598e8c65d53a96077c08bb91acdfa5525340c9"
    ),
}
"""Each preset's checkpoint, as microsoft-aurora 2.0.1's `default_checkpoint_name` and
`default_checkpoint_revision` name it."""


def download(
    preset: str, *, revision: str | None = None, repo: str | None = None, name: str | None = None
) -> Path:
    """The local path of `preset`'s checkpoint, downloaded by `huggingface_hub` if not cached.

    Args:
        preset: A key of `CHECKPOINTS`.
        revision: A commit, branch or tag instead of the pinned commit.
        repo: Another repository (`user/name`).
        name: Another file in the repository.

    Returns:
        The file in the Hub cache.
    """
    from huggingface_hub import hf_hub_download

    if preset not in CHECKPOINTS:
        raise KeyError(f"No published checkpoint for {preset!r}; presets: {sorted(CHECKPOINTS)}")
    default = CHECKPOINTS[preset]
    return Path(
        hf_hub_download(
            repo_id=repo or default.repo,
            filename=name or default.name,
            revision=revision or default.revision,
        )
    )


def _file_digest(path: Path) -> str:
    """The file's SHA-256: the blob's name in a Hub cache (the Hub names LFS blobs by it), else
    computed."""
    blob = path.resolve()
    if blob.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", blob.name):
        return blob.name
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache(path: Path) -> FlatParams:
    from safetensors.numpy import load_file

    return {tuple(k.split("/")): v for k, v in load_file(path).items()}


def _write_cache(flat: FlatParams, path: Path) -> None:
    """Write atomically, so a concurrent or interrupted run never sees half a file."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"/".join(k): np.ascontiguousarray(v) for k, v in flat.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_converted(
    checkpoint: str | Path,
    patch_size: int,
    max_history_size: int,
    *,
    cache: bool = True,
    adapt: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    layout: str = "aurora",
) -> FlatParams:
    """`to_flax_names` of a checkpoint file, from the conversion cache when it was done before.

    Args:
        checkpoint: A `.ckpt`/`.pt`, `.safetensors` or `.npz` state dict.
        patch_size: The model's patch size.
        max_history_size: The model's history length.
        cache: Read and write the per-user cache; False converts every time.
        adapt: A preset's own state-dict adaptation (`Aurora.adapt_state_dict`).
        layout: The name of `adapt`'s rules (`Aurora.checkpoint_layout`), part of the cache key.

    Returns:
        Flax path -> float32 array.
    """
    checkpoint = Path(checkpoint)
    if not cache:
        return to_flax_names(load_state_dict(checkpoint), patch_size, max_history_size, adapt=adapt)
    key = f"{_file_digest(checkpoint)}-v{CONVERTER_VERSION}-p{patch_size}-h{max_history_size}"
    if layout != "aurora":
        key += f"-{layout}"
    cached = cache_dir("converted") / f"{key}.safetensors"
    if cached.exists():
        log.info("Loading %s converted from %s", checkpoint.name, cached)
        return _read_cache(cached)
    log.info("Converting %s (once; cached as %s)", checkpoint, cached)
    flat = to_flax_names(load_state_dict(checkpoint), patch_size, max_history_size, adapt=adapt)
    _write_cache(flat, cached)
    return flat


def model_rules(model: Any) -> dict[str, Any]:
    """`load_converted`'s `adapt` and `layout` for `model` (a preset's own checkpoint rules)."""
    return {
        "adapt": getattr(model, "adapt_state_dict", None),
        "layout": getattr(model, "checkpoint_layout", "aurora"),
    }


def load_params(
    checkpoint: str | Path,
    model: Aurora,
    *,
    strict: bool = True,
    rng: jax.Array | int = 0,
    cache: bool = True,
) -> dict[str, Any]:
    """Flax `params` for `model` from a checkpoint file, through the conversion cache.

    Args:
        checkpoint: A microsoft-aurora `.ckpt`/`.pt`, `.safetensors` or `.npz` state dict.
        model: The module to fill.
        strict: False loads what the checkpoint has and initialises the rest
            (`aurora.convert.fit_params`); the report is logged.
        rng: PRNG key or seed of the parameters that are created.
        cache: Use the per-user conversion cache.

    Returns:
        The nested Flax `params` (numpy arrays).
    """
    flat = load_converted(
        checkpoint, model.patch_size, model.max_history_size, cache=cache, **model_rules(model)
    )
    params, report = fit_params(flat, model, strict=strict, rng=rng)
    if not strict:
        log.info("Non-strict load of %s. %s", Path(checkpoint).name, report.summary())
    return params


def from_pretrained(
    preset: str = "AuroraPretrained",
    *,
    revision: str | None = None,
    repo: str | None = None,
    name: str | None = None,
    strict: bool = True,
    rng: jax.Array | int = 0,
    cache: bool = True,
    **model_kwargs: Any,
) -> tuple[Aurora, dict[str, Any]]:
    """A preset and its published weights: `model, params = from_pretrained("AuroraPretrained")`.

    Args:
        preset: A microsoft-aurora preset name (`CHECKPOINTS`).
        revision: A Hub revision instead of the pinned one.
        repo: Another Hub repository.
        name: Another file in the repository.
        strict: False allows a model that differs from the checkpoint (new variables, LoRA
            adapters): see `aurora.convert.fit_params`.
        rng: PRNG key or seed of parameters the checkpoint lacks (`strict=False`).
        cache: Use the per-user conversion cache.
        **model_kwargs: Overrides of the preset's arguments, e.g. `surf_vars=(..., "tp")`.

    Returns:
        The module and its `params` (numpy arrays): `model.apply({"params": params}, batch)`.
    """
    if preset not in PRESETS:
        raise KeyError(f"Unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    model = PRESETS[preset](**model_kwargs)
    path = download(preset, revision=revision, repo=repo, name=name)
    return model, load_params(path, model, strict=strict, rng=rng, cache=cache)
