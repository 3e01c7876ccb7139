"""Caption per image from one of five sources, with every problem collected instead of the first raised.

Sources: `sidecar` (a `.txt` with the image's stem), `manifest` (JSONL, JSON list or CSV with `file`/`image`
and `caption`/`prompt`), `filename` (the stem, `_`/`-` as spaces), `inline` (pairs from the recipe) and
`template` (`{trigger}`, `{caption}`, `{filename}`). A trigger word is prepended when the caption lacks it.
Pure Python: the planner calls this, so no PIL or numpy here.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Protocol

from zrecipe.data.manifest import Entry, inline_entries, manifest_entries, normalise_name
from zrecipe.engine.files import FileTooLarge, NotRegularFile, read_regular
from zrecipe.engine.statcache import MAX_SMALL_FILE_BYTES
from zrecipe.errors import DatasetError

CAPTION_SOURCES = ("sidecar", "manifest", "filename", "inline", "template")
TEMPLATE_FIELDS = ("trigger", "caption", "filename")


class _HasPaths(Protocol):
    rel_path: str
    path: str


_REL_PATH = attrgetter("rel_path")

# Batch file reader: paths → {path: content bytes, or the OSError that reading it raised}.
ReadFiles = Callable[[list[str]], Mapping[str, "bytes | OSError"]]


def read_files(paths: Iterable[str]) -> dict[str, bytes | OSError]:
    """Read every path: {path: bytes, or the OSError met}. The uncached default for `resolve_captions`.

    Regular files of at most MAX_SMALL_FILE_BYTES only: a FIFO (which would block) or a link to a device
    (which would never end) is an error, like the stat cache's `read_small_files`."""
    out: dict[str, bytes | OSError] = {}
    for path in paths:
        try:
            out[path] = read_regular(path, MAX_SMALL_FILE_BYTES)
        except OSError as exc:
            out[path] = exc
    return out


@dataclass
class CaptionResult:
    """Captions keyed by image `rel_path` (only images whose caption resolved) and every problem found.

    Each problem names the item (image, caption file or manifest line) and what to do about it.
    """

    captions: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_for_problems(self, dataset: str) -> None:
        """Raise one `DatasetError` listing every problem (for datasets with `on_error: fail`)."""
        if self.problems:
            n = len(self.problems)
            raise DatasetError(
                f"dataset {dataset!r}: {n} caption problem{'s' if n != 1 else ''}:\n  "
                + "\n  ".join(self.problems),
                items=list(self.problems),
            )


def resolve_captions(
    files: Sequence[_HasPaths],
    folder: str | os.PathLike[str],
    source_kind: str,
    *,
    manifest: str | os.PathLike[str] | None = None,
    inline: Iterable[tuple[str, str]] | None = None,
    template: str | None = None,
    trigger: str | None = None,
    extension: str = ".txt",
    read: ReadFiles | None = None,
) -> CaptionResult:
    """Resolve the caption of every image in `files` (from `scan_images(folder)`) from `source_kind`.

    `manifest` is the manifest file (kind `manifest`), `inline` the (image rel path, caption) pairs (kind
    `inline`), `template` the template string (kind `template`), `extension` the sidecar extension. When
    `trigger` is set, captions not already containing it (as a whole word) get `"<trigger>, "` prepended.
    `read` reads sidecar files in one batch, {path: bytes or the OSError met} (default: open each one);
    the planner passes `StatCache.read_small_files` so unchanged captions are not reopened on every plan.
    """
    if source_kind not in CAPTION_SOURCES:
        raise ValueError(f"unknown caption source {source_kind!r}; expected one of {CAPTION_SOURCES}")
    trigger = trigger.strip() if trigger else None
    result = CaptionResult()
    if source_kind == "sidecar":
        _store_all(result, map(_REL_PATH, files), _read_sidecars(files, extension, read or read_files))
    elif source_kind == "filename":
        for f in files:
            text = caption_from_filename(f.rel_path)
            problem = None if text else f"{f.rel_path}: the file name gives an empty caption; rename the file"
            _store(result, f.rel_path, text, problem)
    elif source_kind in ("manifest", "inline"):
        entries = manifest_entries(manifest) if source_kind == "manifest" else inline_entries(inline)
        _match_entries(result, files, entries, Path(folder), source_kind, manifest)
    else:
        _apply_template(result, files, template, trigger, extension, read or read_files)
    if trigger:
        result.captions = {k: add_trigger(v, trigger) for k, v in result.captions.items()}
    return result


def distinct_texts(captions: Mapping[str, str]) -> list[str]:
    """The distinct caption texts, sorted: identical captions are one text item (encoded once)."""
    return sorted(set(captions.values()))


def sidecar_path(image_path: str, extension: str = ".txt") -> str:
    """The sidecar caption file of an image: same folder and stem, `extension` instead of the image's."""
    return os.path.splitext(image_path)[0] + extension


def caption_from_filename(rel_path: str) -> str:
    """`sub/red_fox-01.jpg` → `red fox 01`: the stem with `_` and `-` read as spaces."""
    stem = os.path.splitext(posixpath.basename(rel_path))[0]
    return " ".join(stem.replace("_", " ").replace("-", " ").split())


def add_trigger(caption: str, trigger: str) -> str:
    """Prepend `"<trigger>, "` unless the caption already contains the trigger as a whole word."""
    # Whole-word match so trigger "cat" is not taken as present in "category"; case-sensitive because
    # trigger tokens are usually made-up words whose case the tokenizer sees.
    if re.search(r"(?<!\w)" + re.escape(trigger) + r"(?!\w)", caption):
        return caption
    return f"{trigger}, {caption}"


def read_sidecars(
    files: Sequence[_HasPaths], extension: str = ".txt", read: ReadFiles | None = None, required: bool = True
) -> list[tuple[str | None, str | None]]:
    """(caption or None, problem or None) per file, in order, from its sidecar (one `read` batch). With
    `required=False` a missing sidecar is no problem (None, None) and an empty one gives ("", None)."""
    return _read_sidecars(files, extension, read or read_files, required)


def apply_template(template: str, rel_path: str, caption: str, trigger: str | None) -> str:
    """`template` formatted for one image (`{trigger}`, `{caption}`, `{filename}`), tidied as the
    `template` source does. The template must be valid (the recipe loader checks it)."""
    pieces, problems = _parse_template(template)
    if problems:
        raise ValueError(problems[0])
    values = {
        "trigger": (trigger or "").strip(),
        "filename": caption_from_filename(rel_path),
        "caption": caption,
    }
    return _tidy("".join(lit + (values[name] if name else "") for lit, name in pieces))


# --- sources -----------------------------------------------------------------------------------------


def _store(result: CaptionResult, rel: str, text: str | None, problem: str | None) -> None:
    _store_all(result, (rel,), ((text, problem),))


def _store_all(
    result: CaptionResult, rels: Iterable[str], outcomes: Iterable[tuple[str | None, str | None]]
) -> None:
    """Record each image's (caption, problem): the problem when there is one, else the caption (None:
    no caption and no problem). One loop for a whole dataset, not a call per image."""
    captions, problems = result.captions, result.problems
    for rel, (text, problem) in zip(rels, outcomes, strict=True):
        if problem:
            problems.append(problem)
        elif text is not None:
            captions[rel] = text


def _read_sidecars(
    files: Sequence[_HasPaths], extension: str, read: ReadFiles, required: bool = True
) -> list[tuple[str | None, str | None]]:
    """(caption, problem) per file, in order; every sidecar read in one `read` batch."""
    # Scanned image names always end in a known extension, so the last "." after the last separator
    # starts it: a slice is 5× cheaper than os.path.splitext at 100,000 files. Anything else (no dot, a
    # dot-file) takes the exact splitext path.
    sep = os.sep
    paths = [
        p[:i] + extension if (i := p.rfind(".")) > p.rfind(sep) + 1 else sidecar_path(p, extension)
        for p in [f.path for f in files]
    ]
    contents = read(paths)
    out: list[tuple[str | None, str | None]] = []
    append = out.append
    for f, p in zip(files, paths, strict=True):
        raw = contents[p]
        # The usual caption, non-empty ASCII, decodes to itself with no BOM to drop: inline, without a
        # call per file. Errors, empty files and other UTF-8 take _decode_sidecar.
        if type(raw) is bytes and raw.isascii() and (text := raw.decode("ascii").strip()):
            append((text, None))
        else:
            append(_decode_sidecar(f, raw, extension, required))
    return out


def _decode_sidecar(
    f: _HasPaths, raw: bytes | OSError, extension: str, required: bool
) -> tuple[str | None, str | None]:
    """(caption, problem) from a sidecar's bytes or read error. A missing file is a problem only when
    `required`."""
    if isinstance(raw, OSError):
        rel_txt = sidecar_path(f.rel_path, extension)
        if isinstance(raw, FileNotFoundError):
            if not required:
                return None, None
            return None, (
                f"{f.rel_path}: no caption ({rel_txt} is missing); write the caption in {rel_txt} "
                "or choose another caption source"
            )
        if isinstance(raw, NotRegularFile):
            return None, f"{rel_txt}: the caption file {raw.strerror}; replace it with a UTF-8 text file"
        if isinstance(raw, FileTooLarge):
            return None, f"{rel_txt}: the caption file {raw.strerror}; is it the right file?"
        if isinstance(raw, PermissionError):
            return None, f"{rel_txt}: cannot read caption file ({raw.strerror}); fix its permissions"
        return None, f"{rel_txt}: cannot read caption file ({raw.strerror or raw}); fix or replace it"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        rel_txt = sidecar_path(f.rel_path, extension)
        return None, (
            f"{rel_txt}: caption file is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8"
        )
    # Editors on Windows often write a BOM, which must not end up in the caption. (Same as decoding with
    # utf-8-sig, but the error offset above stays an offset into the file.)
    text = text.removeprefix("\ufeff").strip()
    if not text and required:
        return (
            None,
            f"{sidecar_path(f.rel_path, extension)}: caption file is empty; write a caption for {f.rel_path}",
        )
    return text, None


def _match_entries(
    result: CaptionResult,
    files: Sequence[_HasPaths],
    entries: list[Entry],
    folder: Path,
    kind: str,
    manifest: str | os.PathLike[str] | None,
) -> None:
    known = {f.rel_path for f in files}
    found: dict[str, tuple[str, str]] = {}  # rel path → (caption, where)
    fatal = False
    for where, name, caption, problem in entries:
        if problem:
            result.problems.append(problem)
            fatal = fatal or not name  # a file-level problem (no manifest at all) hides per-image ones
            continue
        rel = normalise_name(name, folder)
        if rel not in known:
            result.problems.append(
                f"{where}: image {name} is not in the dataset folder {folder}; fix the name or remove the entry"
            )
        elif rel in found and found[rel][0] != caption:
            result.problems.append(
                f"{where}: second, different caption for {rel} (first at {found[rel][1]}); keep one"
            )
        else:
            found.setdefault(rel, (caption, where))
    if fatal and not found:
        return  # the source itself is unusable; one message about it beats one per image
    source = f"manifest {manifest}" if kind == "manifest" else "the recipe's inline captions"
    for f in files:
        if f.rel_path in found:
            result.captions[f.rel_path] = found[f.rel_path][0]
        else:
            result.problems.append(f"{f.rel_path}: no caption in {source}; add an entry for it")


def _parse_template(template: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    """Template → [(literal, field or None)] and problems (unknown placeholders, bad braces)."""
    import string  # here: only template captions need it (its import compiles a regex on every plan)

    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return [], [f"captions.template {template!r}: {exc}; write literal braces as {{{{ and }}}}"]
    pieces, problems = [], []
    for literal, name, spec, conversion in parts:
        if name is not None and (name not in TEMPLATE_FIELDS or spec or conversion):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            problems.append(
                f"captions.template: unknown placeholder {shown}; use "
                + ", ".join("{" + k + "}" for k in TEMPLATE_FIELDS)
            )
        pieces.append((literal, name))
    return pieces, problems


def _apply_template(
    result: CaptionResult,
    files: Sequence[_HasPaths],
    template: str | None,
    trigger: str | None,
    extension: str,
    read: ReadFiles,
) -> None:
    if not template:
        result.problems.append(
            "caption source `template` needs a `template` string, e.g. '{trigger}, {caption}'"
        )
        return
    pieces, problems = _parse_template(template)
    if not problems and not trigger and any(name == "trigger" for _, name in pieces):
        problems.append("captions.template uses {trigger} but the dataset has no `trigger`; set one")
    if problems:
        result.problems.extend(problems)
        return
    uses_caption = any(name == "caption" for _, name in pieces)
    sidecars = _read_sidecars(files, extension, read, required=False) if uses_caption else None
    for i, f in enumerate(files):
        values = {"trigger": trigger or "", "filename": caption_from_filename(f.rel_path), "caption": ""}
        if sidecars is not None:
            text, problem = sidecars[i]
            if problem:
                result.problems.append(problem)
                continue
            values["caption"] = text or ""
        text = _tidy("".join(lit + (values[name] if name else "") for lit, name in pieces))
        _store(
            result, f.rel_path, text, None if text else f"{f.rel_path}: the template gives an empty caption"
        )


def _tidy(text: str) -> str:
    """Clean what empty placeholders leave behind: `a, , b` → `a, b`, no leading/trailing separators."""
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return " ".join(text.split()).strip(" ,;")
