"""The one strict weight-loading path: safetensors folder → sanitize → load_weights.

Every model component loads through `read_weights` (single file or sharded with an index json; tensors are
memory-mapped lazily by `mx.load`) and `load_strict`, which lists every missing, unexpected or mis-shaped
key in one `ModelError` instead of failing on the first.
"""

from __future__ import annotations

import json
from pathlib import Path

from zrecipe.errors import ModelError


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


def read_config(folder: str | Path, name: str = "config.json") -> dict:
    """A component's config.json as a dict, with a clear error when missing or malformed."""
    path = Path(folder) / name
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: config file not found; is this a diffusers-layout model folder?") from exc
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc}).") from exc
