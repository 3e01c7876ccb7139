"""The tiny random-weight model: real on-disk layout, determinism, loading by zrecipe and by diffusers."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.errors import ModelError
from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.tokenizer import load_tokenizer
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.models.z_image.vae import load_vae

FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def digests(root: Path) -> dict:
    files = (p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def keys_of(file: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_layout_is_the_real_diffusers_layout(model):
    assert set(digests(model)) == FILES
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    scheduler = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert not scheduler["use_dynamic_shifting"]
    text_config = json.loads((model / "text_encoder" / "config.json").read_text())
    assert text_config["architectures"] == ["Qwen3ForCausalLM"] and text_config["model_type"] == "qwen3"
    transformer_config = json.loads((model / "transformer" / "config.json").read_text())
    assert transformer_config["cap_feat_dim"] == text_config["hidden_size"]
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    assert 2 ** (len(vae_config["block_out_channels"]) - 1) == 8  # the real spatial factor


def test_weight_files_have_checkpoint_naming(model):
    text = keys_of(model / "text_encoder" / "model.safetensors")
    assert all(k.startswith("model.") for k in text) and "lm_head.weight" not in text
    text_config = json.loads((model / "text_encoder" / "config.json").read_text())
    vocab = load_tokenizer(model).vocab_size
    assert text["model.embed_tokens.weight"] == [text_config["vocab_size"], 64]
    assert text_config["vocab_size"] >= vocab
    index = json.loads((model / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = {name: keys_of(model / "transformer" / name) for name in set(index["weight_map"].values())}
    assert len(shards) == 2 and all(shards.values())
    assert index["weight_map"] == {k: name for name, keys in shards.items() for k in keys}
    sizes = sum(int(np.prod(s)) * 4 for keys in shards.values() for s in keys.values())
    assert index["metadata"]["total_size"] == sizes
    assert "layers.1.attention.to_q.weight" in index["weight_map"] and "cap_pad_token" in index["weight_map"]
    vae = keys_of(model / "vae" / "diffusion_pytorch_model.safetensors")
    assert vae["encoder.conv_in.weight"] == [8, 3, 3, 3]  # PyTorch OIHW on disk


def test_same_seed_gives_byte_identical_files(model, tmp_path):
    again = create_tiny_model(tmp_path / "again", seed=0)
    assert digests(again) == digests(model)
    # In a fresh process too (the BPE trainer and hash seeds must not leak into the files).
    code = "from zrecipe.models.z_image.tiny import create_tiny_model as c; import sys; c(sys.argv[1])"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "proc")], check=True, env=env)
    assert digests(tmp_path / "proc") == digests(model)
    other = digests(create_tiny_model(tmp_path / "other", seed=1))
    changed = {k for k in other if other[k] != digests(model)[k]}
    assert changed == {k for k in FILES if k.endswith(".safetensors")}


def test_refuses_a_non_empty_folder_and_leaves_no_temp_files(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ModelError, match="not empty"):
        create_tiny_model(tmp_path / "busy")
    (tmp_path / "empty").mkdir()
    create_tiny_model(tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "empty"]


def test_a_concurrent_writer_that_finishes_first_wins(tmp_path, monkeypatch):
    from zrecipe.models.z_image import tiny

    target = tmp_path / "model"
    real_write_vae = tiny.write_vae

    def other_process_finishes_first(folder, seed, dtype):
        real_write_vae(folder, seed, dtype)
        target.mkdir()
        (target / "model_index.json").write_text("{}")

    monkeypatch.setattr(tiny, "write_vae", other_process_finishes_first)
    with pytest.raises(ModelError, match="not empty"):
        create_tiny_model(target)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the temp folder is gone
    assert (target / "model_index.json").read_text() == "{}"  # the winner's files are untouched


def test_loads_and_runs_with_zrecipe(model):
    tokenizer, text_encoder = load_tokenizer(model), load_text_encoder(model)
    pos, neg = encode_prompts(text_encoder, tokenizer, ["a red fox in the snow", ""])
    transformer, vae = load_transformer(model), load_vae(model)
    images = mx.random.uniform(-1, 1, (1, 32, 48, 3), key=mx.random.key(0))
    latents = vae.encode(images)
    assert latents.shape == (1, 4, 6, 16)
    x = latents.transpose(0, 3, 1, 2)
    out = transformer(mx.concatenate([x, x]), mx.array([0.3, 0.3]), [pos, neg])
    assert out.shape == (2, 16, 4, 6)
    assert np.isfinite(np.array(out)).all() and float(mx.abs(out[0] - out[1]).max()) > 1e-3
    decoded = vae.decode(latents)
    assert decoded.shape == (1, 32, 48, 3) and float(decoded.std()) > 1e-2


def test_bfloat16_files(tmp_path):
    root = create_tiny_model(tmp_path / "bf16", dtype="bfloat16")
    header = (root / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:4096]
    assert b'"BF16"' in header and b'"F32"' not in header
    assert load_text_encoder(root).model.norm.weight.dtype == mx.float32  # cast to the CPU default
    assert load_transformer(root, dtype="bfloat16").cap_pad_token.dtype == mx.bfloat16
    with pytest.raises(ModelError, match="dtype"):
        create_tiny_model(tmp_path / "f16", dtype="float16")


@pytest.mark.parity
def test_loads_with_diffusers_and_transformers(model):
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from safetensors.numpy import load_file

    pipe = diffusers.ZImagePipeline.from_pretrained(model)  # float32 by default
    assert type(pipe.text_encoder).__name__ == "Qwen3Model"
    assert type(pipe.transformer).__name__ == "ZImageTransformer2DModel" and pipe.vae_scale_factor == 8
    # Every tensor on disk landed in the torch modules (nothing missing, unexpected or re-initialised).
    text_file = load_file(str(model / "text_encoder" / "model.safetensors"))
    text = {k.removeprefix("model."): v for k, v in text_file.items()}
    transformer = {}
    for shard in sorted((model / "transformer").glob("*.safetensors")):
        transformer.update(load_file(str(shard)))
    vae = load_file(str(model / "vae" / "diffusion_pytorch_model.safetensors"))
    for module, weights in ((pipe.text_encoder, text), (pipe.transformer, transformer), (pipe.vae, vae)):
        state = {k: v.numpy() for k, v in module.state_dict().items()}
        assert set(state) == set(weights)
        for key, value in weights.items():
            np.testing.assert_array_equal(state[key], value, err_msg=key)
