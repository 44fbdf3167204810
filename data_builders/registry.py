"""Dataset builders by name, so configs can say ``data.builder = "era5"``.

Three kinds of builder can be registered:

* a TFDS builder class (a `tfds.core.DatasetBuilder` subclass, normally of
  `data_builders.builders.WeatherBuilder`): ``get_builder(name, **config)`` returns
  ``cls(**config)``; build it with ``download_and_prepare()``, read it with
  ``as_data_source(split)``;
* any other class following the `SourceBuilder` protocol (``download_and_prepare()``,
  ``as_data_source(split)``, ``splits``, ``stats()``), e.g. a streaming reader that builds
  nothing;
* a plain function ``fn(split, **config)`` returning a `data_builders.pipeline.WeatherSource`.
  ``get_builder(name, **config)`` wraps it in a `FunctionBuilder`, which follows the protocol
  too (``download_and_prepare()`` does nothing), so callers never care which kind they hold.

Functions and non-TFDS classes get only the keyword arguments their signature names (all of
them if it takes ``**kwargs``): a config's ``data_dir`` or ``paths`` reach them only if they ask.
`builder_splits` and `builder_stats` read the splits and statistics of any kind of builder.

Registering::

    @register_builder("my_reanalysis")
    class MyReanalysis(WeatherBuilder): ...

    register_builder("in_memory", make_in_memory_source, splits=("train", "validation"))

    source = load_source("era5", "train", data_dir=..., paths=[...])   # build if needed, open

Registering again under a taken name replaces the old entry when both have the same qualified
name (module and qualname), which is what re-running a notebook cell or reloading a module does;
anything else needs ``overwrite=True``. ``era5`` and ``hres`` (`data_builders.builders`) are
registered on import.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import tensorflow_datasets as tfds

from data_builders.builders import Era5, Hres, patch_code_path

if TYPE_CHECKING:
    from data_builders.pipeline import WeatherSource

__all__ = [
    "FunctionBuilder",
    "SourceBuilder",
    "UnknownBuilderError",
    "builder_splits",
    "builder_stats",
    "get_builder",
    "load_source",
    "register_builder",
    "registered_builders",
    "unregister_builder",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
_REGISTRY: dict[str, Any] = {}
_SPLITS: dict[str, tuple[str, ...]] = {}  # splits declared when registering a function
CANDIDATE_SPLITS = ("train", "validation", "test")
"""The splits a function registered without ``splits=`` is asked for (see `FunctionBuilder`)."""


@runtime_checkable
class SourceBuilder(Protocol):
    """What a registered builder that is not a TFDS builder must offer.

    ``download_and_prepare()`` is called once before reading, and in a multi-host run by process
    0 only: the other processes create their builder after it has returned (they wait at a
    barrier), so they must be able to read what it prepared without calling it themselves.
    """

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names the builder can serve (an attribute works too)."""
        ...

    def download_and_prepare(self) -> None:
        """Build or fetch whatever `as_data_source` needs; nothing when there is nothing."""
        ...

    def as_data_source(self, split: str) -> WeatherSource:
        """The split's random-access `WeatherSource`."""
        ...

    def stats(self) -> Mapping[str, tuple[float, float]]:
        """``{"r_500": (mean, std), ...}`` for variables outside Aurora's normalisation table."""
        ...


class UnknownBuilderError(KeyError):
    """A config names a builder nobody registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


@dataclasses.dataclass
class FunctionBuilder:
    """A registered function seen through the `SourceBuilder` protocol.

    The function is called once per split and its source kept. Its splits are those declared
    with ``register_builder(..., splits=...)``; else the keys of a ``splits`` mapping it is
    configured with; else those of `CANDIDATE_SPLITS` it returns a source for (a function says
    it lacks a split by raising `KeyError`). Its statistics are the ``stats`` of its training
    split's source (the first split's when there is no ``"train"``).
    """

    name: str
    fn: Callable[..., Any]
    config: dict[str, Any]
    declared_splits: tuple[str, ...] | None = None
    _sources: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    _discovered: tuple[str, ...] | None = dataclasses.field(default=None, repr=False)

    def download_and_prepare(self) -> None:
        """Nothing to prepare: the function reads (or makes) its data when called."""

    def as_data_source(self, split: str) -> Any:
        """The function's data source for `split` (computed once)."""
        if split not in self._sources:
            self._sources[split] = self.fn(split=split, **self.config)
        return self._sources[split]

    @property
    def splits(self) -> tuple[str, ...]:
        """The split names (see the class docstring for where they come from)."""
        if self.declared_splits is not None:
            return self.declared_splits
        configured = self.config.get("splits")
        if isinstance(configured, Mapping):
            return tuple(str(k) for k in configured)
        if self._discovered is None:
            self._discovered = tuple(s for s in CANDIDATE_SPLITS if self._has_split(s))
        return self._discovered

    def _has_split(self, split: str) -> bool:
        try:
            self.as_data_source(split)
        except KeyError:
            return False
        return True

    def stats(self) -> dict[str, tuple[float, float]]:
        """The ``stats`` of the training split's source (empty when the source has none)."""
        splits = self.splits
        if not splits:
            raise KeyError(f"function builder {self.name!r} returned no source for any split")
        split = "train" if "train" in splits else splits[0]
        return dict(getattr(self.as_data_source(split), "stats", None) or {})


def register_builder(
    name: str,
    obj: T | None = None,
    *,
    overwrite: bool = False,
    splits: Sequence[str] | None = None,
) -> Any:
    """Register a TFDS builder class, a `SourceBuilder` class or a source function as `name`.

    Args:
        name: The name configs use (``config.data.builder``).
        obj: The class or function; without it this returns a decorator.
        overwrite: Replace whatever is registered as `name`. Not needed to replace an object
            of the same module and qualified name (a re-run notebook cell, a reloaded module).
        splits: For a function only: its split names, so they need not be discovered by calling
            it (see `FunctionBuilder`).

    Returns:
        `obj` (or, without `obj`, a decorator registering and returning its argument).

    Raises:
        ValueError: If `name` is taken by another object and `overwrite` is False.
        TypeError: If `obj` cannot build datasets, or `splits` is given for a class.
    """
    if obj is None:
        return lambda o: register_builder(name, o, overwrite=overwrite, splits=splits)
    _check_builder(name, obj)
    if splits is not None and inspect.isclass(obj):
        raise TypeError(f"{obj!r}: splits= is for functions; a class has a `splits` attribute")
    old = _REGISTRY.get(name)
    if old is not None and old is not obj and not overwrite and not _same_definition(old, obj):
        raise ValueError(f"builder name {name!r} is taken by {old!r}; pass overwrite=True")
    if inspect.isclass(obj) and issubclass(obj, tfds.core.DatasetBuilder):
        patch_code_path(obj)
    _REGISTRY[name] = obj
    _SPLITS.pop(name, None)
    if splits is not None:
        _SPLITS[name] = tuple(str(s) for s in splits)
    return obj


def _same_definition(old: Any, new: Any) -> bool:
    """Whether `new` is a re-definition of `old`: same module and qualified name."""
    qualname = getattr(new, "__qualname__", None)
    return (
        qualname is not None
        and "<lambda>" not in qualname
        and getattr(old, "__qualname__", None) == qualname
        and getattr(old, "__module__", None) == getattr(new, "__module__", None)
    )


_PROTOCOL_METHODS = ("download_and_prepare", "as_data_source", "stats")


def _check_builder(name: str, obj: Any) -> None:
    """Only TFDS builder classes, `SourceBuilder` classes and functions can build datasets."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"builder name must be a non-empty string, not {name!r}")
    if inspect.isclass(obj):
        if issubclass(obj, tfds.core.DatasetBuilder):
            return
        missing = [m for m in _PROTOCOL_METHODS if not callable(getattr(obj, m, None))]
        if missing:
            raise TypeError(
                f"{obj!r}: a registered class must subclass tfds.core.DatasetBuilder or follow "
                f"data_builders.registry.SourceBuilder; it lacks {missing}"
            )
    elif not callable(obj):
        raise TypeError(f"{obj!r}: register a TFDS builder class, a SourceBuilder or a function")


def unregister_builder(name: str) -> None:
    """Forget `name` (tests clean up after themselves with this)."""
    _REGISTRY.pop(name, None)
    _SPLITS.pop(name, None)


def registered_builders() -> list[str]:
    """The registered names and the built-in ones not imported yet, sorted."""
    return sorted(set(_REGISTRY) | set(_BUILT_IN_MODULES))


def _accepted_kwargs(name: str, obj: Callable[..., Any], config: dict[str, Any]) -> dict[str, Any]:
    """The items of `config` that `obj`'s signature names (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass everything
        return dict(config)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(config)
    names = {
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    dropped = sorted(set(config) - names)
    if dropped:
        log.info("builder %r does not take %s; not passed", name, dropped)
    return {k: v for k, v in config.items() if k in names}


def get_builder(name: str, **config: Any) -> Any:
    """A builder instance for `name`, configured with `config` (see the module docstring).

    Args:
        name: A registered name.
        **config: Builder options. A TFDS builder class gets all of them; a function or a
            `SourceBuilder` class only those its signature names (all if it takes **kwargs).

    Returns:
        The TFDS builder, `SourceBuilder` instance or `FunctionBuilder`.

    Raises:
        UnknownBuilderError: If nothing is registered as `name`.
        TypeError: If a `SourceBuilder` class's instance has no ``splits``.
    """
    if name not in _REGISTRY and name in _BUILT_IN_MODULES:
        importlib.import_module(_BUILT_IN_MODULES[name])  # registers `name` on import
    if name not in _REGISTRY:
        raise UnknownBuilderError(
            f"unknown dataset builder {name!r}; registered: {', '.join(registered_builders())}"
        )
    obj = _REGISTRY[name]
    if inspect.isclass(obj) and issubclass(obj, tfds.core.DatasetBuilder):
        return obj(**config)
    kwargs = _accepted_kwargs(name, obj, config)
    if inspect.isclass(obj):
        builder = obj(**kwargs)
        # getattr_static: reading a `splits` property may need download_and_prepare() first.
        if inspect.getattr_static(builder, "splits", None) is None:
            raise TypeError(f"{obj!r}: its instances need a `splits` tuple (SourceBuilder)")
        return builder
    kwargs.pop("split", None)  # the split is given per call
    return FunctionBuilder(name=name, fn=obj, config=kwargs, declared_splits=_SPLITS.get(name))


def builder_splits(builder: Any) -> tuple[str, ...]:
    """The split names of a prepared builder of any kind.

    Args:
        builder: A TFDS builder (its ``info.splits``, so it must be built) or a `SourceBuilder`.

    Returns:
        The split names.
    """
    if isinstance(builder, tfds.core.DatasetBuilder):
        return tuple(builder.info.splits.keys())
    return tuple(builder.splits)


def builder_stats(builder: Any) -> dict[str, tuple[float, float]]:
    """The dataset statistics of a prepared builder of any kind.

    Args:
        builder: A TFDS builder (its ``stats()`` if it has one, as `WeatherBuilder` does) or a
            `SourceBuilder`.

    Returns:
        ``{"r_500": (mean, std), ...}``; empty for a TFDS builder without ``stats()``.
    """
    stats = getattr(builder, "stats", None)
    if stats is None and isinstance(builder, tfds.core.DatasetBuilder):
        return {}
    return {k: (float(m), float(s)) for k, (m, s) in dict(stats()).items()}


def load_source(name: str, split: str, *, prepare: bool = True, **config: Any) -> Any:
    """Builder `name` with `config`, built if needed (`prepare`), as a pipeline `WeatherSource`."""
    from data_builders.pipeline import open_source  # pipeline imports jax via aurora; keep lazy

    builder = get_builder(name, **config)
    if prepare:
        builder.download_and_prepare()
    return open_source(builder, split)


register_builder("era5", Era5)
register_builder("hres", Hres)

# Built-in builders in modules that import this one (so they cannot be imported here): each is
# imported, and so registered, the first time its name is asked for.
_BUILT_IN_MODULES = {"zarr": "data_builders.zarr_source"}
