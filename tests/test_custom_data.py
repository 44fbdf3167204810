"""Bringing your own data, as a new user does: docs/datasets.md's snippet, notebook re-runs,
function and `SourceBuilder` builders, `config.imports`, the multi-host build guard, and a run of
`main.py` on a builder registered in a file outside the library.
"""

from __future__ import annotations

import csv
import re
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from configs import demo
from data_builders import registry
from data_builders.builders import WeatherBuilder
from data_builders.pipeline import WeatherSource
from data_builders.registry import (
    builder_splits,
    builder_stats,
    get_builder,
    register_builder,
    unregister_builder,
)
from tests.helpers import run_main
from trainers import run as run_module

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600


def docs_snippet() -> str:
    """The python block of docs/datasets.md that registers builders."""
    text = (ROOT / "docs" / "datasets.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "register_builder" in b]
    assert len(blocks) == 1, "docs/datasets.md should have one registration snippet"
    return blocks[0]


def tiny_source(split: str, n_times: int = 6) -> WeatherSource:
    """A synthetic in-memory split: one surface variable on a 5 x 8 grid."""
    base = 1_600_000_000 if split == "train" else 1_700_000_000
    times = base + np.arange(n_times) * 6 * HOUR
    records = [
        {"time": int(t), "surf": {"2t": np.full((5, 8), 250.0 + i, np.float32)}, "atmos": {}}
        for i, t in enumerate(times)
    ]
    return WeatherSource(
        records=records,
        lat=np.linspace(90, -90, 5),
        lon=np.arange(8) * 45.0,
        times=times,
        stats={"2t": (250.0, 2.0)} if split == "train" else {"2t": (0.0, 1.0)},
        name=f"tiny/{split}",
    )


@pytest.fixture()
def cleanup():
    """Names registered by a test, unregistered after it."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_builder(name)


def test_docs_snippet_runs_verbatim_and_again(monkeypatch, capsys, cleanup) -> None:
    monkeypatch.chdir(ROOT)
    cleanup += ["my_reanalysis", "my_in_memory"]
    code = compile(docs_snippet(), "docs/datasets.md", "exec")
    for _ in range(2):  # a notebook cell run twice
        exec(code, {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert out.count("('train', 'validation')") == 2 and out.count("4 validation times") == 2


def test_redefining_a_builder_class_replaces_it(cleanup) -> None:
    cleanup.append("test_redefined")
    source = textwrap.dedent(
        """
        from data_builders.builders import WeatherBuilder
        from data_builders.registry import register_builder

        @register_builder("test_redefined")
        class Redefined(WeatherBuilder):
            DEFAULTS = {"levels": (500,)}
        """
    )
    first, second = {"__name__": "notebook"}, {"__name__": "notebook"}
    exec(source, first)
    exec(source, second)  # TFDS's own registry must not say "already registered"
    assert registry._REGISTRY["test_redefined"] is second["Redefined"]
    assert second["Redefined"] is not first["Redefined"]
    other = type("Other", (WeatherBuilder,), {})
    with pytest.raises(ValueError, match="taken"):
        register_builder("test_redefined", other)
    assert register_builder("test_redefined", other, overwrite=True) is other


def test_function_builder_gets_only_its_arguments_and_keeps_splits_and_stats(cleanup) -> None:
    calls = []

    def from_files(split: str, paths: tuple[str, ...]) -> WeatherSource:
        calls.append((split, paths))
        return {"train": tiny_source, "validation": tiny_source}[split](split)  # KeyError: test

    cleanup += ["test_fn", "test_fn_declared"]
    register_builder("test_fn", from_files)
    builder = get_builder("test_fn", paths=("a.nc",), data_dir="/nowhere", levels=(500,))
    assert builder.config == {"paths": ("a.nc",)}, "data_dir and levels are not its arguments"
    assert builder_splits(builder) == ("train", "validation")
    assert builder_stats(builder) == {"2t": (250.0, 2.0)}, "the training split's statistics"
    assert [c[0] for c in calls] == ["train", "validation", "test"], "each split read once"

    register_builder("test_fn_declared", from_files, splits=("train",))
    assert get_builder("test_fn_declared", paths=()).splits == ("train",)

    def configured(split: str, splits: dict) -> WeatherSource:
        raise AssertionError("not called to find its splits")

    cleanup.append("test_fn_configured")
    register_builder("test_fn_configured", configured)
    ranges = {"train": ("2020-01-01", "2020-06-30"), "test": ("2020-07-01", None)}
    assert get_builder("test_fn_configured", splits=ranges).splits == ("train", "test")

    # Through build_data, as a config uses it: validation kept, statistics passed on.
    config = demo.get_config()
    config.data.builder = "test_fn"
    config.data.num_threads = 0
    data = run_module.build_data(config, Path("/nonexistent-workdir"), rollout_steps=1)
    assert set(data) == {"stats", "train", "validation"}
    assert data["stats"] == {"2t": (250.0, 2.0)}
    assert data["validation"].source.name == "tiny/validation"


class Streaming:
    """A `SourceBuilder` class that is not a TFDS builder (what a streaming reader looks like)."""

    splits = ("train", "validation")

    def __init__(self, paths: tuple[str, ...] = ()) -> None:
        self.paths = paths

    def download_and_prepare(self) -> None:
        pass

    def as_data_source(self, split: str) -> WeatherSource:
        return tiny_source(split)

    def stats(self) -> dict[str, tuple[float, float]]:
        return {"2t": (1.0, 2.0)}


def test_source_builder_classes(cleanup) -> None:
    cleanup += ["test_streaming", "test_no_splits"]
    register_builder("test_streaming", Streaming)
    builder = get_builder("test_streaming", paths=("x.zarr",), data_dir="/nowhere")
    assert isinstance(builder, registry.SourceBuilder) and builder.paths == ("x.zarr",)
    assert builder_splits(builder) == ("train", "validation")
    assert builder_stats(builder) == {"2t": (1.0, 2.0)}

    class NoStats:
        def download_and_prepare(self) -> None: ...

        def as_data_source(self, split: str) -> None: ...

    with pytest.raises(TypeError, match=r"lacks \['stats'\]"):
        register_builder("test_bad", NoStats)

    class NoSplits(NoStats):
        def stats(self) -> dict:
            return {}

    register_builder("test_no_splits", NoSplits)
    with pytest.raises(TypeError, match="splits"):
        get_builder("test_no_splits")


def test_multi_host_process_0_builds_and_the_others_wait(monkeypatch, cleanup) -> None:
    events: list[str] = []

    class Recorder(Streaming):
        def __init__(self) -> None:
            events.append("create")

        def download_and_prepare(self) -> None:
            events.append("prepare")

    cleanup.append("test_recorder")
    register_builder("test_recorder", Recorder)
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: events.append("wait"))

    def order(process: int, count: int) -> list[str]:
        monkeypatch.setattr(jax, "process_count", lambda: count)
        monkeypatch.setattr(jax, "process_index", lambda: process)
        events.clear()
        run_module._prepared_builder("test_recorder", {"data_dir": "/shared"})
        return list(events)

    assert order(0, 1) == ["create", "prepare"], "one process: no barrier"
    assert order(0, 2) == ["create", "prepare", "wait"]
    assert order(1, 2) == ["wait", "create"], "the others open what process 0 built"

    def fail() -> None:
        events.append("prepare")
        raise OSError("disk full")

    monkeypatch.setattr(Recorder, "download_and_prepare", lambda self: fail())
    with pytest.raises(OSError, match="disk full"):
        order(0, 2)
    assert events == ["create", "prepare", "wait"], "a failed build still releases the others"


def test_config_imports_load_files_without_sys_path(tmp_path, cleanup) -> None:
    module = tmp_path / "user_builders_for_test.py"
    module.write_text(
        "from data_builders.registry import register_builder\n"
        "register_builder('test_from_file', lambda split: None)\n"
    )
    cleanup.append("test_from_file")
    try:
        (loaded,) = run_module.import_modules((str(module),))
        assert "test_from_file" in registry.registered_builders()
        assert run_module.import_modules([str(module)]) == [loaded], "imported once"
        assert str(tmp_path) not in sys.path
    finally:
        sys.modules.pop("user_builders_for_test", None)
    with pytest.raises(ModuleNotFoundError, match="PYTHONPATH"):
        run_module.import_modules(("no_such_package.builders",))
    with pytest.raises(FileNotFoundError):
        run_module.import_modules((str(tmp_path / "missing.py"),))


USER_MODULE = '''\
"""A user's builder, outside the library: the bundled HRES sample read straight into memory."""

from pathlib import Path

import numpy as np

from data_builders.pipeline import WeatherSource
from data_builders.readers import open_dataset
from data_builders.registry import register_builder

SPLITS = {
    "train": slice("2024-06-03T00", "2024-06-03T18"),
    "validation": slice("2024-06-04T00", "2024-06-04T18"),
}
CALLS = Path(__file__).with_name("calls.txt")


@register_builder("user_sample")
def user_sample(split, paths, atmos_vars, levels):
    window = SPLITS[split]  # KeyError: no such split
    with CALLS.open("a") as f:
        f.write(split + "\\n")
    ds = open_dataset(paths, variables=list(atmos_vars), levels=levels, time=window)
    atmos = {k: ds[k].values for k in atmos_vars}
    times = ds.time.values.astype("datetime64[s]").astype(np.int64)
    shape = (ds.latitude.size, ds.longitude.size)
    return WeatherSource(
        records=[
            {"time": int(t), "surf": {}, "atmos": {k: v[i] for k, v in atmos.items()}}
            for i, t in enumerate(times)
        ],
        lat=ds.latitude.values,
        lon=ds.longitude.values,
        levels=tuple(ds.level.values),
        times=times,
        static={"lsm": np.zeros(shape, np.float32), "z": np.zeros(shape, np.float32)},
        stats={
            f"{k}_{level:g}": (float(v[:, j].mean()), float(v[:, j].std()))
            for k, v in atmos.items()
            for j, level in enumerate(ds.level.values)
        },
        name=f"user_sample/{split}",
    )
'''


@pytest.mark.slow  # CI time
def test_main_trains_on_a_builder_registered_outside_the_library(tmp_path) -> None:
    module = tmp_path / "my_builders.py"
    module.write_text(USER_MODULE)
    workdir = tmp_path / "run"
    run_main(
        f"--config={ROOT / 'configs' / 'demo.py'}",
        f"--workdir={workdir}",
        f"--config.imports=({str(module)!r},)",
        "--config.data.builder=user_sample",
        "--config.trainer.max_steps=2",
        "--config.trainer.val_check_interval=2",
        "--config.trainer.log_every_n_steps=1",
        "--config.callbacks.checkpoint.every_n_steps=2",
        cwd=tmp_path,  # neither the repository nor the module's folder is the working directory
    )
    assert (workdir / "checkpoints" / "2").is_dir()
    with open(workdir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows if r["tag"] == "train/loss"}) == [1, 2]
    assert any(r["tag"] == "val/loss" and float(r["value"]) > 0 for r in rows)
    calls = (tmp_path / "calls.txt").read_text().split()
    assert "validation" in calls and "train" in calls
    assert not (workdir / "datasets").exists(), "nothing was built for a function builder"
