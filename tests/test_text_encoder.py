"""Qwen3 text encoder: config parsing, the real checkpoint's keys, strict loading, hidden_states[-2]."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from zrecipe.errors import ModelError
from zrecipe.models.z_image import tiny
from zrecipe.models.z_image.text_encoder import (
    Qwen3Config,
    Qwen3TextEncoder,
    encode_prompts,
    load_text_encoder,
)
from zrecipe.models.z_image.tokenizer import load_tokenizer

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "qwen3_4b_keys.txt"

# The published Qwen3-4B text_encoder/config.json of Z-Image (transformers 4.51 style).
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory) -> Path:
    """A model folder holding only the tiny tokenizer and text encoder (the parts this file needs)."""
    root = tmp_path_factory.mktemp("tiny_text")
    ids = tiny.write_tokenizer(root / "tokenizer")
    config = tiny.text_encoder_config(-(-len(ids) // 64) * 64, ids)
    tiny.write_text_encoder(root / "text_encoder", config, seed=0, dtype="float32")
    return root


def test_real_config_has_exactly_the_reference_keys_and_shapes():
    if not REFERENCE.is_file():
        pytest.skip("shared/reference not present beside the repository")
    expected = {}
    for line in REFERENCE.read_text().splitlines():
        key, shape = line.split()
        expected[key] = tuple(int(s) for s in shape.split(","))
    # Built lazily: MLX initialisers are lazy, so no 4B weights are materialised here.
    model = Qwen3TextEncoder(Qwen3Config.from_dict(QWEN3_4B))
    got = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    assert got == expected
    assert not any(k.startswith("lm_head") for k in got)


def test_config_reads_both_rope_styles_and_tolerates_extra_keys():
    old = Qwen3Config.from_dict({**QWEN3_4B, "some_future_key": 1})
    assert old.rope_theta == 1_000_000.0 and old.head_dim == 128 and old.num_key_value_heads == 8
    new = dict(QWEN3_4B)
    del new["rope_theta"], new["rope_scaling"]
    new["rope_parameters"] = {"rope_theta": 5000.0, "rope_type": "default"}
    assert Qwen3Config.from_dict(new).rope_theta == 5000.0
    no_head_dim = {k: v for k, v in QWEN3_4B.items() if k != "head_dim"}
    assert Qwen3Config.from_dict(no_head_dim).head_dim == 2560 // 32


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
        ({"use_sliding_window": True}, "sliding"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 5}, "multiple"),
    ],
)
def test_config_refuses_unsupported_variants(change, message):
    with pytest.raises(ModelError, match=message):
        Qwen3Config.from_dict({**QWEN3_4B, **change}, source="x/config.json")


def test_config_names_a_missing_key():
    data = {k: v for k, v in QWEN3_4B.items() if k != "hidden_size"}
    with pytest.raises(ModelError, match="x/config.json.*hidden_size"):
        Qwen3Config.from_dict(data, source="x/config.json")


def test_sanitize_drops_lm_head_and_adds_the_model_prefix():
    out = Qwen3TextEncoder.sanitize({"lm_head.weight": 1, "embed_tokens.weight": 2, "model.norm.weight": 3})
    assert out == {"model.embed_tokens.weight": 2, "model.norm.weight": 3}


def test_last_layer_is_loaded_but_never_run(tiny_text):
    model = load_text_encoder(tiny_text)
    ids = mx.array([[1, 2, 3, 4]])
    before = np.array(model(ids, mx.ones((1, 4))))
    last = model.model.layers[-1]
    # Poison the last layer and the final norm: hidden_states[-2] must not change.
    last.update({"mlp": {"down_proj": {"weight": mx.full(last.mlp.down_proj.weight.shape, float("nan"))}}})
    model.model.norm.weight = mx.full(model.model.norm.weight.shape, float("nan"))
    after = np.array(model(ids, mx.ones((1, 4))))
    np.testing.assert_array_equal(before, after)
    # ...while an earlier layer does change it (the test can fail).
    model.model.layers[0].mlp.down_proj.weight = model.model.layers[0].mlp.down_proj.weight * 2
    assert not np.allclose(before, np.array(model(ids, mx.ones((1, 4)))))


def test_padding_does_not_change_real_rows(tiny_text):
    model, tokenizer = load_text_encoder(tiny_text), load_tokenizer(tiny_text)
    prompts = ["a red fox in the snow at dawn, soft golden light", "", "cat"]
    batch = encode_prompts(model, tokenizer, prompts)
    for prompt, emb in zip(prompts, batch, strict=True):
        (single,) = encode_prompts(model, tokenizer, [prompt])
        assert emb.shape == single.shape
        np.testing.assert_allclose(np.array(emb), np.array(single), rtol=1e-5, atol=1e-5)
    ids, mask = tokenizer.encode(prompts)
    assert [e.shape[0] for e in batch] == mask.sum(axis=1).tolist()
    assert all(e.shape[1] == 64 for e in batch)
    assert float(mx.abs(batch[0]).mean()) > 0.1  # seeded weights give non-degenerate features


def test_dtype_is_honoured(tiny_text):
    assert load_text_encoder(tiny_text).model.layers[0].mlp.up_proj.weight.dtype == mx.float32
    model = load_text_encoder(tiny_text / "text_encoder", dtype="bfloat16")  # component folder form
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model(mx.array([[5, 6]]), mx.ones((1, 2))).dtype == mx.bfloat16
    assert load_text_encoder(tiny_text, dtype=mx.bfloat16).model.norm.weight.dtype == mx.bfloat16
    with pytest.raises(ModelError, match="float64"):
        load_text_encoder(tiny_text, dtype="float64")


def test_missing_and_misshaped_tensors_are_listed_in_one_error(tiny_text, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "text_encoder"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_text / "text_encoder" / "config.json").read_text())
    weights = load_file(str(tiny_text / "text_encoder" / "model.safetensors"))
    del weights["model.layers.2.mlp.up_proj.weight"]  # the (unused) last layer is still required
    weights["model.norm.weight"] = np.ones(3, np.float32)
    weights["model.extra.weight"] = np.ones(3, np.float32)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ModelError) as info:
        load_text_encoder(tmp_path)
    text = str(info.value)
    assert "model.layers.2.mlp.up_proj.weight" in text and "model.norm.weight" in text
    assert "model.extra.weight" in text and str(folder) in text
