"""Writing a safetensors file the one way: evaluated first, then written beside its destination and renamed
onto it, so a reader never sees half a file and a crash leaves the old file (or none), never a torn one."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from zrecipe.engine.files import atomic_path


def write_safetensors(
    path: str | Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None
) -> Path:
    """Write `tensors` (with string `metadata`) to `path` atomically; returns `path`."""
    path = Path(path)
    mx.eval(tensors)  # compute before the temp file exists: an error here leaves nothing behind
    with atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), tensors, metadata=metadata or {})
    return path
