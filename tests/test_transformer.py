"""ZImageTransformer without the PyTorch reference: config, key layout, loading, sanitize, batching."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.errors import ModelError
from zrecipe.models.z_image.transformer import (
    TransformerConfig,
    ZImageTransformer,
    export_weights,
    load_transformer,
)

REFERENCE_KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "zimage_transformer_keys.txt"

# The published Tongyi-MAI/Z-Image transformer/config.json (extra keys included on purpose; axes_lens does
# not change any key or shape).
REAL_CONFIG = {
    "_class_name": "ZImageTransformer2DModel",
    "_diffusers_version": "0.36.0.dev0",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": 2560,
    "dim": 3840,
    "in_channels": 16,
    "n_heads": 30,
    "n_kv_heads": 30,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}

TINY = {
    **REAL_CONFIG,
    "dim": 48,
    "n_heads": 2,
    "n_kv_heads": 2,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "cap_feat_dim": 32,
    "axes_dims": [8, 8, 8],
    "axes_lens": [256, 64, 64],
}


def random_model(config: dict = TINY, seed: int = 0) -> ZImageTransformer:
    """A tiny model with every weight random (pad tokens and norms included), evaluated."""
    model = ZImageTransformer(TransformerConfig.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = [
        (k, mx.array(rng.normal(0, 0.3, v.shape).astype(np.float32) + ("norm" in k)))
        for k, v in tree_flatten(model.parameters())
    ]
    model.load_weights(weights, strict=True)
    mx.eval(model.parameters())
    return model


def save_model(
    model: ZImageTransformer, folder: Path, config: dict = TINY, weights: dict | None = None
) -> Path:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), weights or export_weights(model))
    return folder


def inputs(batch: int = 2, h: int = 6, w: int = 10, lens=(7, 45), seed: int = 1):
    rng = np.random.default_rng(seed)
    x = mx.array(rng.normal(size=(batch, 16, h, w)).astype(np.float32))
    t = mx.array(np.linspace(0.2, 0.9, batch).astype(np.float32))
    caps = [mx.array(rng.normal(size=(n, TINY["cap_feat_dim"])).astype(np.float32)) for n in lens[:batch]]
    return x, t, caps


def test_config_reads_every_dimension_and_tolerates_extra_keys():
    c = TransformerConfig.from_dict(REAL_CONFIG)
    assert (c.dim, c.n_heads, c.head_dim, c.adaln_dim, c.axes_dims) == (3840, 30, 128, 256, (32, 48, 48))
    assert TransformerConfig.from_dict(TINY).adaln_dim == 48  # min(dim, 256)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"dim": None}, "lacks dim"),
        ({"axes_dims": [8, 8, 10]}, "must sum"),
        ({"n_heads": 5}, "not divisible"),
        ({"siglip_feat_dim": 16}, "Omni"),
    ],
)
def test_config_errors_name_the_problem(change, message):
    config = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(ModelError, match=message):
        TransformerConfig.from_dict(config, source="x/config.json")


@pytest.mark.skipif(not REFERENCE_KEYS.is_file(), reason=f"{REFERENCE_KEYS} not available in this checkout")
def test_real_config_built_lazily_has_exactly_the_reference_keys_and_shapes():
    # Building allocates nothing: parameters stay unevaluated graph nodes, only shapes are read.
    model = ZImageTransformer(TransformerConfig.from_dict(REAL_CONFIG))
    ours = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    reference = {}
    for line in REFERENCE_KEYS.read_text().splitlines():
        key, shape = line.split()
        reference[key] = tuple(int(s) for s in shape.split(","))
    assert ours == reference


def test_linear_layers_sit_at_checkpoint_paths():
    modules = dict(random_model().named_modules())
    for path in (
        "layers.1.attention.to_q",
        "layers.0.attention.to_out.0",
        "noise_refiner.0.feed_forward.w1",
        "layers.0.adaLN_modulation.0",
        "all_x_embedder.2-1",
        "all_final_layer.2-1.linear",
    ):
        assert type(modules[path]) is nn.Linear, path
    assert "context_refiner.0.adaLN_modulation.0" not in modules


def test_load_round_trip_and_default_dtype(tmp_path):
    model = random_model()
    folder = save_model(model, tmp_path / "m" / "transformer")
    (tmp_path / "m" / "model_index.json").write_text("{}")
    x, t, caps = inputs()
    for path in (tmp_path / "m", folder):  # model folder or the transformer folder itself
        loaded = load_transformer(path)
        assert loaded.dtype == mx.float32  # CPU default
        assert mx.array_equal(loaded(x, t, caps), model(x, t, caps))
    assert load_transformer(folder, dtype="bfloat16").dtype == mx.bfloat16


def test_missing_and_misshaped_tensors_are_listed_in_one_error(tmp_path):
    weights = export_weights(random_model())
    del weights["layers.1.feed_forward.w2.weight"]
    weights["cap_pad_token"] = mx.zeros((2, 48))
    weights["extra.weight"] = mx.zeros((1,))
    folder = save_model(None, tmp_path / "t", weights=weights)
    with pytest.raises(ModelError) as info:
        load_transformer(folder)
    message = str(info.value)
    assert "layers.1.feed_forward.w2.weight" in message and "cap_pad_token: file (2, 48)" in message
    assert "extra.weight" in message and str(folder) in message


def original_naming(weights: dict) -> dict:
    """The diffusers state dict renamed to the original Z-Image checkpoint convention (inverse mapping)."""
    out = {"model.diffusion_model.norm_final.weight": mx.ones((48,))}
    for key, value in weights.items():
        if key.endswith(("attention.to_k.weight", "attention.to_v.weight")):
            continue
        if key.endswith("attention.to_q.weight"):
            parts = [weights[key.replace("to_q", n)] for n in ("to_q", "to_k", "to_v")]
            key, value = key.replace("to_q", "qkv"), mx.concatenate(parts, axis=0)
        key = key.replace("all_x_embedder.2-1.", "x_embedder.").replace(
            "all_final_layer.2-1.", "final_layer."
        )
        key = key.replace("to_out.0.", "out.").replace("norm_q.", "q_norm.").replace("norm_k.", "k_norm.")
        out["model.diffusion_model." + key] = value
    return out


def test_sanitize_accepts_the_original_naming(tmp_path):
    model = random_model()
    weights = export_weights(model)
    original = original_naming(weights)
    assert "model.diffusion_model.layers.0.attention.qkv.weight" in original
    sanitized = model.sanitize(original)
    assert sorted(sanitized) == sorted(weights)
    assert all(mx.array_equal(sanitized[k], weights[k]) for k in weights)
    assert model.sanitize(weights).keys() == weights.keys()  # diffusers names pass through unchanged
    loaded = load_transformer(save_model(None, tmp_path / "o", weights=original))
    x, t, caps = inputs()
    assert mx.array_equal(loaded(x, t, caps), model(x, t, caps))


def test_batch_items_equal_their_single_runs():
    model = random_model()
    x, t, caps = inputs(batch=3, lens=(7, 45, 32))
    batched = model(x, t, caps)
    for i in range(3):
        single = model(x[i : i + 1], t[i : i + 1], [caps[i]])
        # Relative: with OpenBLAS a matmul's rounding depends on the matrix height (blocking), so a row of
        # a batched product is not bit-identical to the same row computed alone.
        err = mx.abs(batched[i] - single[0]).max().item() / mx.abs(single[0]).max().item()
        assert err <= 1e-5


def test_output_depends_on_time_caption_and_pad_tokens():
    model = random_model()
    x, t, caps = inputs(batch=1, lens=(7,))
    base = model(x, t, caps)
    assert not mx.allclose(base, model(x, t + 0.3, caps))
    assert not mx.allclose(base, model(x, t, [caps[0][:5]]))
    model.cap_pad_token = model.cap_pad_token + 1.0  # 7 tokens are padded to 32: pads are attended to
    assert not mx.allclose(base, model(x, t, caps))


def test_quantize_keeps_outputs_close_and_skips_sensitive_layers(tmp_path):
    config = {**TINY, "dim": 64, "axes_dims": [8, 12, 12], "cap_feat_dim": 64}
    model = random_model(config)
    folder = save_model(model, tmp_path / "q", config)
    quantized = load_transformer(folder, quantize=8)
    modules = dict(quantized.named_modules())
    assert isinstance(modules["layers.0.attention.to_q"], nn.QuantizedLinear)
    assert type(modules["cap_embedder.1"]) is nn.Linear and type(modules["all_x_embedder.2-1"]) is nn.Linear
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(1, 16, 4, 4)).astype(np.float32))
    caps = [mx.array(rng.normal(size=(9, 64)).astype(np.float32))]
    ref, out = model(x, mx.array([0.5]), caps), quantized(x, mx.array([0.5]), caps)
    assert (mx.abs(out - ref).max() / mx.abs(ref).max()).item() < 0.05
    with pytest.raises(ValueError, match="quantised"):
        export_weights(quantized)
    with pytest.raises(ModelError, match="4 or 8"):
        load_transformer(folder, quantize=3)


def test_bad_inputs_are_rejected_with_shapes():
    model = random_model()
    x, t, caps = inputs()
    with pytest.raises(ValueError, match="multiples of 2"):
        model(x[:, :, :5], t, caps)
    with pytest.raises(ValueError, match=r"x must be \(B, 16, H, W\)"):
        model(x[0], t, caps)
    with pytest.raises(ValueError, match="cap_feats"):
        model(x, t, caps[:1])
    with pytest.raises(ValueError, match="RoPE"):
        model(x, t, [caps[0], mx.zeros((300, 32))])
