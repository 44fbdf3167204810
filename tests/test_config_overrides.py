"""Every sequence field of every shipped config can be overridden from the command line.

`ml_collections` overrides tuples but refuses lists ("Type <class 'list'> ... is not supported for
overriding"), so a list in a config means a config file has to be written to change it. This walks
each `configs/*.py`, finds every list or tuple (nested ConfigDicts included, e.g.
``data.builder_config.paths`` and ``data.builder_config.splits.train``), and parses
``--config=configs/X.py --config.<field>=<new tuple>`` with absl flags exactly as `main.py` does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py") if p.name != "__init__.py")


def sequence_fields(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple]:
    """`(dotted path, value)` of every list or tuple in `config`, recursively."""
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from sequence_fields(value, path + ".")
        elif isinstance(value, (list, tuple)):
            yield path, value


def changed(value: tuple) -> tuple:
    """A different tuple of the same kind of items (the override must be visible)."""
    return (*value, value[0]) if value else ("override",)


def lookup(config: ml_collections.ConfigDict, path: str) -> Any:
    for key in path.split("."):
        config = config[key]
    return config


def parse(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> ml_collections.ConfigDict:
    """`main.py`'s flag definition and parsing, on fresh flag values (the config flag reads its
    overrides from `sys.argv`, as under `app.run`)."""
    argv = ["main.py", *argv]
    monkeypatch.setattr(sys, "argv", argv)
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True)
    values(argv)
    return values.config


@pytest.mark.parametrize("name", CONFIGS)
def test_every_sequence_field_is_overridable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    config_file = f"configs/{name}"
    fields = dict(sequence_fields(parse([f"--config={config_file}"], monkeypatch)))
    lists = sorted(path for path, value in fields.items() if isinstance(value, list))
    assert not lists, f"{config_file}: make these tuples so the command line can override them"
    assert "data.builder_config.paths" in fields and "data.builder_config.splits.train" in fields
    assert "imports" in fields

    new = {path: changed(value) for path, value in fields.items()}
    overrides = [f"--config.{path}={value!r}" for path, value in new.items()]
    config = parse([f"--config={config_file}", *overrides], monkeypatch)
    for path, value in new.items():
        assert tuple(lookup(config, path)) == value, path
