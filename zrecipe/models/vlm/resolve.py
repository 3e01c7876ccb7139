"""A captioning model (`captions.generate.model`) → a local Hugging Face model folder, and its identity.

    tiny-vlm | org/name | /path/to/folder

resolved as the base model is (`zrecipe.models.z_image.resolve`): a local folder; the local Hugging Face
cache (a complete snapshot); a download with `huggingface_hub` (refused offline and while planning).
`tiny-vlm` is a seeded random-weight Qwen2-VL written once into the model cache. A folder is checked to be
a vision-language model before anything loads it: a `config.json` with a `model_type` and a
`vision_config` (a text-only model, a Z-Image pipeline folder and a config that asks to run code from the
folder, `model_file`, are refused with what to pass instead).

The identity (an input of every caption key) is the content of the model's weight, config, tokenizer and
template files, by their path in the folder, hashed through the stat cache; `tiny-vlm`'s is its generator
version, so planning never has to create it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import xxhash

from zrecipe.errors import ModelError
from zrecipe.models.vlm.tiny import TINY_VLM, TINY_VLM_VERSION

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The repo files a captioning model needs: top-level configs, tokenizer and template files, weights (no
# variant copies such as `model.fp16.safetensors`, no subfolders, no READMEs or sample images).
_FILES = re.compile(r"^[^/]+\.(json|txt|model|jinja|tiktoken)$|^[^/.]+(-\d+-of-\d+)?\.safetensors$")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer.tiktoken")
_EXAMPLE = "Qwen/Qwen2-VL-2B-Instruct"


def resolve_vlm(spec: str) -> Path:
    """The local folder of captioning model `spec`; ModelError (exit 2) when unavailable or not a VLM."""
    from zrecipe.models.z_image import hub
    from zrecipe.models.z_image.resolve import _DOWNLOADS, model_cache_dir

    if spec == TINY_VLM:
        from zrecipe.models.vlm.tiny import tiny_vlm_folder

        return tiny_vlm_folder(model_cache_dir())
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return check_vlm_folder(folder.resolve(), spec)
    if not _REPO_ID.match(spec):
        raise ModelError(
            f"captioning model {spec!r}: no such folder, and not {TINY_VLM} or a Hugging Face repo id "
            f"(org/name, e.g. {_EXAMPLE}). Fix `captions.generate.model`."
        )
    snapshot, problems = hub.cached_snapshot(spec, layout=LAYOUT)
    if snapshot is not None:
        return check_vlm_folder(snapshot, spec)
    if hub.offline():
        state = (
            f"its cached snapshot is incomplete (missing {', '.join(problems[:5])})"
            if problems
            else "it is not in the local Hugging Face cache"
        )
        raise ModelError(
            f"captioning model {spec}: {state} ({hub.repo_folder(spec)}), and downloads are off "
            "(HF_HUB_OFFLINE / --offline). Build once with network access, or pass a local model folder."
        )
    if not _DOWNLOADS.get():
        size = hub.download_size(spec, layout=LAYOUT)
        what = f" ({size[0]} files, {hub._gb(size[1])})" if size else ""
        raise ModelError(
            f"captioning model {spec}: not in the local Hugging Face cache ({hub.repo_folder(spec)}) yet. "
            f"`zrecipe build` or `zrecipe caption` downloads it{what}. Planning never downloads: the model's "
            "identity (the hash of its files) is part of the caption keys."
        )
    return check_vlm_folder(hub.download(spec, layout=LAYOUT), spec)


def check_vlm_folder(folder: Path, spec: str) -> Path:
    """`folder` when it holds a vision-language model's config, weights and tokenizer; else ModelError."""
    config_file = folder / "config.json"
    where = f"captioning model {spec!r} ({folder})"
    if not config_file.is_file():
        if (folder / "model_index.json").is_file():
            raise ModelError(
                f"{where}: a diffusers pipeline, not a vision-language model. Use a captioning model such as "
                f"{_EXAMPLE} or {TINY_VLM}."
            )
        raise ModelError(f"{where}: no config.json; pass the folder of a Hugging Face vision-language model.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file}: unreadable config ({exc}); re-download the model.") from exc
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f"{config_file}: no `model_type`; this is not a Hugging Face model config.")
    if config.get("model_file"):
        raise ModelError(
            f"{config_file}: asks to run Python code from the model folder (`model_file`), which zrecipe "
            "never does. Use a model that mlx-vlm supports natively."
        )
    if not isinstance(config.get("vision_config"), dict):
        raise ModelError(
            f"{where}: model_type {config['model_type']!r} has no vision_config: a text-only model, not a "
            f"vision-language model. Use a captioning model such as {_EXAMPLE}."
        )
    problems = vlm_snapshot_problems(folder)
    if problems:
        raise ModelError(f"{where}: incomplete, missing {', '.join(problems[:5])}; re-download the model.")
    return folder


def vlm_snapshot_problems(folder: Path) -> list[str]:
    """What keeps `folder` from being a complete captioning model (config, tokenizer, weights)."""
    problems = [] if (folder / "config.json").is_file() else ["config.json"]
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        problems.append("tokenizer.json")
    from zrecipe.models.z_image.hub import missing_weights

    return problems + missing_weights(folder)


def vlm_files(listing: Iterable[str]) -> list[str]:
    """The files of a repo listing that a captioning model needs, sorted."""
    return sorted(f for f in listing if _FILES.match(f))


def _unusable(wanted: list[str]) -> str | None:
    if "config.json" in wanted and any(f.endswith(".safetensors") for f in wanted):
        return None
    return (
        "the repo has no config.json or no safetensors weights at its top level, so it is not a Hugging Face "
        f"vision-language model mlx-vlm can load. Use one such as {_EXAMPLE}."
    )


def _layout():
    from zrecipe.models.z_image.hub import RepoLayout

    return RepoLayout(select=vlm_files, problems=vlm_snapshot_problems, unusable=_unusable)


LAYOUT = _layout()


def vlm_identity(spec: str, stat_cache) -> str:
    """The content identity of captioning model `spec` (resolving it: a plan never downloads)."""
    if spec == TINY_VLM:
        return f"{TINY_VLM}-v{TINY_VLM_VERSION}"
    from zrecipe.models.z_image.resolve import model_weight_files

    root = resolve_vlm(spec)
    files = model_weight_files(root)
    hashes = stat_cache.hash_files([str(f) for f in files])
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\t{hashes[str(f)]}\n".encode())
    return f"vlm:{h.hexdigest()}"
