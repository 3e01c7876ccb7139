"""An assistant LoRA: fused into the base model while a LoRA trains, absent from everything the run makes.

Z-Image-Turbo is step-distilled; a LoRA trained on it directly drifts away from the distillation within a
few hundred steps. A de-distillation ("training adapter") LoRA fused into the base during training takes
that drift, so the trained LoRA learns only the new concept, and Turbo keeps its few-step sampling once
the assistant is gone again (ai-toolkit's and mflux's approach). Here the assistant is fused into the
transformer's weights before the trained LoRA's layers wrap them (`fuse_assistant`); the adapter, its
checkpoints and exports hold the trained factors alone, and samples load the clean base, so nothing of
the assistant leaves the training process.

`training_loop.assistant_lora` names a .safetensors file or a Hugging Face file `org/repo:FILE` (`org/repo`
alone: its only .safetensors file), downloaded into the Hugging Face cache by a build (never by a plan).
The file's content hash is an input of the train key (`assistant_identity`); its path is not.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from zrecipe.errors import ModelError

IDENTITY_PREFIX = "lora:"


def assistant_identity(spec: str, stat_cache) -> tuple[Path, str]:
    """(local file, identity) of the assistant LoRA `spec`; the identity is its content hash."""
    path = resolve_assistant(spec)
    digest = stat_cache.hash_files([str(path)])[str(path)]
    return path, IDENTITY_PREFIX + digest


def resolve_assistant(spec: str) -> Path:
    """The local file of an assistant LoRA spec: an absolute path, or a Hub file found in the Hugging Face
    cache (downloaded when missing, unless offline or planning). ModelError (exit 2) when unavailable."""
    if os.path.isabs(spec):
        path = Path(spec)
        if not path.is_file():
            raise ModelError(
                f"training_loop.assistant_lora: {path} no longer exists; restore it or fix the recipe."
            )
        return path
    from zrecipe.models.z_image import hub
    from zrecipe.models.z_image.resolve import downloads_allowed

    repo_id, _, filename = spec.partition(":")
    cached = _cached(repo_id, filename or None)
    if cached is not None:
        return cached
    if hub.offline():
        raise ModelError(
            f"training_loop.assistant_lora: {spec} is not in the Hugging Face cache ({hub.hf_hub_cache()}) "
            "and HF_HUB_OFFLINE is set; go online once or give a local file."
        )
    if not downloads_allowed():
        raise ModelError(
            f"training_loop.assistant_lora: {spec} is not in the local Hugging Face cache yet. `zrecipe build` "
            "downloads it; planning never downloads (the file's content is part of the train key)."
        )
    return _download(repo_id, filename or None, spec)


def _cached(repo_id: str, filename: str | None) -> Path | None:
    """The file in the newest cached snapshot of `repo_id` (the repo's only .safetensors without a name)."""
    from zrecipe.models.z_image import hub

    repo = hub.repo_folder(repo_id)
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    if filename is not None:
        path = snapshot / filename
        return path if path.is_file() else None
    found = sorted(snapshot.rglob("*.safetensors")) if snapshot.is_dir() else []
    return found[0] if len(found) == 1 else None


def _download(repo_id: str, filename: str | None, spec: str) -> Path:
    from huggingface_hub import HfApi, hf_hub_download

    from zrecipe.models.z_image import hub

    try:
        if filename is None:
            files = [
                f
                for f in HfApi(endpoint=hub.endpoint()).list_repo_files(repo_id)
                if f.endswith(".safetensors")
            ]
            if len(files) != 1:
                raise ModelError(
                    f"training_loop.assistant_lora: {repo_id} holds {len(files)} .safetensors files "
                    f"({', '.join(files[:5]) or 'none'}); name one as {repo_id}:FILE."
                )
            filename = files[0]
        print(
            f"downloading the assistant LoRA {repo_id}:{filename} into {hub.hf_hub_cache()}", file=sys.stderr
        )
        path = hf_hub_download(repo_id, filename, cache_dir=str(hub.hf_hub_cache()), endpoint=hub.endpoint())
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 — every Hub failure becomes one message naming the file
        raise ModelError(
            f"training_loop.assistant_lora: cannot download {spec} ({type(exc).__name__}: {exc}). Check the "
            "repo and file name and the network (HF_TOKEN for a gated repo), or give a local file."
        ) from exc
    return Path(path)


def fuse_assistant(model: Any, path: str | Path, identity: str) -> list[str]:
    """Add the assistant LoRA at `path` (strength 1) into `model`'s Linear weights, one layer at a time
    (peak memory: one layer's fused copy); returns the changed module paths. The file must still have
    the content `identity` names (the train key's input): its bytes are checked, then read by the one
    LoRA reader. A quantised layer is dequantised, updated and re-quantised (`fuse_linear`)."""
    import tempfile

    import mlx.core as mx
    import xxhash
    from mlx.utils import tree_unflatten

    from zrecipe.errors import CheckpointError
    from zrecipe.export.lora_formats import lora_from_tensors
    from zrecipe.lora.delta import dense_weight, fuse_linear
    from zrecipe.lora.layers import linear_shapes

    path = Path(path)
    data = path.read_bytes()
    if IDENTITY_PREFIX + xxhash.xxh128_hexdigest(data) != identity:
        raise ModelError(
            f"{path}: the assistant LoRA changed since the build was planned; run the build again."
        )
    with tempfile.TemporaryDirectory() as scratch:  # MLX reads safetensors from a file: the checked bytes
        copy = Path(scratch) / "assistant.safetensors"
        copy.write_bytes(data)
        try:
            tensors, metadata = mx.load(str(copy), return_metadata=True)
            mx.eval(tensors)
        except Exception as exc:
            raise CheckpointError(f"{path}: not a readable safetensors LoRA ({exc}).") from exc
    lora = lora_from_tensors(tensors, metadata, str(path), linear_shapes(model))
    del tensors
    modules = dict(model.named_modules())
    for module_path, delta in sorted(lora.deltas.items()):
        layer = modules[module_path]
        base = dense_weight(layer) if delta.low_rank() is None else None  # DoRA-like kinds need W
        fused = fuse_linear(layer, delta.weight_delta(base))
        model.update_modules(tree_unflatten([(module_path, fused)]))
        mx.eval(fused.parameters())
    return sorted(lora.deltas)
