"""The `datasets:` list, caption sources, bucketing, and the seed format's `examples:` block.

Caption sources (`captions:` of a dataset):

    captions: sidecar                          # default: <image stem>.txt next to each image
    captions: {extension: .caption}            # sidecar files with another extension
    captions: filename                         # the image's file stem
    captions: {manifest: captions.jsonl}       # .jsonl or .csv; `file`/`image` + `caption`/`prompt`
    captions: {inline: [{image: a.jpg, caption: "a cat"}]}
    captions: {template: "photo of {trigger}, {caption}"}   # formatted over the sidecar caption
    captions:                                  # a vision-language model captions the images
      generate: {model: Qwen/Qwen2-VL-2B-Instruct, prompt: "Describe ...", max_tokens: 96}
      prefer: sidecar                          # or `generated`; human captions: sidecar (default),
      manifest: captions.jsonl                 #   `manifest:` or `inline:`; `template:` formats all

Loss masks (`masks:` of a dataset) and weight:

    masks: {alpha: true}                       # each image's alpha channel
    masks: {folder: masks/, unmasked_weight: 0.1}   # masks/<same relative path and stem>.<any image ext>
    loss_weight: 2.0                           # this dataset's items count twice in the loss

A template may use `{trigger}`, `{caption}` (the sidecar caption, read with `extension`) and `{filename}`
(the image stem); one without `{caption}` needs no caption files. Manifest paths resolve against the
recipe's folder; inline image paths are relative to the dataset folder.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from zrecipe.recipe.fields import (
    MISSING,
    Bad,
    Context,
    KeyPath,
    Reader,
    boolean,
    describe,
    integer,
    number,
    resolve_path,
    suggest,
    text,
    written_as_path,
)
from zrecipe.recipe.schema import (
    BUCKET_STEP,
    CAPTION_KINDS,
    CAPTION_MODEL_PRESETS,
    CAPTION_PREFER,
    MANIFEST_SUFFIXES,
    MASK_SOURCES,
    MAX_CAPTION_TOKENS,
    MAX_LOSS_WEIGHT,
    MAX_SIDE,
    MIN_RESOLUTION,
    ON_ERROR,
    TEMPLATE_FIELDS,
    Bucketing,
    CaptionSource,
    Dataset,
    GeneratedCaptions,
    Masks,
)

DATASET_KEYS = (
    "name",
    "path",
    "captions",
    "repeats",
    "resolution",
    "bucketing",
    "upscale",
    "recursive",
    "trigger",
    "caption_dropout",
    "on_error",
    "loss_weight",
    "masks",
)
RESOLUTION = integer(min=MIN_RESOLUTION, max=MAX_SIDE, multiple_of=BUCKET_STEP)
_SPECS = {
    "repeats": integer(min=1),
    "resolution": RESOLUTION,
    "upscale": boolean(),
    "recursive": boolean(),
    "trigger": text(nullable=True),
    "caption_dropout": number(ge=0.0, lt=1.0),
    "on_error": text(choices=ON_ERROR),
    "loss_weight": number(gt=0.0, le=MAX_LOSS_WEIGHT),
}


def read_datasets(ctx: Context, value: Any, root: Path) -> list[tuple[KeyPath, Dataset]]:
    """(key path, dataset) for every valid dataset of the `datasets:` list (problems recorded for the
    others)."""
    if value is MISSING or value is None:
        return []
    if not isinstance(value, (list, tuple)):
        ctx.add(("datasets",), f"expected a list of datasets (`- path: FOLDER`), got {describe(value)}")
        return []
    out = []
    for i, item in enumerate(value):
        reader = Reader.open(ctx, ("datasets", i), item)
        if reader is not None:
            dataset = _read_dataset(reader, root)
            if dataset is not None:
                out.append((("datasets", i), dataset))
    return out


def _read_dataset(r: Reader, root: Path) -> Dataset | None:
    r.check_keys(DATASET_KEYS)
    before = r.ctx.count
    folder = read_folder(r, "path", root)
    kwargs = r.fill(_SPECS)
    name = r.get("name", text())
    # An invalid trigger is already reported: MISSING keeps the template check from repeating it.
    trigger = kwargs.get("trigger", MISSING if r.has("trigger") else None)
    value = r.data.get("captions", MISSING)
    captions = read_captions(r.ctx, r.path + ("captions",), value, root, trigger, folder)
    bucketing = _read_bucketing(r)
    masks = _read_masks(r, root, folder, kwargs.get("recursive", Dataset.recursive))
    if r.ctx.count > before or folder is None:
        return None
    return Dataset(
        name=(folder.name or str(folder)) if name is MISSING else name,
        path=folder,
        captions=captions,
        bucketing=bucketing,
        masks=masks,
        **kwargs,
    )


def read_folder(r: Reader, key: str, root: Path) -> Path | None:
    """A required dataset folder that must exist."""
    if not r.has(key):
        r.ctx.add(r.path + (key,), "missing; the folder of images")
        return None
    folder = resolve_path(r.ctx, r.path + (key,), r.data[key], root)
    if folder is None:
        return None
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "folder not found"
        r.ctx.add(r.path + (key,), f"{what}: {folder} (relative paths resolve against {root})")
        return None
    return folder


def _read_bucketing(r: Reader) -> Bucketing:
    value = r.data.get("bucketing")
    if value is None:
        return Bucketing()
    if isinstance(value, bool):  # `bucketing: false` shorthand
        return Bucketing(enabled=value)
    sub = Reader.open(r.ctx, r.path + ("bucketing",), value)
    if sub is None:
        return Bucketing()
    sub.check_keys(("enabled", "max_aspect"))
    return Bucketing(**sub.fill({"enabled": boolean(), "max_aspect": number(ge=1.0, le=8.0)}))


def _read_masks(r: Reader, root: Path, images: Path | None, recursive: bool) -> Masks | None:
    """`masks: {alpha: true}` or `masks: {folder: PATH}`, with an optional `unmasked_weight`."""
    sub = r.sub("masks")  # None when absent, null or not a mapping (then Reader.open recorded why)
    if sub is None:
        return None
    sub.check_keys((*MASK_SOURCES, "unmasked_weight"))
    given = [k for k in MASK_SOURCES if k in sub.data]
    if len(given) != 1:
        what = "both " + " and ".join(given) if given else "neither"
        r.ctx.add(sub.path, f"give exactly one of `alpha: true` or `folder: PATH`, got {what}")
        return None
    kwargs = sub.fill({"unmasked_weight": number(ge=0.0, lt=1.0)})
    if given == ["alpha"]:
        if sub.data["alpha"] is not True:
            r.ctx.add(sub.path + ("alpha",), f"write `alpha: true`; got {describe(sub.data['alpha'])}")
            return None
        return Masks(source="alpha", **kwargs)
    folder = read_folder(sub, "folder", root)
    if folder is None:
        return None
    if images is not None and _inside_or_same(folder, images, recursive):
        r.ctx.add(
            sub.path + ("folder",),
            f"{folder} is the dataset folder{' or inside it (recursive: true)' if recursive else ''}: the "
            "masks would be read as training images; keep them in a folder of their own",
        )
        return None
    return Masks(source="folder", folder=folder, **kwargs)


def _inside_or_same(folder: Path, images: Path, recursive: bool) -> bool:
    a, b = Path(os.path.realpath(folder)), Path(os.path.realpath(images))
    return a == b or (recursive and b in a.parents)


# -------------------------------------------------------------------------------------------- captions


def read_captions(
    ctx: Context, path: KeyPath, value: Any, root: Path, trigger: Any, folder: Path | None = None
) -> CaptionSource:
    """The caption source at `path` (default sidecar `.txt`); `trigger` is the dataset's (MISSING when
    it was invalid); `folder` the dataset folder (inline image paths are relative to it)."""
    if value is MISSING or value is None:
        return CaptionSource()
    if isinstance(value, str):
        if value in ("sidecar", "filename"):
            return CaptionSource(kind=value)
        ctx.add(
            path,
            f"must be `sidecar` or `filename`, or a mapping such as `{{manifest: FILE}}`, "
            f"`{{inline: [...]}}`, `{{template: TEXT}}`; got {value!r}"
            f"{suggest(value, CAPTION_KINDS)}",
        )
        return CaptionSource()
    r = Reader.open(ctx, path, value)
    if r is None:
        return CaptionSource()
    if r.has("generate"):
        return _read_generated(r, root, trigger, folder)
    r.check_keys(CAPTION_KINDS + ("extension", "generate"), hints={"prefer": "a `generate` caption source"})
    kinds = [k for k in CAPTION_KINDS if k in r.data]
    if len(kinds) > 1:
        ctx.add(path, f"choose one caption source, got {', '.join(kinds)}")
        return CaptionSource()
    kind = kinds[0] if kinds else "sidecar"
    extension = r.get("extension", _extension(), CaptionSource.extension)
    if r.has("extension") and kind not in ("sidecar", "template"):
        ctx.add(path + ("extension",), f"only used with sidecar or template captions, not {kind}")
    extension = CaptionSource.extension if extension is MISSING else extension
    if kind in ("sidecar", "filename"):
        if r.has(kind) and r.data[kind] is not True:
            ctx.add(
                path + (kind,), f"write `{kind}: true` (or `captions: {kind}`); got {describe(r.data[kind])}"
            )
        return CaptionSource(kind=kind, extension=extension)
    if kind == "manifest":
        return CaptionSource(kind="manifest", file=_manifest(r, root))
    if kind == "inline":
        items = r.get("inline", inline_items(("caption", "prompt"), folder))
        return CaptionSource(kind="inline", items=() if items is MISSING else items)
    template = r.get("template", text())
    if template is not MISSING:
        _check_template(ctx, path + ("template",), template, trigger)
    return CaptionSource(
        kind="template", template=None if template is MISSING else template, extension=extension
    )


_GENERATE_KEYS = ("generate", "prefer", "extension", "manifest", "inline", "template")
_GENERATE_MODEL_KEYS = ("model", "prompt", "max_tokens", "repetition_penalty")


def _read_generated(r: Reader, root: Path, trigger: Any, folder: Path | None) -> CaptionSource:
    """`captions: {generate: {...}, prefer, extension | manifest | inline, template}`."""
    r.check_keys(
        _GENERATE_KEYS,
        hints={
            "sidecar": "nowhere: sidecar files are the default human captions of `generate`",
            "filename": "nowhere: `generate` mixes with sidecar, manifest or inline captions only",
        },
    )
    human = [k for k in ("manifest", "inline") if r.has(k)]
    if len(human) > 1:
        r.ctx.add(r.path, f"choose one source of human captions, got {', '.join(human)}")
    kind = human[0] if human else "sidecar"
    generate = _read_generate(r.ctx, r.path + ("generate",), r.data["generate"], root)
    prefer = r.get("prefer", text(choices=CAPTION_PREFER), CaptionSource.prefer)
    if prefer == "generated" and kind != "sidecar":
        r.ctx.add(
            r.path + ("prefer",),
            f"`prefer: generated` would ignore every {kind} caption; use `prefer: sidecar` to mix them with "
            f"the model's, or drop `{kind}`",
        )
    extension = r.get("extension", _extension(), CaptionSource.extension)
    if r.has("extension") and kind != "sidecar":
        r.ctx.add(r.path + ("extension",), f"only used with sidecar captions, not {kind}")
    template = r.get("template", text(), None)
    if isinstance(template, str):
        _check_template(r.ctx, r.path + ("template",), template, trigger)
    file = _manifest(r, root) if kind == "manifest" else None
    items = r.get("inline", inline_items(("caption", "prompt"), folder), ()) if kind == "inline" else ()
    if MISSING in (generate, prefer, extension, template, items):
        return CaptionSource()
    return CaptionSource(
        kind="generate",
        generate=generate,
        prefer=prefer,
        human=kind,
        file=file,
        items=items,
        template=template,
        extension=extension,
    )


def _read_generate(ctx: Context, path: KeyPath, value: Any, root: Path) -> Any:
    """The `generate:` mapping as GeneratedCaptions (MISSING, with problems recorded, when bad)."""
    r = Reader.open(ctx, path, value)
    if r is None:
        return MISSING
    before = ctx.count
    r.check_keys(_GENERATE_MODEL_KEYS)
    raw = r.require("model", text(), "the captioning model: tiny-vlm, a Hugging Face repo id or a folder")
    model = MISSING if raw is MISSING else _caption_model(ctx, path + ("model",), raw, root)
    kwargs = r.fill(
        {
            "prompt": text(),
            "max_tokens": integer(min=1, max=MAX_CAPTION_TOKENS),
            "repetition_penalty": number(gt=0.0, nullable=True),
        }
    )
    if ctx.count > before or model is MISSING:
        return MISSING
    return GeneratedCaptions(model=model, **kwargs)


def _caption_model(ctx: Context, path: KeyPath, raw: str, root: Path) -> Any:
    """A captioning model: a preset, a Hugging Face repo id, or a folder (made absolute)."""
    from zrecipe.models.z_image.hub import is_repo_id

    if raw in CAPTION_MODEL_PRESETS:
        return raw
    if not written_as_path(raw, root):
        if is_repo_id(raw):
            return raw
        ctx.add(
            path,
            f"{raw!r} is not a captioning model: give {', '.join(CAPTION_MODEL_PRESETS)}, a Hugging Face "
            f"repo id such as Qwen/Qwen2-VL-2B-Instruct, or a folder (./{raw}){suggest(raw, CAPTION_MODEL_PRESETS)}",
        )
        return MISSING
    folder = resolve_path(ctx, path, raw, root)
    return MISSING if folder is None else str(folder)


def _extension() -> Any:
    base = text()

    def check(value: Any) -> str:
        value = base(value)
        if not value.startswith(".") or len(value) < 2 or "/" in value or "\\" in value:
            raise Bad(f"must be a file extension such as `.txt`, got {value!r}")
        return value

    return check


def _manifest(r: Reader, root: Path) -> Path | None:
    path = r.path + ("manifest",)
    file = resolve_path(r.ctx, path, r.data["manifest"], root)
    if file is None:
        return None
    if file.suffix.lower() not in MANIFEST_SUFFIXES:
        r.ctx.add(path, f"a manifest is a .jsonl or .csv file, got {file.name!r}")
    elif not os.path.isfile(file):
        what = "is not a file" if os.path.exists(file) else "manifest file not found"
        r.ctx.add(path, f"{what}: {file} (relative paths resolve against {root})")
    return file


def _check_template(ctx: Context, path: KeyPath, template: str, trigger: Any) -> None:
    import string  # here: only template recipes need it (its import compiles a regex on every plan)

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:  # unbalanced braces
        ctx.add(path, f"not a valid template ({exc}); write literal braces as {{{{ and }}}}")
        return
    for field in fields:
        if field not in TEMPLATE_FIELDS:
            ctx.add(
                path,
                f"unknown placeholder {{{field}}}; use {{trigger}}, {{caption}} or {{filename}}"
                f"{suggest(field, TEMPLATE_FIELDS)}",
            )
    if "trigger" in fields and trigger is None:
        ctx.add(path, "uses {trigger} but the dataset sets no `trigger`")


def inline_items(caption_keys: tuple[str, ...], folder: Path | None = None) -> Any:
    """Spec for `[{image: FILE, caption: TEXT}, ...]`; `caption_keys` are the accepted caption key names.
    Image paths are relative to the dataset `folder` (an absolute path inside it is accepted) and are
    returned relative, normalised, posix-style."""

    def item(value: Any) -> tuple[str, str]:
        if not isinstance(value, Mapping):
            raise Bad(f"expected {{image: FILE, {caption_keys[0]}: TEXT}}, got {describe(value)}")
        allowed = ("image",) + caption_keys
        bad = [((k,), f"unknown key{suggest(k, allowed)}") for k in value if k not in allowed]
        named = [k for k in caption_keys if k in value]
        if "image" not in value:
            bad.append(((), "missing `image`"))
        if not named:
            bad.append(((), f"missing `{caption_keys[0]}`"))
        elif len(named) > 1:
            bad.append(((), f"give one of {', '.join(named)}"))
        if bad:
            raise Bad(items=bad)
        image = _relative_image(value["image"], folder)
        try:
            caption = text()(value[named[0]])
        except Bad as exc:
            raise Bad(items=[((named[0],) + at, m) for at, m in exc.items]) from None
        return image, caption

    def check(value: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, (list, tuple)):
            raise Bad(f"expected a list of {{image, {caption_keys[0]}}} items, got {describe(value)}")
        out, bad, seen = [], [], {}
        for i, v in enumerate(value):
            try:
                pair = item(v)
            except Bad as exc:
                bad.extend(((i,) + at, m) for at, m in exc.items)
                continue
            if pair[0] in seen:
                bad.append(((i, "image"), f"{pair[0]!r} is listed twice (also item {seen[pair[0]]})"))
                continue
            seen[pair[0]] = i
            out.append(pair)
        if bad:
            raise Bad(items=bad)
        return tuple(out)

    return check


def _relative_image(value: Any, folder: Path | None) -> str:
    try:
        name = text()(value)
    except Bad as exc:
        raise Bad(items=[(("image",) + at, m) for at, m in exc.items]) from None
    if folder is not None and "\0" not in name and os.path.isabs(os.path.expanduser(name)):
        name = _inside(Path(os.path.expanduser(name)), folder) or name
    norm = posixpath.normpath(name.replace("\\", "/"))
    if "\0" in name or posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or norm == ".":
        raise Bad(f"must be a file inside the dataset folder, got {name!r}", at=("image",))
    return norm


def _inside(path: Path, folder: Path) -> str | None:
    """`path` relative to `folder` (posix) when it lies inside it, as written or once symlinks resolve."""
    for a, b in ((path, folder), (path.resolve(), folder.resolve())):
        try:
            rel = Path(os.path.normpath(a)).relative_to(os.path.normpath(b))
        except ValueError:
            continue
        if rel.parts:
            return rel.as_posix()
    return None


# -------------------------------------------------------------------------------------------- examples


def read_examples(ctx: Context, value: Any, root: Path, resolution: int | None) -> Dataset | None:
    """The seed format's `examples: {path, images: [{image, prompt}]}` as one inline-caption dataset."""
    r = Reader.open(ctx, ("examples",), value)
    if r is None:
        return None
    r.check_keys(("path", "images"))
    before = ctx.count
    folder = read_folder(r, "path", root)
    items = r.require("images", inline_items(("prompt", "caption"), folder), "a list of {image, prompt}")
    if ctx.count > before or folder is None:
        return None
    extra = {} if resolution is None else {"resolution": resolution}
    return Dataset(name=folder.name, path=folder, captions=CaptionSource(kind="inline", items=items), **extra)
