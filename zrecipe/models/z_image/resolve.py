"""Turn a `model:` value into a local diffusers-layout model folder.

A model spec is a base model, optionally with files per component:

    tiny | z-image | z-image-turbo | org/name | /path/to/diffusers-folder
    BASE,transformer=FILE,text_encoder=FILE,vae=FILE,mflux_save=FOLDER

The base resolves, in order, as a local folder; the local Hugging Face cache (a complete snapshot); a
download with `huggingface_hub` (see `hub.py`; refused offline, and while planning). `tiny` is a seeded
random-weight model in the real layout, written once into the model cache. Component files (ComfyUI's
`z_image_bf16.safetensors`, `qwen_3_4b.safetensors`, `ae.safetensors`; a diffusers or mflux-save component
folder; an mflux-save folder for all three) replace the base's weights; the base gives the configs,
tokenizer and scheduler, and only those small files are downloaded for it. Such a model is assembled as a
folder of links (`assemble.py`), so every loader, and the model identity, see one diffusers-layout folder.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from zrecipe.errors import ModelError
from zrecipe.models.z_image import hub
from zrecipe.models.z_image.hub import WEIGHT_FOLDERS

PRESETS = {"z-image": "Tongyi-MAI/Z-Image", "z-image-turbo": "Tongyi-MAI/Z-Image-Turbo"}
TINY = "tiny"
COMPONENTS = WEIGHT_FOLDERS  # transformer, vae, text_encoder
SPEC_KEYS = ("transformer", "text_encoder", "vae", "mflux_save")  # the canonical order in a spec string
_SPLIT = re.compile(r",(?=(?:" + "|".join(SPEC_KEYS) + r")=)")
# Files that determine a model's outputs: weights, configs / indexes, tokenizer vocab, merges and templates.
_IDENTITY_SUFFIXES = {".safetensors", ".json", ".txt", ".model", ".jinja"}
# False while planning: a plan never downloads a model (see `no_downloads`).
_DOWNLOADS = contextvars.ContextVar("zrecipe_model_downloads", default=True)


@dataclass(frozen=True)
class ModelSpec:
    """A base model (preset, repo id, folder or `tiny`) and the component files that replace its weights.

    `files` holds (key, absolute path) pairs in `SPEC_KEYS` order; `str(spec)` is the canonical text form,
    which `parse` reads back (it is what recipes store and `--model` accepts)."""

    base: str
    files: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, spec: str | os.PathLike | ModelSpec, root: str | Path | None = None) -> ModelSpec:
        """Read a spec string; relative component paths resolve against `root` (default: the cwd)."""
        if isinstance(spec, ModelSpec):
            return spec
        text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
        base, *parts = _SPLIT.split(text)
        files = {}
        for part in parts:
            key, _, value = part.partition("=")
            if key in files:
                raise ModelError(f"model {text!r}: {key}= is given twice.")
            if not value:
                raise ModelError(f"model {text!r}: {key}= needs a path.")
            path = Path(os.path.expanduser(value))
            files[key] = os.path.abspath(path if path.is_absolute() else Path(root or os.getcwd()) / path)
        return cls(base.strip(), tuple((k, files[k]) for k in SPEC_KEYS if k in files))

    def __str__(self) -> str:
        return ",".join([self.base, *(f"{key}={path}" for key, path in self.files)])

    @property
    def sources(self) -> dict[str, Path]:
        """Component → file or folder replacing the base's weights (`mflux_save` expanded)."""
        found = dict(self.files)
        out: dict[str, Path] = {}
        if "mflux_save" in found:
            folder = Path(found.pop("mflux_save"))
            out = {c: folder / c for c in COMPONENTS}
        out.update({key: Path(path) for key, path in found.items()})
        return out


def model_cache_dir() -> Path:
    """Where zrecipe keeps models it makes itself (`tiny`, assembled component folders), whatever the
    store: $ZRECIPE_MODEL_CACHE, else `models/` under $ZRECIPE_CACHE or ~/.cache/zrecipe."""
    explicit = os.environ.get("ZRECIPE_MODEL_CACHE")
    return Path(explicit).expanduser() if explicit else default_cache_dir() / "models"


def default_cache_dir() -> Path:
    """zrecipe's own cache folder outside any store: $ZRECIPE_CACHE, else the per-user cache folder
    ($XDG_CACHE_HOME/zrecipe or ~/.cache/zrecipe)."""
    from zrecipe.cache_home import user_cache_folder

    explicit = os.environ.get("ZRECIPE_CACHE")
    return Path(explicit).expanduser() if explicit else user_cache_folder()


@contextlib.contextmanager
def no_downloads() -> Iterator[None]:
    """While active, a model that is not local raises (with the download size) instead of downloading."""
    token = _DOWNLOADS.set(False)
    try:
        yield
    finally:
        _DOWNLOADS.reset(token)


def downloads_allowed() -> bool:
    """False inside `no_downloads()` (while planning): a missing file must be reported, not fetched."""
    return _DOWNLOADS.get()


def resolve_model(spec: str | os.PathLike | ModelSpec, cache_dir: str | Path | None = None) -> Path:
    """A local diffusers-layout model folder for `spec`; ModelError (exit 2) when unavailable.

    `cache_dir` (the store) no longer decides anything: zrecipe's own models live in `model_cache_dir()`
    whatever the store, so every store shares one tiny model. It stays accepted for existing callers.
    """
    del cache_dir
    parsed = ModelSpec.parse(spec)
    sources = parsed.sources
    base = _resolve_base(parsed.base, str(parsed), weights=[c for c in COMPONENTS if c not in sources])
    if not sources:
        return base
    from zrecipe.models.z_image.assemble import assemble

    return assemble(base, sources, model_cache_dir() / "assembled", str(parsed))


def _resolve_base(text: str, spec: str, weights: list[str]) -> Path:
    folder = Path(text).expanduser()
    if folder.is_dir():
        return _checked_model_folder(folder.resolve(), text)
    if text == TINY:
        return _tiny_model(model_cache_dir())
    repo_id = PRESETS.get(text, text)
    if hub.is_repo_id(repo_id):
        return _from_hub(repo_id, spec, weights)
    presets = ", ".join(sorted(PRESETS))
    raise ModelError(
        f"model {text!r}: no such folder, and not a preset ({presets}, {TINY}) or a Hugging Face repo id "
        "(org/name). Pass a diffusers-layout model folder, a preset or a repo id."
    )


def _from_hub(repo_id: str, spec: str, weights: list[str]) -> Path:
    snapshot, problems = hub.cached_snapshot(repo_id, weights)
    if snapshot is not None:
        return _checked_model_folder(snapshot, repo_id)
    if hub.offline():
        raise ModelError(hub.offline_message(repo_id, problems))
    if not _DOWNLOADS.get():
        raise hub.not_downloaded(repo_id, spec, weights)
    return hub.download(repo_id, weights)


def _checked_model_folder(folder: Path, spec: str) -> Path:
    if (folder / "model_index.json").is_file() or (folder / "transformer" / "config.json").is_file():
        return folder
    if is_mflux_save(folder):
        raise ModelError(
            f"model {spec!r}: {folder} is an mflux-save folder, which holds no configs. Name its base model "
            f"too: `model: {{base: z-image, mflux_save: {folder}}}` (base z-image-turbo if it was saved from "
            "Turbo); on the command line `--model z-image,mflux_save=FOLDER`."
        )
    raise ModelError(
        f"model {spec!r}: {folder} is not a diffusers-layout model folder (no model_index.json and no "
        "transformer/config.json). Pass the folder that holds model_index.json."
    )


def is_mflux_save(folder: str | Path) -> bool:
    """Whether `folder` was written by `mflux-save` (its index jsons carry mflux's metadata)."""
    for index in Path(folder).glob("*/model.safetensors.index.json"):
        try:
            metadata = json.loads(index.read_text()).get("metadata") or {}
        except (OSError, ValueError, AttributeError):
            continue
        if "mflux_version" in metadata or "quantization_level" in metadata:
            return True
    return False


def _tiny_model(models: Path) -> Path:
    """`<model cache>/tiny-v<N>`, written once: create_tiny_model writes a temporary folder and renames it,
    so a reader sees the whole model or none, and of two processes creating it at once one rename wins."""
    from zrecipe.models.z_image.tiny import TINY_VERSION, create_tiny_model

    target = models / f"{TINY}-v{TINY_VERSION}"
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
