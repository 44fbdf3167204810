"""The project installs and its packages import."""

import importlib

import pytest


@pytest.mark.parametrize("name", ["aurora", "trainers", "callbacks", "configs", "data_builders"])
def test_package_imports(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__doc__
