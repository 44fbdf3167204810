"""PyTorch <-> Flax conversion: by name, strict, reversible, accepts published key layouts."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from aurora.convert import (
    ConversionError,
    adapt_checkpoint,
    convert_pytorch_checkpoint,
    to_pytorch_state_dict,
)
from tests.helpers import random_batch, tiny_model


@pytest.fixture(scope="module")
def lora_model_and_params():
    model = tiny_model(use_lora=True, lora_mode="all", lora_steps=3)
    params = model.init(jax.random.PRNGKey(0), random_batch(model))["params"]
    return model, params


def _flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_round_trip_is_identity(lora_model_and_params) -> None:
    model, params = lora_model_and_params
    state = to_pytorch_state_dict(params)
    back = convert_pytorch_checkpoint(state, model)
    a, b = _flat(params), _flat(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_pytorch_names_follow_microsoft_aurora(lora_model_and_params) -> None:
    _, params = lora_model_and_params
    state = to_pytorch_state_dict(params)
    expected = {
        "encoder.surf_token_embeds.weights.2t": (32, 1, 2, 4, 4),
        "encoder.level_agg.layers.0.0.to_kv.weight": (64, 32),
        "encoder.level_agg.layers.0.1.net.0.weight": (128, 32),
        "backbone.time_mlp.0.weight": (32, 32),
        "backbone.encoder_layers.0.blocks.0.attn.qkv.weight": (96, 32),
        "backbone.encoder_layers.0.blocks.0.attn.lora_qkv.loras.2.lora_A": (8, 32),
        "backbone.encoder_layers.0.blocks.0.attn.lora_proj.loras.0.lora_B": (32, 8),
        "backbone.encoder_layers.0.blocks.0.norm1.ln_modulation.1.weight": (64, 32),
        "backbone.encoder_layers.0.downsample.norm.weight": (128,),
        "backbone.decoder_layers.0.upsample.lin1.weight": (128, 64),
        "decoder.surf_heads.10u.weight": (16, 64),
        "decoder.atmos_heads.q.bias": (16,),
        "decoder.level_decoder.layers.0.3.bias": (64,),
    }
    for key, shape in expected.items():
        assert key in state, key
        assert state[key].shape == shape, (key, state[key].shape)


def test_errors_list_missing_extra_and_misshaped(lora_model_and_params) -> None:
    model, params = lora_model_and_params
    state = to_pytorch_state_dict(params)
    del state["backbone.time_mlp.0.weight"]
    state["backbone.not_a_module.weight"] = np.zeros((3, 3), np.float32)
    state["decoder.atmos_heads.q.bias"] = np.zeros((5,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_pytorch_checkpoint(state, model)
    message = str(info.value)
    assert "backbone/time_mlp_0/kernel" in message
    assert "backbone.not_a_module.weight" in message
    assert "decoder/atmos_heads/q/bias: checkpoint (5,), model (16,)" in message


def test_published_layout_is_adapted() -> None:
    """`net.` prefix, ID-based embeddings and heads, shorter history (zero-padded)."""
    model = tiny_model()
    params = model.init(jax.random.PRNGKey(1), random_batch(model))["params"]
    state = to_pytorch_state_dict(params)

    old = {f"net.{k}": v for k, v in state.items()}
    surf = ("2t", "10u", "10v", "msl", "lsm", "z", "slt")
    old["net.encoder.surf_token_embeds.weight"] = np.concatenate(
        [old.pop(f"net.encoder.surf_token_embeds.weights.{v}")[:, :, :1] for v in surf], axis=1
    )
    p2 = 16
    weights = [old.pop(f"net.decoder.surf_heads.{v}.weight") for v in surf[:4]]
    biases = [old.pop(f"net.decoder.surf_heads.{v}.bias") for v in surf[:4]]
    old["net.decoder.surf_head.weight"] = np.stack(weights, axis=1).reshape(4 * p2, -1)
    old["net.decoder.surf_head.bias"] = np.stack(biases, axis=1).reshape(4 * p2)

    converted = convert_pytorch_checkpoint(old, model)
    embed = converted["encoder"]["surf_token_embeds"]["weights"]
    np.testing.assert_array_equal(
        embed["lsm"][:, :, 0], params["encoder"]["surf_token_embeds"]["weights"]["lsm"][:, :, 0]
    )
    assert np.all(embed["lsm"][:, :, 1] == 0), "the new history slice starts at zero"
    np.testing.assert_array_equal(
        converted["decoder"]["surf_heads"]["msl"]["kernel"],
        params["decoder"]["surf_heads"]["msl"]["kernel"],
    )


def test_longer_history_than_model_is_refused() -> None:
    state = {"encoder.surf_token_embeds.weights.2t": np.zeros((4, 1, 3, 4, 4), np.float32)}
    with pytest.raises(ConversionError, match="max_history_size=2"):
        adapt_checkpoint(state, patch_size=4, max_history_size=2)


def test_cli_writes_an_orbax_checkpoint(tmp_path, lora_model_and_params) -> None:
    import json

    import orbax.checkpoint as ocp

    from aurora.convert import main

    _model, params = lora_model_and_params
    source = tmp_path / "state_dict.npz"
    np.savez(source, **to_pytorch_state_dict(params))
    kwargs = {
        "encoder_depths": [1, 2],
        "encoder_num_heads": [2, 4],
        "decoder_depths": [2, 1],
        "decoder_num_heads": [4, 2],
        "embed_dim": 32,
        "num_heads": 4,
        "window_size": [2, 2, 4],
        "use_lora": True,
        "lora_mode": "all",
        "lora_steps": 3,
    }
    out = tmp_path / "orbax"
    main(
        [
            "--pytorch-ckpt",
            str(source),
            "--preset",
            "Aurora",
            "--out",
            str(out),
            "--model-kwargs",
            json.dumps(kwargs),
        ]
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(out.resolve())
    a, b = _flat(params), _flat(restored)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
