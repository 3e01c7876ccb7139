"""Turn a recipe's `model:` value into a local diffusers-layout model folder.

Accepted: an existing folder; a preset (`z-image`, `z-image-turbo`); a Hugging Face repo id `org/name`,
looked up in the local Hugging Face cache only (no network here: the error says how to download);
`tiny`, a seeded random-weight model in the real layout, written into the cache on first use.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from zrecipe.errors import ModelError

PRESETS = {"z-image": "Tongyi-MAI/Z-Image", "z-image-turbo": "Tongyi-MAI/Z-Image-Turbo"}
TINY = "tiny"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files that determine a model's outputs: weights, configs / indexes, tokenizer vocab, merges and templates.
_IDENTITY_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".jinja"}


def default_cache_dir() -> Path:
    """Where `tiny` is written when no cache folder is given: $ZRECIPE_CACHE or ~/.cache/zrecipe."""
    return Path(os.environ.get("ZRECIPE_CACHE") or Path.home() / ".cache" / "zrecipe").expanduser()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache folder, honouring the same environment variables as huggingface_hub."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(home).expanduser() / "hub"


def resolve_model(spec: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local model folder for `spec` (folder, preset, repo id or `tiny`); ModelError when unavailable."""
    text = str(spec)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return _checked_model_folder(folder.resolve(), text)
    if text == TINY:
        return _tiny_model(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    repo_id = PRESETS.get(text, text)
    if _REPO_ID.match(repo_id):
        return _from_hf_cache(repo_id)
    presets = ", ".join(sorted(PRESETS))
    raise ModelError(
        f"model {text!r}: no such folder, and not a preset ({presets}, {TINY}) or a Hugging Face repo id "
        "(org/name). Pass a diffusers-layout model folder, a preset or a repo id."
    )


def _checked_model_folder(folder: Path, spec: str) -> Path:
    if (folder / "model_index.json").is_file() or (folder / "transformer").is_dir():
        return folder
    raise ModelError(
        f"model {spec!r}: {folder} is not a diffusers-layout model folder (no model_index.json and no "
        "transformer/ subfolder). Pass the folder that holds model_index.json."
    )


def _from_hf_cache(repo_id: str) -> Path:
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshot = _snapshot(repo)
    if snapshot is None:
        raise ModelError(
            f"model {repo_id} not found locally (looked in {repo}); run on a machine with network access to "
            f"download it (`huggingface-cli download {repo_id}`) or pass a model folder."
        )
    return _checked_model_folder(snapshot, repo_id)


def _snapshot(repo: Path) -> Path | None:
    """The snapshot that refs/main points to, else the only / most recently modified one."""
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    if ref.is_file():
        target = snapshots / ref.read_text().strip()
        if target.is_dir():
            return target
    candidates = [p for p in snapshots.iterdir() if p.is_dir()] if snapshots.is_dir() else []
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _tiny_model(cache_dir: Path) -> Path:
    """`<cache>/models/tiny-v<N>`, written once (create_tiny_model writes a temp folder and renames it)."""
    from zrecipe.models.z_image.tiny import TINY_VERSION, create_tiny_model

    target = cache_dir / "models" / f"{TINY}-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target

    try:
        create_tiny_model(target, seed=0)  # seed 0: every machine gets the same tiny model (stable keys)
    except ModelError:
        if not (target / "model_index.json").is_file():  # otherwise a concurrent build wrote it first
            raise
    return target


def model_weight_files(path: str | Path) -> list[Path]:
    """Every weight and config file of a model folder, sorted by relative path (the model's identity).

    With a model_index.json, only the component folders it lists are included (plus the index itself), so
    READMEs, sample images and other checkpoints in a repository do not change the identity.
    """
    root = Path(path)
    index = root / "model_index.json"
    if index.is_file():
        try:
            components = json.loads(index.read_text())
        except ValueError as exc:
            raise ModelError(f"{index}: invalid JSON ({exc}).") from exc
        folders = [
            root / name
            for name, value in components.items()
            if not name.startswith("_") and isinstance(value, list) and value and value[0] is not None
        ]
        files = [index] + [f for folder in folders if folder.is_dir() for f in _identity_files(folder)]
    else:
        files = _identity_files(root)
    if not files:
        raise ModelError(f"{root}: no weight or config files found; pass a diffusers-layout model folder.")
    return sorted(set(files), key=lambda f: f.relative_to(root).as_posix())


def _identity_files(folder: Path) -> list[Path]:
    return [
        f
        for f in folder.rglob("*")
        if f.suffix in _IDENTITY_SUFFIXES
        and f.is_file()
        and not any(part.startswith(".") for part in f.relative_to(folder).parts)
    ]
