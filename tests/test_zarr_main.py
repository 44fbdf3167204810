"""`main.py` trains from a zarr store, local and over a loopback HTTP server, with no copy.

The store is shaped like WeatherBench2's (long names, ascending latitude, one time per chunk;
see tests/test_zarr_source.py). The builder is found by name (`zarr`) without importing its
module first, as a config on the command line would find it.
"""

from __future__ import annotations

import csv
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_main
from tests.test_zarr_source import LAT, _dataset, _write

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
import ml_collections

from configs import demo


def get_config():
    config = demo.get_config()
    config.data.builder = "zarr"
    config.data.builder_config = ml_collections.ConfigDict({{
        "url": {url!r},
        "data_dir": "",
        "surf_vars": ("2t", "msl"),
        "atmos_vars": ("z", "t", "r"),
        "static_vars": ("lsm", "z"),
        "levels": (500, 850),
        "splits": {{
            "train": ("2020-01-01", "2020-01-02T18"),
            "validation": ("2020-01-03", "2020-01-03T18"),
        }},
    }})
    config.model.kwargs.surf_vars = ("2t", "msl")
    config.model.kwargs.atmos_vars = ("z", "t", "r")
    config.model.kwargs.window_size = (2, 2, 4)
    config.loss.surf_weights = ml_collections.ConfigDict({{"2t": 3.5, "msl": 1.6}})
    config.loss.atmos_weights = ml_collections.ConfigDict({{"z": 3.5, "t": 1.7, "r": 0.8}})
    config.strategy.steps = 1
    config.trainer.max_steps = 2
    config.trainer.val_check_interval = 2
    config.trainer.log_every_n_steps = 1
    config.callbacks.checkpoint.every_n_steps = 2
    return config
"""


@pytest.fixture
def store(tmp_path: Path) -> Path:
    times = np.arange("2020-01-01T00", "2020-01-04T00", 6, dtype="datetime64[h]")
    ds = _dataset(times.astype("datetime64[ns]"), (500, 850), LAT, static_time=False)
    return _write(ds, tmp_path / "src" / "wb2.zarr")


@pytest.fixture
def served(store: Path):
    """The store's folder on a loopback HTTP server; yields the store's URL."""
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(store.parent))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/{store.name}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _train(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "zarr_config.py"
    config.write_text(CONFIG.format(url=url))
    workdir = tmp_path / "run"
    run_main(f"--config={config}", f"--workdir={workdir}")
    return workdir


def _assert_trained(workdir: Path) -> None:
    assert (workdir / "checkpoints" / "2").is_dir()
    with open(workdir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows if r["tag"] == "train/loss"}) == [1, 2]
    assert any(r["tag"] == "val/loss" and float(r["value"]) > 0 for r in rows)
    # Nothing was copied: the only thing written for the data is the statistics cache of `r`.
    written = [p.name for p in (workdir / "datasets").rglob("*") if p.is_file()]
    assert written and all(name.startswith("zarr_stats_") for name in written), written


@pytest.mark.slow  # CI time: the HTTP test below runs the same command over a served store
def test_main_trains_from_a_local_zarr_store(tmp_path: Path, store: Path) -> None:
    _assert_trained(_train(tmp_path, str(store)))


def test_main_trains_from_a_zarr_store_over_http(tmp_path: Path, served: str) -> None:
    _assert_trained(_train(tmp_path, served))


def test_the_documented_zarr_config_makes_a_builder_without_touching_the_network() -> None:
    import re

    import ml_collections

    from data_builders.registry import get_builder

    text = (ROOT / "docs" / "datasets.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if '"zarr"' in b]
    config = ml_collections.ConfigDict({"data": {}})
    exec(block, {"config": config})
    builder = get_builder(config.data.builder, **config.data.builder_config.to_dict())
    assert builder.url.startswith("https://storage.googleapis.com/weatherbench2/")
    assert builder.splits == ("train", "validation")
