"""Config names -> Python objects: a built-in by its short name, anything else by import path.

Every pluggable piece of a run (model, loss, optimiser, strategy, callback) is named in the config
the same way, so that a user's own piece needs no change to this package: a built-in's short name
(`"lat_mse"`), or `"package.module:name"` for any importable object (`"package.module.name"` also
works).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

__all__ = ["import_object", "resolve"]


def import_object(path: str) -> Any:
    """The object `path` names: `"package.module:name"` or `"package.module.name"`.

    Raises:
        ValueError: `path` names no module.
        ModuleNotFoundError: the module is not importable.
        AttributeError: the module has no such name.
    """
    module, _, name = path.partition(":")
    if not name:
        module, _, name = path.rpartition(".")
    if not module or not name:
        raise ValueError(f"{path!r} is not an import path: write 'package.module:name'.")
    return getattr(importlib.import_module(module), name)


def resolve(name: str, builtins: Mapping[str, Any], what: str) -> Any:
    """`builtins[name]`, or the object the import path `name` names.

    Args:
        name: a key of `builtins`, or an import path (it contains ":" or ".").
        builtins: the built-ins by short name.
        what: what is named, for the error (e.g. "config.loss.name").

    Raises:
        ValueError: `name` is neither a built-in nor an import path.
    """
    if name in builtins:
        return builtins[name]
    if ":" not in name and "." not in name:
        raise ValueError(
            f"Unknown {what} {name!r}: use one of {sorted(builtins)} or an import path "
            "'package.module:name'."
        )
    return import_object(name)
