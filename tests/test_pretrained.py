"""Published weights offline, non-strict loading and safetensors.

`from_pretrained` is tested against a local Hugging Face Hub cache laid out as `huggingface_hub`
lays it out (`models--microsoft--aurora/{blobs,refs,snapshots}`), holding a small checkpoint that
microsoft-aurora wrote, with `HF_HUB_OFFLINE=1`: nothing downloads. `strict=False` is compared
with microsoft-aurora's `load_checkpoint_local(strict=False)` given the same created values.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import traverse_util

import aurora
from aurora import pretrained
from aurora.convert import (
    ConversionError,
    convert_pytorch_checkpoint,
    fit_params,
    load_state_dict,
    main,
    to_flax_names,
    to_pytorch_state_dict,
)
from aurora.variables import SURF_VARS
from tests.helpers import TINY_KWARGS, random_batch, tiny_model
from tests.reference.venv import case_dir
from tests.test_parity import TINY, _spec

REPO_ROOT = Path(__file__).resolve().parents[1]
NEW_SURF = (*SURF_VARS, "2d")  # 2 m dewpoint: in Aurora's statistics, not in its checkpoints


def _flat(tree) -> dict:
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _assert_trees_equal(a, b) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def _hub_cache(root: Path, file: Path, name: str, revision: str) -> Path:
    """`file` as `huggingface_hub` caches `microsoft/aurora/<name>` at commit `revision`."""
    repo = root / "models--microsoft--aurora"
    data = file.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / name).symlink_to(Path("../..") / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return root


@pytest.fixture
def reference_checkpoint() -> Path:
    """A small AuroraPretrained-architecture state dict written by microsoft-aurora."""
    return case_dir(_spec("AuroraPretrained", TINY, steps=2)) / "state_dict.ckpt"


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, reference_checkpoint) -> Path:
    """The reference checkpoint as AuroraPretrained's pinned file in an offline Hub cache."""
    import huggingface_hub.constants

    entry = pretrained.CHECKPOINTS["AuroraPretrained"]
    hub = _hub_cache(tmp_path / "hub", reference_checkpoint, entry.name, entry.revision)
    # huggingface_hub reads its environment once, at import: set both.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("AURORA_JAX_CACHE", str(tmp_path / "aurora-jax"))
    return hub


def _tiny_kwargs(**extra) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in {**TINY, **extra}.items()}


@pytest.mark.reference
def test_from_pretrained_offline_converts_once(
    offline_hub, reference_checkpoint, tmp_path, monkeypatch
) -> None:
    model, params = aurora.from_pretrained("AuroraPretrained", **_tiny_kwargs())
    assert isinstance(model, aurora.AuroraPretrained)
    _assert_trees_equal(params, convert_pytorch_checkpoint(reference_checkpoint, model))
    cached = list((tmp_path / "aurora-jax" / "converted").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".safetensors", cached

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(pretrained, "load_state_dict", no_conversion)
    monkeypatch.setattr(pretrained, "to_flax_names", no_conversion)
    _, again = aurora.from_pretrained("AuroraPretrained", **_tiny_kwargs())
    _assert_trees_equal(again, params)

    # Another revision is another file, which this offline cache does not have.
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(LocalEntryNotFoundError):
        aurora.from_pretrained("AuroraPretrained", revision="f" * 40, **_tiny_kwargs())


@pytest.mark.reference
def test_converter_version_is_part_of_the_cache_key(offline_hub, tmp_path, monkeypatch) -> None:
    aurora.from_pretrained("AuroraPretrained", **_tiny_kwargs())
    monkeypatch.setattr(pretrained, "CONVERTER_VERSION", pretrained.CONVERTER_VERSION + 1)
    aurora.from_pretrained("AuroraPretrained", **_tiny_kwargs())
    assert len(list((tmp_path / "aurora-jax" / "converted").iterdir())) == 2


def test_download_follows_hf_environment_variables(tmp_path) -> None:
    """A fresh process with only `HF_HOME` and `HF_HUB_OFFLINE` set finds the pinned file."""
    entry = pretrained.CHECKPOINTS["Aurora12hPretrained"]
    source = tmp_path / "file.ckpt"
    source.write_bytes(b"not a real checkpoint")
    _hub_cache(tmp_path / "home" / "hub", source, entry.name, entry.revision)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    code = "from aurora.pretrained import download; print(download('Aurora12hPretrained'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == str(
        tmp_path / "home/hub/models--microsoft--aurora/snapshots" / entry.revision / entry.name
    )
    assert Path(out).read_bytes() == b"not a real checkpoint"


@pytest.mark.reference
def test_checkpoint_names_and_revisions_are_microsoft_aurora_s() -> None:
    from tests.reference.venv import python

    names = sorted(pretrained.CHECKPOINTS)
    code = (
        "import json, aurora\n"
        f"classes = {{n: getattr(aurora, n) for n in {names!r}}}\n"
        "print(json.dumps({n: [c.default_checkpoint_name, c.default_checkpoint_revision] "
        "for n, c in classes.items()}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [str(python()), "-c", code], env=env, cwd="/", capture_output=True, text=True, check=True
    ).stdout
    reference = json.loads(out.strip().splitlines()[-1])
    assert reference == {n: [c.name, c.revision] for n, c in pretrained.CHECKPOINTS.items()}
    assert set(pretrained.CHECKPOINTS) == set(aurora.PRESETS)


# --- strict=False --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_checkpoint() -> dict[str, np.ndarray]:
    """A tiny model's weights (all four of Aurora's surface variables) as a PyTorch state dict."""
    model = tiny_model()
    params = jax.jit(model.init)(jax.random.PRNGKey(0), random_batch(model))["params"]
    return to_pytorch_state_dict(params)


def test_strict_refuses_and_non_strict_creates_loads_and_drops(base_checkpoint) -> None:
    model = tiny_model(surf_vars=("2t", "10u", "10v", "2d"), use_lora=True)  # msl out, 2d in
    with pytest.raises(ConversionError, match="Parameters not filled.*weights/2d"):
        convert_pytorch_checkpoint(base_checkpoint, model)

    flat = to_flax_names(base_checkpoint, model.patch_size, model.max_history_size)
    params, report = fit_params(flat, model, strict=False, rng=jax.random.PRNGKey(3))
    created = set(report.created)
    assert "encoder/surf_token_embeds/weights/2d" in created
    assert {"decoder/surf_heads/2d/kernel", "decoder/surf_heads/2d/bias"} <= created
    assert all(
        p.startswith(("encoder/surf_token_embeds/weights/2d", "decoder/surf_heads/2d"))
        or p.endswith(("lora_A", "lora_B"))
        for p in created
    ), created
    assert set(report.dropped) == {
        "encoder/surf_token_embeds/weights/msl",
        "decoder/surf_heads/msl/kernel",
        "decoder/surf_heads/msl/bias",
    }
    assert len(report.loaded) == len(flat) - 3
    modules = report.by_module()
    assert modules["decoder/surf_heads"] == {"loaded": 6, "created": 2, "dropped": 2}
    assert "decoder/surf_heads: loaded 6, created 2, dropped 2" in report.summary()

    # Loaded values are the checkpoint's; created ones are a fresh model's with the same key.
    got = _flat(params)
    for path in report.loaded:
        np.testing.assert_array_equal(got[tuple(path.split("/"))], flat[tuple(path.split("/"))])
    fresh = _flat(jax.jit(model.init)(jax.random.PRNGKey(3), random_batch(model))["params"])
    for path in report.created:
        np.testing.assert_array_equal(got[tuple(path.split("/"))], fresh[tuple(path.split("/"))])
    assert got.keys() == fresh.keys()

    with pytest.raises(ConversionError, match="Shape mismatches"):
        fit_params(flat, tiny_model(embed_dim=64), strict=False)


def test_config_init_strict_false_trains_through_the_trainer(
    tmp_path, monkeypatch, base_checkpoint
) -> None:
    """`config.init.strict=False` adds a surface variable to checkpointed weights; 3 steps train."""
    from tests.test_trainer import OPTIM, _example
    from trainers.data import InMemoryData
    from trainers.run import _init_params
    from trainers.strategies.rollout import RolloutStrategy
    from trainers.trainer import Trainer

    monkeypatch.setenv("AURORA_JAX_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "base.safetensors"
    from safetensors.numpy import save_file

    save_file(base_checkpoint, checkpoint)
    model = tiny_model(surf_vars=NEW_SURF)
    config = ml_collections.ConfigDict(
        {"seed": 5, "init": {"pytorch_checkpoint": str(checkpoint), "strict": False}}
    )
    init = _init_params(config, model)
    examples = [_example(model, seed) for seed in range(2)]
    trainer = Trainer(
        RolloutStrategy(model, steps=2, backprop="all"),
        optimizer=OPTIM,
        workdir=tmp_path / "run",
        max_steps=3,
        log_every_n_steps=1,
        seed=5,
        init_params=init,
    )
    # The created parameters are what the Trainer's own fresh initialisation gives them.
    fresh = _flat(
        trainer.strategy.init_params(
            jax.random.split(jax.random.PRNGKey(5))[0], jax.device_put(examples[0][0])
        )
    )
    got = _flat(init)
    new_head = ("decoder", "surf_heads", "2d", "kernel")
    np.testing.assert_array_equal(got[new_head], fresh[new_head])
    old = ("decoder", "surf_heads", "2t", "kernel")
    np.testing.assert_array_equal(got[old], base_checkpoint["decoder.surf_heads.2t.weight"].T)

    trainer.fit(InMemoryData(examples))
    assert trainer.global_step == 3
    trained = _flat(trainer.state.params)
    assert np.isfinite(trainer.callback_metrics["train/loss"])
    assert not np.array_equal(trained[new_head], got[new_head]), "the new head trains"


@pytest.mark.reference
def test_non_strict_matches_microsoft_aurora(tmp_path, reference_checkpoint) -> None:
    """Published-style weights into a model with a new surface variable (2d), one dropped (msl),
    LoRA adapters the file lacks and a level (700 hPa) it never saw: microsoft-aurora's
    `load_checkpoint_local(strict=False)` with the same created values gives the same forecast."""
    kwargs = {**TINY, "surf_vars": ["2t", "10u", "10v", "2d"], "use_lora": True}
    model = aurora.AuroraPretrained(**_tiny_kwargs(**kwargs))
    flat = to_flax_names(
        load_state_dict(reference_checkpoint), model.patch_size, model.max_history_size
    )
    params, report = fit_params(flat, model, strict=False, rng=jax.random.PRNGKey(11))
    created = to_pytorch_state_dict(
        traverse_util.unflatten_dict(
            {p: v for p, v in _flat(params).items() if "/".join(p) in report.created}
        )
    )
    levels = (100, 500, 700, 850)
    batch = random_batch(model, levels=levels, seed=4)
    arrays = {f"surf/{k}": v for k, v in batch.surf_vars.items()}
    arrays |= {f"static/{k}": v for k, v in batch.static_vars.items()}
    arrays |= {f"atmos/{k}": v for k, v in batch.atmos_vars.items()}
    arrays |= {
        "lat": np.asarray(batch.metadata.lat, np.float32),
        "lon": np.asarray(batch.metadata.lon, np.float32),
    }
    np.savez(tmp_path / "created.npz", **created)
    np.savez(tmp_path / "batch.npz", **arrays)
    spec = {
        "preset": "AuroraPretrained",
        "kwargs": kwargs,
        "levels": list(levels),
        "time": "2020-06-01T12:00",
        "steps": 2,
    }
    out = case_dir(
        spec,
        runner=REPO_ROOT / "tests" / "reference" / "run_nonstrict.py",
        inputs={
            "checkpoint.ckpt": reference_checkpoint,
            "created.npz": tmp_path / "created.npz",
            "batch.npz": tmp_path / "batch.npz",
        },
    )
    keys = json.loads((out / "keys.json").read_text())
    assert set(created) == set(keys["missing"])
    dropped = {tuple(p.split("/")): flat[tuple(p.split("/"))] for p in report.dropped}
    assert set(to_pytorch_state_dict(traverse_util.unflatten_dict(dropped))) == set(
        keys["unexpected"]
    )
    assert len(report.dropped) == 3  # msl's embedding, head weight and bias

    batch = batch.replace(metadata=batch.metadata.replace(lat=arrays["lat"], lon=arrays["lon"]))
    with np.load(out / "preds.npz") as f:
        ref = {k: f[k] for k in f.files}
    with jax.default_matmul_precision("highest"):
        preds = list(aurora.rollout(model, params, batch, 2))
    errors = {}
    for step, pred in enumerate(preds):
        for kind, variables in (("surf", pred.surf_vars), ("atmos", pred.atmos_vars)):
            for name, value in variables.items():
                expected = ref[f"{step}/{kind}/{name}"]
                errors[f"{step}/{kind}/{name}"] = float(
                    np.abs(np.asarray(value) - expected).max() / np.abs(expected).max()
                )
    print(json.dumps(errors, indent=1))
    assert max(errors.values()) <= 1e-4, errors
    assert {k.split("/")[2] for k in ref if "/surf/" in k} == {"2t", "10u", "10v", "2d"}


# --- safetensors ---------------------------------------------------------------------------------


def test_safetensors_both_ways_through_the_cli(tmp_path, base_checkpoint) -> None:
    import orbax.checkpoint as ocp

    model = tiny_model()
    source = tmp_path / "state.npz"
    np.savez(source, **base_checkpoint)
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in TINY_KWARGS.items()}
    common = ["--preset", "Aurora", "--model-kwargs", json.dumps({**kwargs, "use_lora": False})]
    st = tmp_path / "weights.safetensors"
    main(["--pytorch-ckpt", str(source), "--format", "safetensors", "--out", str(st), *common])
    state = load_state_dict(st)
    assert state.keys() == base_checkpoint.keys()
    for k in state:
        np.testing.assert_array_equal(state[k], base_checkpoint[k], err_msg=k)

    # .safetensors in, Orbax out, and Orbax back to safetensors.
    folder = tmp_path / "orbax"
    main(["--pytorch-ckpt", str(st), "--out", str(folder), *common])
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(folder.resolve())
    _assert_trees_equal(restored, convert_pytorch_checkpoint(base_checkpoint, model))
    back = tmp_path / "back.safetensors"
    main(["--orbax-ckpt", str(folder), "--format", "safetensors", "--out", str(back)])
    state = load_state_dict(back)
    assert state.keys() == base_checkpoint.keys()
    for k in state:
        np.testing.assert_array_equal(state[k], base_checkpoint[k], err_msg=k)


@pytest.mark.reference
def test_config_init_pretrained_loads_through_the_hub(offline_hub, reference_checkpoint) -> None:
    from trainers.run import _init_params, _init_provenance

    model = aurora.AuroraPretrained(**_tiny_kwargs())
    config = ml_collections.ConfigDict(
        {"seed": 0, "init": {"pretrained": "AuroraPretrained", "revision": "", "strict": True}}
    )
    _assert_trees_equal(
        _init_params(config, model), convert_pytorch_checkpoint(reference_checkpoint, model)
    )
    assert _init_provenance(config.init) == {"pretrained": "AuroraPretrained"}
    config.init.pretrained = ""
    assert _init_provenance(config.init) == {}, "from scratch: the demo's table says so"
    assert _init_params(config, model) is None
