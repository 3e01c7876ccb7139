"""LoRA wrappers, targets, exact parameter counts, fuse and the adapter file (tiny model)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError, RecipeError
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.recipe import LoraTarget
from zrecipe.training.lora import (
    LoRALinear,
    apply_lora,
    fuse_lora,
    load_adapter,
    lora_weights,
    save_adapter,
    trainable_parameter_count,
)

ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("lora") / "tiny")


@pytest.fixture
def model(tiny_path):
    return load_transformer(tiny_path, dtype="float32")


def _inputs(model, seed=0):
    c = model.config
    rng = np.random.default_rng(seed)
    x = mx.array(rng.standard_normal((2, c.in_channels, 8, 8)).astype(np.float32))
    t = mx.array([0.3, 0.8])
    caps = [mx.array(rng.standard_normal((n, c.cap_feat_dim)).astype(np.float32)) for n in (5, 9)]
    return x, t, caps


def test_trainable_count_is_exact(model):
    c = model.config
    dim, hidden, ada = c.dim, int(c.dim / 3 * 8), min(c.dim, 256)
    targets = [
        LoraTarget("layers", 0, None, ATTN + FFN + ("adaLN_modulation.0",), rank=4, alpha=8.0),
        LoraTarget("context_refiner", 0, 1, ("attention.to_v",), rank=2, alpha=2.0),
    ]
    paths = apply_lora(model, targets)
    per_block = 4 * 4 * (dim + dim) + 4 * (2 * (dim + hidden) + (hidden + dim)) + 4 * (ada + 4 * dim)
    expected = c.n_layers * per_block + 2 * (dim + dim)
    assert trainable_parameter_count(model) == expected
    assert len(paths) == c.n_layers * 8 + 1
    # Only LoRA A/B are trainable.
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)


def test_fuse_of_fresh_wrapper_is_identity():
    base = nn.Linear(24, 40, bias=True)
    lora = LoRALinear.from_base(base, rank=4, alpha=8.0)
    fused = lora.fuse()
    assert mx.array_equal(fused.weight, base.weight) and mx.array_equal(fused.bias, base.bias)
    x = mx.random.normal((3, 24))
    assert mx.array_equal(lora(x), base(x))  # B = 0: step 0 is exactly the base model


def test_lora_forward_and_fuse_after_training_agree():
    base = nn.Linear(32, 16, bias=False)
    lora = LoRALinear.from_base(base, rank=4, alpha=2.0)
    lora.lora_b = mx.random.normal((4, 16))
    x = mx.random.normal((5, 32))
    expected = x @ base.weight.T + 0.5 * (x @ lora.lora_a) @ lora.lora_b
    assert np.allclose(np.array(lora(x)), np.array(expected), atol=1e-5)
    assert np.allclose(np.array(lora.fuse()(x)), np.array(expected), atol=1e-5)


def test_qlora_over_quantized_base_fuses_dequantized():
    base = nn.Linear(64, 32, bias=False)
    q = nn.QuantizedLinear.from_linear(base, group_size=64, bits=4)
    lora = LoRALinear.from_base(q, rank=4)
    assert lora.lora_a.shape == (64, 4) and lora.lora_b.shape == (4, 32)
    fused = lora.fuse()
    assert isinstance(fused, nn.Linear)
    assert mx.array_equal(fused.weight, mx.dequantize(q.weight, q.scales, q.biases, 64, 4))
    x = mx.random.normal((2, 64))
    assert np.allclose(np.array(fused(x)), np.array(lora(x)), atol=1e-4)


@pytest.mark.parametrize(
    "target, fragment",
    [
        (LoraTarget("context_refiner", 0, 1, ("adaLN_modulation.0",), 4, 4.0), "adaLN_modulation"),
        (LoraTarget("layers", 5, 9, ATTN, 4, 4.0), "selects no block"),
        (LoraTarget("noise_refiner", 0, 1, ("attention.to_x",), 4, 4.0), "attention.to_x"),
    ],
)
def test_target_matching_nothing_is_a_recipe_error(model, target, fragment):
    with pytest.raises(RecipeError) as info:
        apply_lora(model, [target])
    assert fragment in str(info.value)


def test_fused_model_equals_unfused_after_training_like_update(model):
    x, t, caps = _inputs(model)
    base_out = model(x, t, caps)
    apply_lora(model, [LoraTarget("layers", 0, None, ATTN + FFN, rank=4, alpha=4.0)])
    assert mx.array_equal(model(x, t, caps), base_out)  # step 0 = base model
    for _, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = 0.05 * mx.random.normal(layer.lora_b.shape)
    unfused = model(x, t, caps)
    assert not np.allclose(np.array(unfused), np.array(base_out), atol=1e-4)
    fuse_lora(model)
    assert not any(isinstance(m, LoRALinear) for _, m in model.named_modules())
    assert np.allclose(np.array(model(x, t, caps)), np.array(unfused), atol=1e-4)


def test_adapter_file_roundtrip_and_orientation(model, tiny_path, tmp_path):
    apply_lora(model, [LoraTarget("layers", 0, 1, ("attention.to_q", "feed_forward.w2"), rank=3, alpha=6.0)])
    for _path, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            layer.lora_b = mx.random.normal(layer.lora_b.shape)
    x, t, caps = _inputs(model, seed=1)
    trained = model(x, t, caps)
    file = save_adapter(model, tmp_path / "adapter.safetensors", {"base_model": "tiny", "step": 7})
    tensors, meta = mx.load(str(file), return_metadata=True)
    c = model.config
    hidden = int(c.dim / 3 * 8)
    assert tensors["layers.0.attention.to_q.lora_A.weight"].shape == (3, c.dim)
    assert tensors["layers.0.feed_forward.w2.lora_A.weight"].shape == (3, hidden)
    assert tensors["layers.0.feed_forward.w2.lora_B.weight"].shape == (c.dim, 3)
    assert tensors["layers.0.attention.to_q.alpha"].item() == 6.0
    assert meta["format"] == "zrecipe" and meta["rank"] == "3" and meta["alpha"] == "6.0"
    assert set(json.loads(meta["targets"])) == {"layers.0.attention.to_q", "layers.0.feed_forward.w2"}
    assert meta["base_model"] == "tiny" and meta["step"] == "7"
    weights = lora_weights(model)
    assert mx.array_equal(
        weights["layers.0.attention.to_q"][0], tensors["layers.0.attention.to_q.lora_A.weight"]
    )

    fresh = load_transformer(tiny_path, dtype="float32")
    load_adapter(fresh, file)
    assert mx.array_equal(fresh(x, t, caps), trained)


def test_adapter_that_does_not_fit_is_refused(model, tmp_path):
    file = tmp_path / "bad.safetensors"
    mx.save_safetensors(str(file), {
        "layers.9.attention.to_q.lora_A.weight": mx.zeros((2, 4)),
        "layers.9.attention.to_q.lora_B.weight": mx.zeros((4, 2)),
        "layers.9.attention.to_q.alpha": mx.array(2.0),
    })  # fmt: skip
    with pytest.raises(CheckpointError, match="no such layer"):
        load_adapter(model, file)
