"""A diffusers-layout model folder made of links: a base model with some components' files replaced.

ComfyUI users have the components as single files in their original naming (`z_image_bf16.safetensors`,
`qwen_3_4b.safetensors`, `ae.safetensors`); `mflux-save` writes weight folders without configs. The
assembled folder links the base's `model_index.json`, scheduler, tokenizer and component configs, and the
given files in place of the base's weights. Every loader reads it like any model folder (each component's
`sanitize` understands the other naming schemes), and the model identity, which hashes file contents by
relative path, is the same as for the same files placed by hand.

A single weight file is linked under the diffusers name of its component, so its identity does not depend
on what the file was called. The folder's name is a hash of its links: one set of files, one folder. It
is written under a temporary name and renamed, so a reader never sees it half made.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import xxhash

from zrecipe.errors import ModelError

# What a single-file component is linked as: its diffusers file name.
SINGLE_FILE_NAMES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
SHARED = ("scheduler", "tokenizer")  # always the base's


def assemble(base: Path, sources: dict[str, Path], root: Path, spec: str) -> Path:
    """The folder under `root` that is `base` with `sources` (component → file or folder) swapped in."""
    links = plan_links(base, sources, spec)
    digest = xxhash.xxh3_128_hexdigest(json.dumps(sorted(links.items())).encode())
    target = root / digest
    if _intact(target, links):
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{digest}.tmp-{uuid.uuid4().hex}"
    try:
        for rel, source in links.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, tmp / rel)
        if target.exists():  # an older copy whose links no longer resolve: replace it
            shutil.rmtree(target, ignore_errors=True)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _intact(target, links):  # else a concurrent process made the same folder first
                raise
    except OSError as exc:
        raise ModelError(
            f"model {spec!r}: cannot write the assembled model folder {target} ({exc})."
        ) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def plan_links(base: Path, sources: dict[str, Path], spec: str) -> dict[str, str]:
    """{relative path: absolute source path} of the assembled folder; one error listing every problem."""
    from zrecipe.models.z_image.resolve import COMPONENTS

    links: dict[str, str] = {}
    problems: list[str] = []
    if (base / "model_index.json").is_file():
        links["model_index.json"] = os.path.abspath(base / "model_index.json")
    for name in SHARED:
        links.update(_tree(base, name))
    for component in COMPONENTS:
        source = sources.get(component)
        if source is None:
            links.update(_tree(base, component))
            continue
        own = source / "config.json" if source.is_dir() else None
        config = own if own is not None and own.is_file() else base / component / "config.json"
        if config.is_file():
            links[f"{component}/config.json"] = os.path.abspath(config)
        else:
            problems.append(
                f"{component}: the base model {base} has no {component}/config.json to go with it"
            )
        if source.is_file():
            if source.suffix != ".safetensors":
                problems.append(f"{component}: {source} is not a .safetensors file")
            links[f"{component}/{SINGLE_FILE_NAMES[component]}"] = os.path.abspath(source)
        elif source.is_dir():
            weights = sorted(source.glob("*.safetensors"))
            if not weights:
                problems.append(f"{component}: {source} holds no .safetensors files")
            for file in [*weights, *sorted(source.glob("*.safetensors.index.json"))]:
                links[f"{component}/{file.name}"] = os.path.abspath(file)
        else:
            problems.append(f"{component}: {source} does not exist")
    if problems:
        raise ModelError(f"model {spec!r}:\n  " + "\n  ".join(problems))
    return links


def _tree(base: Path, name: str) -> dict[str, str]:
    folder = base / name
    if not folder.is_dir():
        return {}
    return {
        f.relative_to(base).as_posix(): os.path.abspath(f)
        for f in sorted(folder.rglob("*"))
        if f.is_file() and not any(p.startswith(".") for p in f.relative_to(folder).parts)
    }


def _intact(folder: Path, links: dict[str, str]) -> bool:
    """Whether `folder` holds exactly these links, each still pointing at an existing file."""
    if not folder.is_dir():
        return False
    try:
        return all(
            os.readlink(folder / rel) == source and (folder / rel).is_file() for rel, source in links.items()
        )
    except OSError:
        return False
