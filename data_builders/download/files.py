"""The file conventions that make downloads resumable.

Data is written next to its target (``<target>.part``) and renamed into place only once complete,
so a final path exists only for finished data and a rerun can trust it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["part_path", "remove"]


def part_path(target: Path) -> Path:
    """Where `target` is written before it is complete: ``<target>.part``."""
    return target.with_name(target.name + ".part")


def remove(path: Path) -> None:
    """Delete a file, link or folder tree at `path`; nothing happens when there is none."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
