"""The per-user cache folder of this package (converted pretrained weights).

One folder per user and machine, outside any clone, so that every run and every clone reuses what
an earlier one computed: `$AURORA_JAX_CACHE` if set, else `$XDG_CACHE_HOME/aurora-jax`, else
`~/.cache/aurora-jax` (the XDG convention `huggingface_hub` and pip follow as well).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """The cache folder, or a sub-folder of it (not created).

    Args:
        *parts: Sub-folder names, e.g. `cache_dir("converted")`.

    Returns:
        The folder's path.
    """
    root = os.environ.get("AURORA_JAX_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "aurora-jax")
    return Path(root).joinpath(*parts)
