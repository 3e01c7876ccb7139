"""Writers of the model files people actually have, for tests: the tiny model's weights re-saved in the
ComfyUI / original naming and as `mflux-save` writes them. Written from the naming rules of the real
files (read in ComfyUI, diffusers' single-file loader and mflux 0.24), independently of zrecipe's own
`sanitize` code, so a round trip through them tests the loaders.

- transformer, original (`z_image_bf16.safetensors`): `x_embedder`, `final_layer`, fused `attention.qkv`
  (q, k, v stacked on the output axis), `attention.out`, `attention.q_norm` / `k_norm`.
- VAE, original BFL naming (`ae.safetensors`): `encoder.down.{i}.block.{j}`, `downsample.conv`,
  `decoder.up.{L-1-i}` (numbered from the output end), `mid.block_1/2`, `mid.attn_1.{norm,q,k,v,proj_out}`
  with 1×1-conv attention weights, `norm_out`, `nin_shortcut`; PyTorch OIHW convs.
- text encoder, ComfyUI (`qwen_3_4b.safetensors`): transformers' Qwen3ForCausalLM names (`model.` prefix).
- mflux-save: per component `<i>.safetensors` shards + `model.safetensors.index.json`, metadata
  `quantization_level` and `mflux_version`; mflux module names (`t_embedder.linear1/2`, the final layer's
  modulation at index 0, VAE `conv_in.conv2d` / `conv_in.conv` / `conv_norm_out.norm`, the text encoder
  without `model.` and with `rotary_emb.inv_freq`); MLX layouts (OHWI convs); quantised layers as MLX
  affine triplets `weight` (uint32), `scales`, `biases`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from safetensors.numpy import load_file, save_file


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


# -- transformer ---------------------------------------------------------------------------------------


def original_transformer(weights: dict[str, np.ndarray], prefix: str = "") -> dict[str, np.ndarray]:
    """diffusers keys → the original Z-Image / ComfyUI naming."""
    out = {}
    for key, value in weights.items():
        if re.search(r"\.attention\.to_[kv]\.weight$", key):
            continue
        if m := re.match(r"^(.*)\.attention\.to_q\.weight$", key):
            head = m.group(1)
            parts = [weights[f"{head}.attention.to_{n}.weight"] for n in "qkv"]
            out[f"{head}.attention.qkv.weight"] = np.concatenate(parts, axis=0)
            continue
        key = re.sub(r"^all_x_embedder\.[^.]+\.", "x_embedder.", key)
        key = re.sub(r"^all_final_layer\.[^.]+\.", "final_layer.", key)
        key = key.replace(".attention.to_out.0.", ".attention.out.")
        key = key.replace(".attention.norm_q.", ".attention.q_norm.").replace(
            ".attention.norm_k.", ".attention.k_norm."
        )
        out[key] = value
    out["norm_final.weight"] = np.ones((1,), np.float32)  # present in some original files, unused
    return {prefix + k: v for k, v in out.items()}


def mflux_transformer(weights: dict) -> dict:
    out = {}
    for key, value in weights.items():
        key = key.replace("t_embedder.mlp.0.", "t_embedder.linear1.").replace(
            "t_embedder.mlp.2.", "t_embedder.linear2."
        )
        if key.startswith("all_final_layer."):
            key = key.replace(".adaLN_modulation.1.", ".adaLN_modulation.0.")
        out[key] = value
    return out


# -- VAE -----------------------------------------------------------------------------------------------


def original_vae(weights: dict[str, np.ndarray], levels: int) -> dict[str, np.ndarray]:
    """diffusers keys → the BFL `ae.safetensors` naming (1×1-conv attention, PyTorch layouts)."""
    rules = [
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"encoder.down.{m[1]}.block.{m[2]}."),
        (
            r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.",
            lambda m: f"encoder.down.{m[1]}.downsample.conv.",
        ),
        (
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.",
        ),
        (
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.conv.",
        ),
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", lambda m: f"{m[1]}.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", lambda m: f"{m[1]}.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", lambda m: f"{m[1]}.mid.attn_1.norm."),
        (
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.",
            lambda m: f"{m[1]}.mid.attn_1.{m[2]}.",
        ),
        (
            r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.",
            lambda m: f"{m[1]}.mid.attn_1.proj_out.",
        ),
        (r"^(encoder|decoder)\.conv_norm_out\.", lambda m: f"{m[1]}.norm_out."),
        (r"\.conv_shortcut\.", lambda m: ".nin_shortcut."),
    ]
    out = {}
    for key, value in weights.items():
        for pattern, make in rules:
            key = re.sub(pattern, make, key)
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # BFL stores attention projections as 1×1 convs
        out[key] = value
    return out


def mflux_vae(weights: dict) -> dict:
    """diffusers keys (PyTorch layouts) → mflux-save's VAE names and MLX (OHWI) layouts."""
    renames = {
        "encoder.conv_in.": "encoder.conv_in.conv2d.",
        "encoder.conv_out.": "encoder.conv_out.conv2d.",
        "encoder.conv_norm_out.": "encoder.conv_norm_out.norm.",
        "decoder.conv_in.": "decoder.conv_in.conv.",
        "decoder.conv_out.": "decoder.conv_out.conv.",
        "decoder.conv_norm_out.": "decoder.conv_norm_out.norm.",
    }
    out = {}
    for key, value in weights.items():
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
        out[key] = np.ascontiguousarray(value.transpose(0, 2, 3, 1)) if value.ndim == 4 else value
    return out


# -- text encoder --------------------------------------------------------------------------------------


def mflux_text_encoder(weights: dict, head_dim: int, theta: float) -> dict:
    out = {k.removeprefix("model."): v for k, v in weights.items()}
    out["rotary_emb.inv_freq"] = (
        1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    ).astype(np.float32)
    return out


# -- mflux-save folders --------------------------------------------------------------------------------


def quantize_like_mflux(module: nn.Module, bits: int, group_size: int = 64) -> None:
    """What mflux does with `-q`: quantise every Linear / Embedding (here: whose input width allows it)."""
    nn.quantize(
        module,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % group_size == 0,
    )


def write_mflux_component(folder: Path, weights: dict, bits: int | None, shards: int = 2) -> None:
    """`<i>.safetensors` shards and the index json, as mflux's ModelSaver writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"quantization_level": str(bits), "mflux_version": "0.24.0"}
    keys = list(weights)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        part = {k: mx.array(weights[k]) for k in keys[i * per : (i + 1) * per]}
        if part:
            mx.save_safetensors(str(folder / f"{i}.safetensors"), part, meta)
            weight_map.update({k: f"{i}.safetensors" for k in part})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": meta, "weight_map": weight_map})
    )


def module_weights(module: nn.Module) -> dict[str, mx.array]:
    return dict(tree_flatten(module.parameters()))


def save_single(file: Path, weights: dict[str, np.ndarray]) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(file), metadata={"format": "pt"})
    return file
