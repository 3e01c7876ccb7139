"""Export a full fine-tune as a diffusers-layout model folder (diffusers, mflux and zrecipe load it), or
as one safetensors file in the original Z-Image naming (ComfyUI's `z_image_*.safetensors` layout).

The trained transformer is written as `transformer/diffusion_pytorch_model-0000i-of-0000N.safetensors`
shards plus `diffusion_pytorch_model.safetensors.index.json` (a single `diffusion_pytorch_model.safetensors`
when it fits one shard) and the base model's `config.json`. The other components (VAE, text encoder,
tokenizer, scheduler, model_index.json) are not trained, so they are hard-linked from the base model folder
(copied where links are impossible): a complete model folder at no extra disk cost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import mlx.core as mx

from zrecipe.errors import CheckpointError, ModelError, UserError
from zrecipe.export.lora_formats import DTYPES

WEIGHTS_NAME = "diffusion_pytorch_model"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # diffusers' default max_shard_size ("5GB")
_COPIED_COMPONENTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae")


def check_transformer_weights(weights: dict, base_model: str | Path, where: str) -> None:
    """Every key and shape must be those of the base model's transformer (a lazily built model: no memory)."""
    from mlx.utils import tree_flatten

    from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer
    from zrecipe.models.z_image.weights import read_config

    folder = Path(base_model) / "transformer"
    config = TransformerConfig.from_dict(read_config(folder), source=folder / "config.json")
    expected = {k: tuple(v.shape) for k, v in tree_flatten(ZImageTransformer(config).parameters())}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k])
    if missing or unexpected or misshaped:
        parts = [
            f"{name} ({len(keys)}): {', '.join(keys[:8])}"
            for name, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if keys
        ]
        raise CheckpointError(f"{where}: these transformer weights do not fit {folder}: " + "; ".join(parts))


def shard_plan(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Keys grouped into shards of at most `max_bytes` (a larger single tensor gets its own shard)."""
    shards: list[list[str]] = [[]]
    used = 0
    for key in sorted(sizes):
        if shards[-1] and used + sizes[key] > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    return shards


def write_transformer_folder(
    weights: dict,
    config_file: Path,
    folder: Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write `weights` as diffusers' transformer folder (config + shards + index); returns the files."""
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use bfloat16 or float32.")
    cast = {
        k: (v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()
    }
    sizes = {k: v.nbytes for k, v in cast.items()}
    shards = shard_plan(sizes, max_shard_bytes)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_file, folder / "config.json")
    files = []
    weight_map = {}
    for i, keys in enumerate(shards, start=1):
        name = (
            f"{WEIGHTS_NAME}.safetensors"
            if len(shards) == 1
            else f"{WEIGHTS_NAME}-{i:05d}-of-{len(shards):05d}.safetensors"
        )
        part = {k: cast[k] for k in keys}
        mx.eval(part)  # one shard materialised at a time
        mx.save_safetensors(str(folder / name), part, metadata={"format": "pt"})
        files.append(folder / name)
        weight_map.update({k: name for k in keys})
        del part
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": dict(sorted(weight_map.items())),
        }
        index_file = folder / f"{WEIGHTS_NAME}.safetensors.index.json"
        index_file.write_text(json.dumps(index, indent=2) + "\n")
        files.append(index_file)
    return files


def _link_or_copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        dst.mkdir(parents=True, exist_ok=True)
        for child in sorted(src.iterdir()):
            _link_or_copy(child, dst / child.name)
        return
    try:
        os.link(src.resolve(), dst)  # HF cache files are symlinks into blobs/: link the blob itself
    except OSError:
        shutil.copy2(src, dst)


def export_full_model(
    weights: dict,
    base_model: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    where: str = "weights",
) -> Path:
    """Write a complete diffusers-layout model folder at `out_dir` with the fine-tuned transformer.

    Built in a temporary sibling folder and renamed into place, so an interrupted export leaves nothing
    half-written. `out_dir` must not exist yet (or be empty).
    """
    base_model, out_dir = Path(base_model), Path(out_dir)
    if not (base_model / "transformer" / "config.json").is_file():
        raise ModelError(f"{base_model}: not a diffusers-layout model folder (no transformer/config.json).")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: already exists; pass a new folder with -o or remove it first.")
    check_transformer_weights(weights, base_model, where)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_transformer_folder(
            weights, base_model / "transformer" / "config.json", tmp / "transformer", dtype, max_shard_bytes
        )
        for name in _COPIED_COMPONENTS:
            if (base_model / name).exists():
                _link_or_copy(base_model / name, tmp / name)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def original_naming(weights: dict, config) -> dict:
    """diffusers-named transformer weights → the original Z-Image naming (fused `attention.qkv`,
    `attention.out`, `q_norm` / `k_norm`, `x_embedder`, `final_layer`): the inverse of the renames
    `ZImageTransformer.sanitize` reads, from the same tables."""
    from zrecipe.models.z_image.transformer import _FUSED_QKV, _INFIX_RENAMES, _PREFIX_RENAMES

    patch = f"{config.all_patch_size[0]}-{config.all_f_patch_size[0]}"
    out = {}
    for key, value in weights.items():
        for old, new in _INFIX_RENAMES.items():
            key = key.replace(new, old)
        for old, new in _PREFIX_RENAMES.items():
            if key.startswith(new.format(patch=patch)):
                key = old + key.removeprefix(new.format(patch=patch))
        out[key] = value
    for key in [k for k in out if ".attention.to_q." in k]:
        head, tail = key.split(".attention.to_q.")
        parts = [out.pop(f"{head}.attention.{name}.{tail}") for name in ("to_q", "to_k", "to_v")]
        out[f"{head}{_FUSED_QKV}{tail}"] = mx.concatenate(parts, axis=0)
    return out


def write_original_naming(weights: dict, config, path: str | Path, dtype: str = "bfloat16") -> Path:
    """The transformer as one safetensors file in the original naming (atomically)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use bfloat16 or float32.")
    path = Path(path)
    if path.exists():
        raise UserError(f"{path}: already exists; pass a new file with -o or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        k: (v.astype(DTYPES[dtype]) if mx.issubdtype(v.dtype, mx.floating) else v)
        for k, v in original_naming(weights, config).items()
    }
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}.safetensors"
    try:
        mx.eval(tensors)
        mx.save_safetensors(str(tmp), tensors, metadata={"format": "pt"})
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
