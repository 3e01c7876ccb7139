"""LoRA export formats, the generic reader and LoRA application on the tiny transformer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

from zrecipe.errors import CheckpointError, UserError
from zrecipe.export.apply import MultiLoRALinear, apply_loras, linear_shapes
from zrecipe.export.lora_formats import LoraDelta, read_lora, write_lora
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.training.lora import apply_lora, save_adapter

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("lora") / "tiny", seed=3)


@pytest.fixture()
def model(tiny):
    return load_transformer(tiny, dtype="float32")


def _rand(*shape, scale=0.1):
    return mx.array((RNG.standard_normal(shape) * scale).astype(np.float32))


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    """A zrecipe adapter written by training's own code, with non-zero B and two (rank, alpha) groups."""
    model = load_transformer(tiny, dtype="float32")
    targets = [
        SimpleNamespace(
            block_type="layers",
            start=0,
            end=2,
            layer_types=("attention.to_q", "attention.to_out.0", "feed_forward.w2", "adaLN_modulation.0"),
            rank=4,
            alpha=8.0,
        ),
        SimpleNamespace(
            block_type="context_refiner", start=0, end=1, layer_types=("feed_forward.w1",), rank=3, alpha=3.0
        ),
    ]
    paths = apply_lora(model, targets)
    for path, layer in model.named_modules():
        if path in paths:
            layer.lora_b = _rand(*layer.lora_b.shape)
    out = tmp_path_factory.mktemp("adapter") / "adapter.safetensors"
    save_adapter(model, out, {"base_model": "tiny", "recipe_hash": "abc123", "step": 42})
    return out


def _deltas(weights):
    return {p: np.array(d.delta()) for p, d in weights.deltas.items()}


@pytest.mark.parametrize("fmt", ["mflux", "comfyui", "diffusers", "kohya", "musubi", "zrecipe"])
def test_export_round_trip_preserves_delta_w(adapter, model, tmp_path, fmt):
    shapes = linear_shapes(model)
    source = read_lora(adapter, shapes)
    assert source.convention == "zrecipe" and len(source.deltas) == 9
    assert source.deltas["layers.0.attention.to_q"].scale == 2.0
    out = write_lora(source, tmp_path / f"{fmt}.safetensors", fmt, dtype="float32")
    back = read_lora(out, shapes)
    ref, got = _deltas(source), _deltas(back)
    assert set(got) == set(ref)
    for path in ref:
        np.testing.assert_allclose(got[path], ref[path], rtol=1e-6, atol=1e-7)
    _, meta = mx.load(str(out), return_metadata=True)
    assert meta["format"] == fmt and meta["base_model"] == "tiny" and meta["recipe_hash"] == "abc123"
    assert meta["step"] == "42" and meta["rank"] == "4" and meta["alpha"] == "8"
    assert set(json.loads(meta["targets"])) == set(ref)
    if fmt in ("kohya", "musubi"):
        assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8"
        assert meta["ss_network_module"] == "networks.lora"


def test_export_key_conventions_and_bf16(adapter, tmp_path):
    source = read_lora(adapter)
    keys = {}
    for fmt in ("mflux", "diffusers", "kohya", "musubi"):
        out = write_lora(source, tmp_path / f"{fmt}.safetensors", fmt)
        tensors = mx.load(str(out))
        keys[fmt] = set(tensors)
        assert tensors[sorted(k for k in tensors if "alpha" not in k)[0]].dtype == mx.bfloat16
    assert "diffusion_model.layers.0.attention.to_q.lora_A.weight" in keys["mflux"]
    assert "diffusion_model.layers.0.attention.to_q.alpha" in keys["mflux"]  # alpha 8 ≠ rank 4
    assert "diffusion_model.context_refiner.0.feed_forward.w1.alpha" not in keys["mflux"]  # alpha == rank
    assert "transformer.layers.1.attention.to_out.0.lora_B.weight" in keys["diffusers"]
    assert not any(k.endswith(".alpha") for k in keys["diffusers"])  # scale folded into lora_B
    # kohya: ComfyUI's names (attention.out; q/k/v fused: only to_q is trained here, k/v are zero padding).
    assert "lora_unet_layers_1_attention_out.lora_up.weight" in keys["kohya"]
    assert "lora_unet_layers_0_attention_qkv.lora_down.weight" in keys["kohya"]
    assert "lora_unet_layers_0_adaLN_modulation_0.alpha" in keys["kohya"]
    assert not any("to_q" in k or "to_out" in k for k in keys["kohya"])
    # musubi: musubi-tuner's split names.
    assert "lora_unet_layers_1_attention_to_out_0.lora_up.weight" in keys["musubi"]
    assert "lora_unet_layers_0_attention_to_q.lora_down.weight" in keys["musubi"]
    for fmt in ("kohya", "musubi"):
        back = read_lora(tmp_path / f"{fmt}.safetensors")
        assert set(back.deltas) == set(source.deltas)
        for path, d in source.deltas.items():
            np.testing.assert_allclose(
                np.array(back.deltas[path].delta()), np.array(d.delta()), rtol=2e-2, atol=2e-3
            )


def _save(path, tensors, metadata=None):
    mx.save_safetensors(str(path), tensors, metadata=metadata or {})
    return path


def _layer_out(model, path, x):
    return np.array(dict(model.named_modules())[path](x))


def _expected(model, path, x, delta):
    layer = dict(model.named_modules())[path]
    w = np.array(layer.weight) + delta
    return np.array(x) @ w.T + (np.array(layer.bias) if "bias" in layer else 0)


def test_foreign_mflux_aitoolkit_file_applies_with_alpha(model, tmp_path):
    a, b = _rand(2, 64), _rand(64, 2)
    a2, b2 = _rand(4, 64), _rand(256, 4)
    path = _save(
        tmp_path / "aitk.safetensors",
        {
            "diffusion_model.layers.1.attention.to_k.lora_A.weight": a,
            "diffusion_model.layers.1.attention.to_k.lora_B.weight": b,
            "diffusion_model.layers.1.attention.to_k.alpha": mx.array(1.0),
            "diffusion_model.noise_refiner.0.adaLN_modulation.0.lora_A.weight": a2,
            "diffusion_model.noise_refiner.0.adaLN_modulation.0.lora_B.weight": b2,
        },
    )
    x = _rand(3, 64, scale=1.0)
    want_k = _expected(model, "layers.1.attention.to_k", x, 0.5 * np.array(b) @ np.array(a))
    want_ada = _expected(model, "noise_refiner.0.adaLN_modulation.0", x, np.array(b2) @ np.array(a2))
    changed = apply_loras(model, [path], [1.0])
    assert changed == ["layers.1.attention.to_k", "noise_refiner.0.adaLN_modulation.0"]
    np.testing.assert_allclose(_layer_out(model, "layers.1.attention.to_k", x), want_k, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _layer_out(model, "noise_refiner.0.adaLN_modulation.0", x), want_ada, rtol=1e-5, atol=1e-5
    )


def test_foreign_diffusers_default_weight_with_peft_metadata(model, tmp_path):
    a, b = _rand(4, 170), _rand(64, 4)
    meta = {
        "lora_adapter_metadata": json.dumps(
            {"transformer.r": 4, "transformer.lora_alpha": 2, "transformer.target_modules": ["w2"]}
        )
    }
    path = _save(
        tmp_path / "peft.safetensors",
        {
            "transformer.layers.0.feed_forward.w2.lora_A.default.weight": a,
            "transformer.layers.0.feed_forward.w2.lora_B.default.weight": b,
        },
        meta,
    )
    lora = read_lora(path, linear_shapes(model))
    assert lora.convention == "diffusers"
    assert lora.deltas["layers.0.feed_forward.w2"].scale == 0.5


def test_foreign_kohya_names_resolve_against_model(model, tmp_path):
    pairs = {
        "lora_unet_layers_1_attention_to_out_0": ("layers.1.attention.to_out.0", 64, 64),
        "lora_unet_noise_refiner_0_adaLN_modulation_0": ("noise_refiner.0.adaLN_modulation.0", 64, 256),
        "lora_unet_context_refiner_0_feed_forward_w2": ("context_refiner.0.feed_forward.w2", 170, 64),
        "lora_unet_all_x_embedder_2-1": ("all_x_embedder.2-1", 64, 64),
        "lora_unet_t_embedder_mlp_0": ("t_embedder.mlp.0", 256, 1024),
    }
    tensors, want = {}, {}
    for i, (name, (path, din, dout)) in enumerate(pairs.items()):
        a, b = _rand(2, din), _rand(dout, 2)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
        tensors[f"{name}.alpha"] = mx.array(float(i + 1), dtype=mx.bfloat16)
        want[path] = (i + 1) / 2 * np.array(b) @ np.array(a)
    lora = read_lora(_save(tmp_path / "kohya.safetensors", tensors), linear_shapes(model))
    assert lora.convention == "kohya" and set(lora.deltas) == set(want)
    for path, delta in want.items():
        np.testing.assert_allclose(np.array(lora.deltas[path].delta()), delta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["original", "kohya", "dot"])
def test_fused_qkv_and_out_split_onto_q_k_v(model, tmp_path, style):
    a, b = _rand(3, 64), _rand(192, 3)
    ao, bo = _rand(2, 64), _rand(64, 2)
    if style == "original":
        names = ("diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.out")
        sfx = (".lora_A.weight", ".lora_B.weight")
    elif style == "kohya":
        names = ("lora_unet_layers_0_attention_qkv", "lora_unet_layers_0_attention_out")
        sfx = (".lora_down.weight", ".lora_up.weight")
    else:
        names = ("diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.to.out")
        sfx = (".lora.down.weight", ".lora.up.weight")
    tensors = {
        names[0] + sfx[0]: a,
        names[0] + sfx[1]: b,
        names[0] + ".alpha": mx.array(6.0),
        names[1] + sfx[0]: ao,
        names[1] + sfx[1]: bo,
    }
    lora = read_lora(_save(tmp_path / "qkv.safetensors", tensors), linear_shapes(model))
    assert set(lora.deltas) == {
        "layers.0.attention.to_q",
        "layers.0.attention.to_k",
        "layers.0.attention.to_v",
        "layers.0.attention.to_out.0",
    }
    full = 2.0 * np.array(b) @ np.array(a)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        np.testing.assert_allclose(
            np.array(lora.deltas[f"layers.0.attention.{name}"].delta()),
            full[64 * i : 64 * (i + 1)],
            rtol=1e-5,
            atol=1e-6,
        )


def test_unmatched_keys_reported_by_name(model, tmp_path):
    path = _save(
        tmp_path / "extra.safetensors",
        {
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": _rand(2, 64),
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": _rand(64, 2),
            "diffusion_model.layers.12.attention.to_q.lora_A.weight": _rand(
                2, 64
            ),  # the tiny model has 2 layers
            "diffusion_model.layers.12.attention.to_q.lora_B.weight": _rand(64, 2),
            "diffusion_model.something_else.weight": _rand(2),
        },
    )
    with pytest.raises(CheckpointError) as err:
        read_lora(path, linear_shapes(model))
    message = str(err.value)
    assert "3 key(s) match no layer" in message and "layers.12.attention.to_q.lora_A.weight" in message
    assert "something_else" in message and "--allow-unmatched" in message
    lora = read_lora(path, linear_shapes(model), allow_unmatched=True)
    assert list(lora.deltas) == ["layers.0.attention.to_q"] and len(lora.unmatched) == 3


def test_lora_for_another_model_is_refused(model, tmp_path):
    sdxl = _save(
        tmp_path / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": _rand(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": _rand(320, 4),
        },
    )
    with pytest.raises(CheckpointError, match="another model"):
        read_lora(sdxl, linear_shapes(model))
    big = _save(
        tmp_path / "big.safetensors",
        {  # real Z-Image sizes on the tiny model
            "diffusion_model.layers.0.attention.to_q.lora_A.weight": _rand(2, 3840),
            "diffusion_model.layers.0.attention.to_q.lora_B.weight": _rand(3840, 2),
        },
    )
    with pytest.raises(CheckpointError, match="3840"):
        read_lora(big, linear_shapes(model))
    with pytest.raises(CheckpointError, match="no LoRA tensors"):
        read_lora(_save(tmp_path / "plain.safetensors", {"layers.0.attention.to_q.weight": _rand(4, 4)}))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_lora(tmp_path / "junk.safetensors")


def test_several_loras_stack_with_scales_fused_or_not(tiny, tmp_path):
    path = "layers.0.feed_forward.w1"
    deltas = []
    for i in range(2):
        a, b = _rand(2 + i, 64), _rand(170, 2 + i)
        deltas.append((a, b))
        _save(
            tmp_path / f"l{i}.safetensors",
            {f"diffusion_model.{path}.lora_A.weight": a, f"diffusion_model.{path}.lora_B.weight": b},
        )
    files = [tmp_path / "l0.safetensors", tmp_path / "l1.safetensors"]
    x = _rand(5, 64, scale=1.0)
    base = load_transformer(tiny, dtype="float32")
    total = 0.7 * np.array(deltas[0][1]) @ np.array(deltas[0][0]) - 1.5 * np.array(deltas[1][1]) @ np.array(
        deltas[1][0]
    )
    want = _expected(base, path, x, total)
    unfused = load_transformer(tiny, dtype="float32")
    apply_loras(unfused, files, [0.7, -1.5])
    assert isinstance(dict(unfused.named_modules())[path], MultiLoRALinear)
    np.testing.assert_allclose(_layer_out(unfused, path, x), want, rtol=1e-5, atol=1e-5)
    fused = load_transformer(tiny, dtype="float32")
    apply_loras(fused, files, [0.7, -1.5], fuse=True)
    assert type(dict(fused.named_modules())[path]) is nn.Linear
    np.testing.assert_allclose(_layer_out(fused, path, x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="scale"):
        apply_loras(base, files, [1.0])


def test_apply_on_quantised_transformer(tiny, tmp_path):
    a, b = _rand(2, 64), _rand(64, 2)
    f = _save(
        tmp_path / "q.safetensors",
        {
            "diffusion_model.layers.0.attention.to_v.lora_A.weight": a,
            "diffusion_model.layers.0.attention.to_v.lora_B.weight": b,
        },
    )
    model = load_transformer(tiny, dtype="float32", quantize=8)
    assert linear_shapes(model)["layers.0.attention.to_v"] == (64, 64)
    layer = dict(model.named_modules())["layers.0.attention.to_v"]
    x = _rand(2, 64, scale=1.0)
    before = np.array(layer(x))
    apply_loras(model, [f])
    after = _layer_out(model, "layers.0.attention.to_v", x)
    np.testing.assert_allclose(
        after - before, np.array(x) @ (np.array(b) @ np.array(a)).T, rtol=1e-4, atol=1e-5
    )


def test_write_rejects_unknown_format_and_empty(tmp_path):
    d = {"layers.0.attention.to_q": LoraDelta(_rand(2, 4), _rand(4, 2), 1.0)}
    with pytest.raises(UserError, match="unknown LoRA format"):
        write_lora(d, tmp_path / "x.safetensors", "safetensors")
    with pytest.raises(UserError, match="nothing to export"):
        write_lora({}, tmp_path / "x.safetensors", "mflux")
