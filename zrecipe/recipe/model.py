"""The recipe's `model:` key: a base model, optionally with files per component.

    model: z-image                       # preset (z-image, z-image-turbo, tiny), org/name, or a folder
    model:
      base: z-image                      # configs, tokenizer, scheduler, and the components not given
      transformer: z_image_bf16.safetensors   # one file in any known naming, or a component folder
      text_encoder: qwen_3_4b.safetensors
      vae: ae.safetensors
    model: {base: z-image-turbo, mflux_save: ./z-image-turbo-4bit}   # an mflux-save folder (quantised too)

A value starting with `/`, `./`, `../`, `~` or `$`, or naming an existing folder (relative to the recipe),
is a folder and is made absolute; otherwise `org/name` is a repo id. Whether a base model is actually
there is checked when it is loaded (data steps can run on a machine without it); component files must
exist. The result is the canonical model spec string (`zrecipe.models.z_image.resolve.ModelSpec`), which
is also what the string form `model: "z-image,transformer=FILE"` and `--model` take.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zrecipe.recipe.fields import MISSING, Reader, describe, resolve_path, suggest, text
from zrecipe.recipe.schema import MODEL_PRESETS

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_PATH_PREFIXES = ("/", "./", "../", "~", "$", ".\\", "..\\")
COMPONENT_KEYS = ("transformer", "text_encoder", "vae")
MODEL_KEYS = ("base", *COMPONENT_KEYS, "mflux_save")
_WHAT = "a preset (z-image, z-image-turbo, tiny), a model folder or a Hugging Face repo id such as Tongyi-MAI/Z-Image"


def read_model(top: Reader, root: Path) -> Any:
    """The validated `model:` as a canonical spec string (MISSING, with problems recorded, when bad)."""
    from zrecipe.models.z_image.resolve import ModelSpec

    raw = top.data.get("model", MISSING)
    if isinstance(raw, Mapping):
        reader = Reader.open(top.ctx, ("model",), raw)
        reader.check_keys(MODEL_KEYS)
        base = reader.require("base", text(), _WHAT)
        given = {k: reader.data[k] for k in MODEL_KEYS[1:] if k in reader.data}
    else:
        value = top.require("model", text(), _WHAT)
        if value is MISSING:
            return MISSING
        base, given = _split(value)
    path = ("model", "base") if isinstance(raw, Mapping) else ("model",)
    base = MISSING if base is MISSING else _base(top, path, base, root)
    files = []
    for key, value in given.items():
        found = _component(top, ("model", key), key, value, root, top.data.get("mode"))
        if found is not None:
            files.append((key, str(found)))
    if base is MISSING or len(files) != len(given):
        return MISSING
    order = {k: i for i, k in enumerate(MODEL_KEYS)}
    return str(ModelSpec(base, tuple(sorted(files, key=lambda kv: order[kv[0]]))))


def _split(value: str) -> tuple[str, dict[str, str]]:
    """The string form `BASE,key=PATH,...` → (BASE, {key: PATH})."""
    base, *parts = re.split(r",(?=(?:" + "|".join(MODEL_KEYS[1:]) + r")=)", value)
    return base.strip(), dict(part.split("=", 1) for part in parts)


def _base(top: Reader, path: tuple, raw: str, root: Path) -> Any:
    if raw in MODEL_PRESETS:
        return raw
    looks_like_path = raw.startswith(_PATH_PREFIXES) or raw in (".", "..") or os.path.isabs(raw)
    if not looks_like_path and "\0" not in raw and os.path.isdir(os.path.join(root, raw)):
        looks_like_path = True
    if not looks_like_path:
        if _REPO_ID.fullmatch(raw):
            return raw
        hint = suggest(raw, MODEL_PRESETS)
        if hint and "/" not in raw:
            top.ctx.add(path, f"unknown model preset {raw!r}{hint} (or give a folder as ./{raw})")
            return MISSING
    folder = resolve_path(top.ctx, path, raw, root)
    return MISSING if folder is None else str(folder)


def _component(top: Reader, label: tuple, key: str, raw: Any, root: Path, mode: Any) -> Path | None:
    """An existing file or folder for `key`; None (and a problem) otherwise. A quantised transformer
    cannot be fully fine-tuned, so `mode` (the raw recipe value) is checked against it here."""
    from zrecipe.models.z_image.resolve import is_mflux_save
    from zrecipe.models.z_image.weights import stored_quantization

    if not isinstance(raw, str):
        top.ctx.add(label, f"expected a path, got {describe(raw)}")
        return None
    found = resolve_path(top.ctx, label, raw, root)
    if found is None:
        return None
    if key == "mflux_save":
        if not found.is_dir() or not is_mflux_save(found):
            top.ctx.add(
                label,
                f"{found} is not a folder written by mflux-save (no transformer/ index with mflux metadata)",
            )
            return None
        checked = [found / "transformer"]
    elif found.is_file():
        if found.suffix != ".safetensors":
            top.ctx.add(label, f"{found} is not a .safetensors file")
            return None
        checked = [found]
    elif found.is_dir():
        if not any(found.glob("*.safetensors")):
            top.ctx.add(label, f"{found} holds no .safetensors files")
            return None
        checked = [found]
    else:
        top.ctx.add(label, f"no such file: {found}")
        return None
    if mode == "full" and key in ("transformer", "mflux_save"):
        bits = stored_quantization(checked[0])
        if bits:
            top.ctx.add(
                label,
                f"{found} is quantised ({bits}-bit); a full fine-tune needs unquantised weights. Use mode: lora "
                "(LoRA over the quantised base) or an unquantised model",
            )
            return None
    return found
