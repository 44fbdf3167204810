"""Dataset builders by name, so configs can say ``dataset.name = "era5"``.

Two kinds of builder can be registered:

* a TFDS builder class (a `tfds.core.GeneratorBasedBuilder` subclass, normally of
  `data_builders.builders.WeatherBuilder`): ``get_builder(name, **config)`` returns
  ``cls(**config)``; build it with ``download_and_prepare()``, read it with
  ``as_data_source(split)``;
* a plain function ``fn(split, **config)`` returning a random-access data source -- a
  `data_builders.pipeline.WeatherSource` so the pipeline can use it directly.
  ``get_builder(name, **config)`` wraps it in a `FunctionBuilder` with the same two methods
  (``download_and_prepare()`` does nothing), so callers never care which kind they hold.

Registering::

    @register_builder("my_reanalysis")
    class MyReanalysis(WeatherBuilder): ...

    register_builder("in_memory", make_in_memory_source)   # a function

    source = load_source("era5", "train", data_dir=..., paths=[...])   # build if needed, open

``era5`` and ``hres`` (`data_builders.builders`) are registered on import.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import tensorflow_datasets as tfds

from data_builders.builders import Era5, Hres, patch_code_path

__all__ = [
    "FunctionBuilder",
    "UnknownBuilderError",
    "get_builder",
    "load_source",
    "register_builder",
    "registered_builders",
    "unregister_builder",
]

T = TypeVar("T")
_REGISTRY: dict[str, Any] = {}


class UnknownBuilderError(KeyError):
    """A config names a builder nobody registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclasses.dataclass
class FunctionBuilder:
    """A registered function seen through the builder interface (`as_data_source(split)`)."""

    name: str
    fn: Callable[..., Any]
    config: dict[str, Any]

    def download_and_prepare(self) -> None:
        """Nothing to prepare: the function reads (or makes) its data when called."""

    def as_data_source(self, split: str) -> Any:
        """The function's data source for `split`."""
        return self.fn(split=split, **self.config)


def register_builder(name: str, obj: T | None = None, *, overwrite: bool = False) -> Any:
    """Register a TFDS builder class or a source function under `name`.

    Used bare (``register_builder("x", obj)``) it returns `obj`; without `obj` it is a decorator.
    Registering a different object under a taken name needs ``overwrite=True`` (re-registering
    the same object, as a reloaded module does, is fine).
    """
    if obj is None:
        return lambda o: register_builder(name, o, overwrite=overwrite)
    _check_builder(name, obj)
    old = _REGISTRY.get(name)
    if old is not None and old is not obj and not overwrite:
        raise ValueError(f"builder name {name!r} is taken by {old!r}; pass overwrite=True")
    if inspect.isclass(obj):
        patch_code_path(obj)
    _REGISTRY[name] = obj
    return obj


def _check_builder(name: str, obj: Any) -> None:
    """Only TFDS builder classes and plain callables can build datasets."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"builder name must be a non-empty string, not {name!r}")
    if inspect.isclass(obj):
        if not issubclass(obj, tfds.core.DatasetBuilder):
            raise TypeError(f"{obj!r}: a registered class must subclass tfds.core.DatasetBuilder")
    elif not callable(obj):
        raise TypeError(f"{obj!r}: register a TFDS builder class or a function")


def unregister_builder(name: str) -> None:
    """Forget `name` (tests clean up after themselves with this)."""
    _REGISTRY.pop(name, None)


def registered_builders() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_builder(name: str, **config: Any) -> Any:
    """A builder instance for `name`, configured with `config` (see the module docstring)."""
    if name not in _REGISTRY:
        raise UnknownBuilderError(
            f"unknown dataset builder {name!r}; registered: {', '.join(registered_builders())}"
        )
    obj = _REGISTRY[name]
    if inspect.isclass(obj):
        return obj(**config)
    return FunctionBuilder(name=name, fn=obj, config=dict(config))


def load_source(name: str, split: str, *, prepare: bool = True, **config: Any) -> Any:
    """Builder `name` with `config`, built if needed (`prepare`), as a pipeline `WeatherSource`."""
    from data_builders.pipeline import open_source  # pipeline imports jax via aurora; keep lazy

    builder = get_builder(name, **config)
    if prepare:
        builder.download_and_prepare()
    return open_source(builder, split)


register_builder("era5", Era5)
register_builder("hres", Hres)
