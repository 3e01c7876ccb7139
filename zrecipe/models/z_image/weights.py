"""The one component loader: folder → config.json → module → sanitize → strict load_weights.

Every model component (transformer, VAE, text encoder) loads through `load_component`: it finds the
component folder (`component_folder`), resolves the compute dtype (`compute_dtype`), reads the weights
(`read_weights`: one file or shards with an index json, memory-mapped lazily by `mx.load`), lets the
module's `sanitize` rename them from whichever layout the file uses (diffusers, original / ComfyUI,
mflux-save), rebuilds layers that were saved quantised (`match_quantized_layers`), and loads them with
`load_strict`, which lists every missing, unexpected or mis-shaped key in one `ModelError`.
"""

from __future__ import annotations

import json
from pathlib import Path

from zrecipe.errors import ModelError

# Quantisations MLX can store in a QuantizedLinear / QuantizedEmbedding (affine mode: weight, scales, biases).
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
# How messages name each component folder.
COMPONENT_LABELS = {"transformer": "transformer", "vae": "VAE", "text_encoder": "text encoder"}


def component_folder(path: str | Path, name: str) -> Path:
    """`path/name` when `path` is a whole model folder, else `path` itself (a component folder)."""
    path = Path(path).expanduser()
    return path / name if (path / name).is_dir() else path


def compute_dtype(dtype, component: str):
    """An mx dtype, or a name / None resolved by `backend.resolve_dtype` (fp32 on CPU, bf16 on a GPU)."""
    from zrecipe.backend import resolve_dtype

    if dtype is None or isinstance(dtype, str):
        try:
            return resolve_dtype(dtype)
        except KeyError as exc:
            raise ModelError(
                f"unknown {component} dtype {dtype!r}; use float32, bfloat16 or float16."
            ) from exc
    return dtype


def load_component(path: str | Path, name: str, build, dtype=None):
    """Load one model component strictly; `build(config_dict, config_path)` makes the empty module.

    `path` is a model folder (with `name/`) or the component folder itself. The module's `sanitize`
    turns the file's key layout into the module's; layers stored quantised come back quantised.
    """
    folder = component_folder(path, name)
    module = build(read_config(folder), folder / "config.json")
    weights = module.sanitize(read_weights(folder))
    match_quantized_layers(module, weights, folder)
    load_strict(module, weights, folder, dtype=compute_dtype(dtype, COMPONENT_LABELS.get(name, name)))
    return module


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of one component folder (from the index json when there is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: model component folder not found; pass a diffusers-layout model folder.")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{indexes[0]}: unreadable safetensors index ({exc}).") from exc
        files = sorted({folder / name for name in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelError(
                f"{indexes[0]}: shard files listed in the index are missing: {', '.join(missing)}"
            )
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{folder}: no *.safetensors weight files found.")
    return files


def read_weights(folder: str | Path) -> dict:
    """All tensors of a component folder as a flat {key: mx.array} dict (lazy, memory-mapped)."""
    import mlx.core as mx

    weights: dict = {}
    for file in weight_files(folder):
        try:
            weights.update(mx.load(str(file)))
        except Exception as exc:  # mlx raises RuntimeError/ValueError on a damaged file
            raise ModelError(f"{file}: cannot read safetensors file ({exc}).") from exc
    return weights


def load_strict(module, weights: dict, where: str | Path, dtype=None) -> None:
    """Load `weights` (already sanitized) into `module`, reporting every key problem in one error.

    `dtype` casts floating-point tensors on the way in (None keeps the file's dtype).
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    expected = dict(tree_flatten(module.parameters()))
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(weights)
        if tuple(weights[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or misshaped:
        lines = [f"{where}: the weights do not match the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
                lines.append(f"  {title} ({len(items)}): " + "; ".join(shown))
        lines.append("  Check that the folder holds the matching model and that no shard is truncated.")
        raise ModelError("\n".join(lines))
    if dtype is not None:
        weights = {
            k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in weights.items()
        }
    module.load_weights(list(weights.items()), strict=True)


def match_quantized_layers(module, weights: dict, where: str | Path) -> None:
    """Make every layer whose weights were saved quantised (`<path>.scales` present) a quantised layer.

    Bits and group size are read off the stored shapes, as mflux does when it reloads an `mflux-save`
    folder: the packed weight is `in·bits/32` wide and the scales `in/group_size`. Every layer that cannot
    be rebuilt is reported in one error; stored keys that match no layer are left to `load_strict`.
    """
    from mlx import nn

    stored = {key.removesuffix(".scales") for key in weights if key.endswith(".scales")}
    if not stored:
        return
    settings, problems = {}, []
    for path, layer in module.named_modules():
        if path not in stored:
            continue
        weight = weights.get(f"{path}.weight")
        if not hasattr(layer, "to_quantized") or weight is None or weight.ndim != 2:
            problems.append(f"{path}: stored quantised, but this layer cannot be quantised")
            continue
        if f"{path}.biases" not in weights:
            problems.append(f"{path}: quantised without biases (only MLX's affine quantisation is supported)")
            continue
        in_dims = layer.weight.shape[-1]
        scales = weights[f"{path}.scales"].shape[-1]
        bits, group = weight.shape[-1] * 32 / in_dims, in_dims / max(scales, 1)
        if bits not in QUANT_BITS or group not in QUANT_GROUP_SIZES:
            problems.append(
                f"{path}: stored shapes {tuple(weight.shape)} / scales {scales} give {bits:g} bits in groups "
                f"of {group:g} for {in_dims} inputs, which is no MLX quantisation"
            )
            continue
        settings[path] = {"bits": int(bits), "group_size": int(group)}
    if problems:
        raise ModelError(
            f"{where}: quantised weights that do not fit the model:\n  "
            + "\n  ".join(problems)
            + "\n  Check that the folder was written by mflux-save for this model."
        )
    nn.quantize(module, class_predicate=lambda path, _: settings.get(path, False))


def stored_quantization(path: str | Path) -> int | None:
    """The bit width a component folder or file written by mflux-save declares, else None.

    mflux-save records `quantization_level` in its index json and in every shard's safetensors metadata;
    only the header is read here (no tensors), so recipes can check it cheaply."""
    path = Path(path)
    metadata: dict = {}
    if path.is_dir():
        try:
            metadata = json.loads((path / "model.safetensors.index.json").read_text()).get("metadata") or {}
        except (OSError, ValueError, AttributeError):
            metadata = {}
        shards = sorted(path.glob("*.safetensors"))
        if not metadata and shards:
            path = shards[0]
    if path.is_file():
        metadata = safetensors_metadata(path)
    level = str(metadata.get("quantization_level", "")).strip()
    return int(level) if level.isdigit() else None


def safetensors_metadata(file: str | Path) -> dict:
    """The `__metadata__` of a safetensors file's header ({} when unreadable or absent)."""
    try:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < (1 << 27) else {}
    except (OSError, ValueError):
        return {}
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def read_config(folder: str | Path, name: str = "config.json") -> dict:
    """A component's config.json as a dict, with a clear error when missing or malformed."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: config file not found; is this a diffusers-layout model folder?") from exc
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc}).") from exc
