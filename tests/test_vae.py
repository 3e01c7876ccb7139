"""The MLX AutoencoderKL without the PyTorch reference: config, key layout, loading, sanitize, tiling, latents."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.errors import ModelError
from zrecipe.models.z_image.vae import (
    AutoencoderKL,
    VAEConfig,
    _tiled,
    export_weights,
    from_model_latents,
    load_vae,
    sanitize,
    to_model_latents,
)

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "flux_vae_keys.txt"

# The FLUX.1 vae/config.json as shipped with Z-Image (extra keys included on purpose).
FLUX_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.30.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 2,
    "mid_block_add_attention": True,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def tiny_config(**overrides) -> dict:
    cfg = dict(FLUX_CONFIG, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8)
    cfg["down_block_types"] = ["DownEncoderBlock2D"] * 2
    cfg["up_block_types"] = ["UpDecoderBlock2D"] * 2
    cfg.update(overrides)
    return cfg


def random_checkpoint(config: dict, seed: int = 0) -> dict:
    """diffusers-layout float32 tensors (OIHW) for `config`, scaled to keep activations O(1)."""
    shapes = {k: v.shape for k, v in export_weights(AutoencoderKL(VAEConfig.from_dict(config))).items()}
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) >= 2:
            noise /= np.sqrt(np.prod(shape[1:]))
        elif key.endswith("bias"):
            noise *= 0.1
        else:
            noise = 1 + 0.1 * noise
        out[key] = mx.array(noise)
    return out


def write_vae(folder: Path, config: dict, weights: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), weights)
    return folder


def images(b: int, h: int, w: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).uniform(-1, 1, (b, h, w, 3)).astype(np.float32))


def test_flux_config_built_lazily_has_exactly_the_reference_keys_and_shapes():
    if not REFERENCE.is_file():
        pytest.skip("shared/reference not present beside the repository")
    reference = {}
    for line in REFERENCE.read_text().split("\n"):
        if line.strip():
            key, shape = line.split()
            reference[key] = tuple(int(s) for s in shape.split(","))
    # Parameters are created lazily by MLX and never evaluated here: only shapes are read.
    ours = {
        k: tuple(v.shape) for k, v in export_weights(AutoencoderKL(VAEConfig.from_dict(FLUX_CONFIG))).items()
    }
    assert ours == reference


def test_config_reads_every_field_and_rejects_unsupported_blocks():
    cfg = VAEConfig.from_dict(FLUX_CONFIG)
    assert cfg.block_out_channels == (128, 256, 512, 512) and cfg.downscale == 8
    assert (cfg.scaling_factor, cfg.shift_factor, cfg.latent_channels) == (0.3611, 0.1159, 16)
    assert not cfg.use_quant_conv and not cfg.use_post_quant_conv and cfg.sample_size == 1024
    with pytest.raises(ModelError, match="up_block_types.*AttnUpDecoderBlock2D"):
        VAEConfig.from_dict(
            tiny_config(up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"]), "x.json"
        )
    with pytest.raises(ModelError, match="norm_num_groups"):
        VAEConfig.from_dict(tiny_config(norm_num_groups=5))


def test_quant_convs_follow_the_config():
    names = set(export_weights(AutoencoderKL(VAEConfig.from_dict(tiny_config(use_quant_conv=True)))))
    assert "quant_conv.weight" in names and "post_quant_conv.weight" not in names
    model = AutoencoderKL(VAEConfig.from_dict(tiny_config(use_quant_conv=True, use_post_quant_conv=True)))
    mean, logvar = model.encode_with_logvar(images(1, 16, 24))
    assert mean.shape == logvar.shape == (1, 8, 12, 16)
    assert model.decode(mean).shape == (1, 16, 24, 3)


def test_no_mid_attention_has_no_attention_keys():
    model = AutoencoderKL(VAEConfig.from_dict(tiny_config(mid_block_add_attention=False)))
    assert not [k for k in export_weights(model) if "attentions" in k]
    assert model.encode(images(1, 8, 8)).shape == (1, 4, 4, 16)


def test_export_save_load_roundtrip_both_folder_layouts(tmp_path):
    config = tiny_config()
    weights = random_checkpoint(config)
    write_vae(tmp_path / "model" / "vae", config, weights)
    a = load_vae(tmp_path / "model")  # model folder
    b = load_vae(tmp_path / "model" / "vae")  # component folder
    for key, value in export_weights(a).items():
        assert mx.array_equal(value, weights[key]), key
    x = images(2, 16, 24)
    assert mx.array_equal(a.encode(x), b.encode(x))


def test_legacy_attention_names_and_1x1_conv_attention_load_the_same(tmp_path):
    config = tiny_config()
    weights = random_checkpoint(config, seed=1)
    legacy = {}
    for key, value in weights.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):  # as a 1×1 conv
                    value = value.reshape(*value.shape, 1, 1)
        legacy[key] = value
    assert sanitize(legacy).keys() == sanitize(weights).keys()
    new = load_vae(write_vae(tmp_path / "new", config, weights))
    old = load_vae(write_vae(tmp_path / "old", config, legacy))
    z = mx.array(np.random.default_rng(2).standard_normal((1, 4, 6, 16)).astype(np.float32))
    assert mx.array_equal(new.decode(z), old.decode(z))


def test_missing_and_misshaped_tensors_are_listed_in_one_error(tmp_path):
    config = tiny_config()
    weights = random_checkpoint(config)
    del weights["decoder.mid_block.attentions.0.to_k.bias"]
    weights["encoder.conv_out.weight"] = weights["encoder.conv_out.weight"][:5]
    weights["quant_conv.weight"] = mx.zeros((32, 32, 1, 1))
    with pytest.raises(ModelError) as err:
        load_vae(write_vae(tmp_path / "vae", config, weights))
    message = str(err.value)
    for fragment in (
        "decoder.mid_block.attentions.0.to_k.bias",
        "encoder.conv_out.weight",
        "quant_conv.weight",
    ):
        assert fragment in message


def test_model_latent_helpers_are_inverse_and_use_the_config():
    cfg = VAEConfig.from_dict(FLUX_CONFIG)
    mean = mx.array(np.random.default_rng(0).standard_normal((1, 4, 4, 16)).astype(np.float32))
    scaled = to_model_latents(mean, cfg)
    assert np.allclose(np.array(scaled), (np.array(mean) - 0.1159) * 0.3611, atol=1e-6)
    assert np.allclose(np.array(from_model_latents(scaled, cfg)), np.array(mean), atol=1e-5)
    no_shift = VAEConfig.from_dict(tiny_config(shift_factor=None, scaling_factor=0.5))
    assert np.allclose(np.array(to_model_latents(mean, no_shift)), np.array(mean) * 0.5)


def test_tiling_stitches_local_operations_exactly():
    # A purely local op has no tile-boundary effects, so any misplaced, mis-cropped or mis-weighted tile shows.
    x = images(2, 40, 72, seed=3)  # 10×18 units of 4 px: several rows and columns, ragged last tiles

    def pool(t):  # encoder-like: 4 px → 1 unit
        b, h, w, c = t.shape
        return t.reshape(b, h // 4, 4, w // 4, 4, c).mean(axis=(2, 4))

    pooled = _tiled(pool, x, t=8, in_unit=4, out_unit=1)
    assert pooled.shape == (2, 10, 18, 3)
    assert mx.allclose(pooled, pool(x), atol=1e-6)

    def upsample(t):  # decoder-like: 1 unit → 4 px, with a per-position pattern
        return mx.repeat(mx.repeat(t * 2 + 1, 4, axis=1), 4, axis=2)

    up = _tiled(upsample, x, t=8, in_unit=1, out_unit=4)
    assert up.shape == (2, 160, 288, 3)
    assert mx.allclose(up, upsample(x), atol=1e-6)


def test_tiled_vae_is_close_to_untiled_and_improves_with_tile_size():
    # With random weights GroupNorm statistics (and attention, disabled here) are per tile and receptive
    # fields are wide, so tiling is not exact; the error must shrink as tiles grow. Measured relative mean
    # abs difference for 32 / 64 / 128 px tiles: encode 0.18 / 0.070 / 0.031, decode 0.29 / 0.095 / 0.044.
    config = tiny_config(block_out_channels=[16, 16], mid_block_add_attention=False)
    model = AutoencoderKL(VAEConfig.from_dict(config))
    model.load_weights(list(sanitize(random_checkpoint(config, seed=4)).items()))
    x = images(1, 32, 160, seed=5)
    mean = model.encode(x)
    dec = model.decode(mean)

    def rel(a, b):
        return float(mx.abs(a - b).mean() / mx.abs(b).mean())

    errors = [
        (rel(model.encode(x, tile=t), mean), rel(model.decode(mean, tile=t), dec)) for t in (32, 64, 128)
    ]
    for smaller, larger in itertools.pairwise(errors):
        assert larger[0] < smaller[0] and larger[1] < smaller[1]
    assert errors[-1][0] < 0.05 and errors[-1][1] < 0.07
    # A tile at least as large as the input is the untiled path.
    assert mx.array_equal(model.encode(x, tile=160), mean)
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(x, tile=20)
    with pytest.raises(ValueError, match="multiple of 2 pixels"):
        model.encode(images(1, 32, 161), tile=32)


def test_bfloat16_load_stays_close_to_float32(tmp_path):
    config = tiny_config()
    folder = write_vae(tmp_path / "vae", config, random_checkpoint(config, seed=6))
    f32, bf16 = load_vae(folder, dtype="float32"), load_vae(folder, dtype=mx.bfloat16)
    assert bf16.decoder.conv_in.weight.dtype == mx.bfloat16
    assert load_vae(folder).decoder.conv_in.weight.dtype == (
        mx.float32 if mx.default_device() == mx.cpu else mx.bfloat16
    )
    with pytest.raises(ModelError, match="unknown VAE dtype 'fp8'"):
        load_vae(folder, dtype="fp8")
    x = images(1, 16, 24, seed=7)
    a, b = f32.encode(x), bf16.encode(x)
    assert b.dtype == mx.bfloat16
    # Measured 0.011 (encode) and 0.013 (decode) max relative error.
    assert float(mx.abs(a - b.astype(mx.float32)).max() / mx.abs(a).max()) < 0.04
    da, db = f32.decode(a), bf16.decode(a)
    assert float(mx.abs(da - db.astype(mx.float32)).max() / mx.abs(da).max()) < 0.04
