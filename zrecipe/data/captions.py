"""Caption per image from one of five sources, with every problem collected instead of the first raised.

Sources: `sidecar` (a `.txt` with the image's stem), `manifest` (JSONL, JSON list or CSV with `file`/`image`
and `caption`/`prompt`), `filename` (the stem, `_`/`-` as spaces), `inline` (pairs from the recipe) and
`template` (`{trigger}`, `{caption}`, `{filename}`). A trigger word is prepended when the caption lacks it.
Pure Python: the planner calls this, so no PIL or numpy here.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from zrecipe.errors import DatasetError

CAPTION_SOURCES = ("sidecar", "manifest", "filename", "inline", "template")
TEMPLATE_FIELDS = ("trigger", "caption", "filename")
_FILE_KEYS = ("file", "image")
_CAPTION_KEYS = ("caption", "prompt")


class _HasPaths(Protocol):
    rel_path: str
    path: str


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
) -> CaptionResult:
    """Resolve the caption of every image in `files` (from `scan_images(folder)`) from `source_kind`.

    `manifest` is the manifest file (kind `manifest`), `inline` the (image rel path, caption) pairs (kind
    `inline`), `template` the template string (kind `template`), `extension` the sidecar extension. When
    `trigger` is set, captions not already containing it (as a whole word) get `"<trigger>, "` prepended.
    """
    if source_kind not in CAPTION_SOURCES:
        raise ValueError(f"unknown caption source {source_kind!r}; expected one of {CAPTION_SOURCES}")
    trigger = trigger.strip() if trigger else None
    result = CaptionResult()
    if source_kind == "sidecar":
        for f in files:
            text, problem = _read_sidecar(f, extension)
            _store(result, f.rel_path, text, problem)
    elif source_kind == "filename":
        for f in files:
            text = caption_from_filename(f.rel_path)
            problem = None if text else f"{f.rel_path}: the file name gives an empty caption; rename the file"
            _store(result, f.rel_path, text, problem)
    elif source_kind in ("manifest", "inline"):
        entries = _manifest_entries(manifest, Path(folder)) if source_kind == "manifest" else _inline_entries(inline)
        _match_entries(result, files, entries, Path(folder), source_kind, manifest)
    else:
        _apply_template(result, files, template, trigger, extension)
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


# --- sources -----------------------------------------------------------------------------------------


def _store(result: CaptionResult, rel: str, text: str | None, problem: str | None) -> None:
    if problem:
        result.problems.append(problem)
    elif text is not None:
        result.captions[rel] = text


def _read_sidecar(f: _HasPaths, extension: str, required: bool = True) -> tuple[str | None, str | None]:
    """(caption, problem). A missing file is a problem only when `required`."""
    rel_txt = sidecar_path(f.rel_path, extension)
    try:
        with open(sidecar_path(f.path, extension), "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if not required:
            return None, None
        return None, (
            f"{f.rel_path}: no caption ({rel_txt} is missing); write the caption in {rel_txt} "
            "or choose another caption source"
        )
    except OSError as exc:
        return None, f"{rel_txt}: cannot read caption file ({exc.strerror or exc}); fix its permissions"
    try:
        # utf-8-sig: editors on Windows often write a BOM, which must not end up in the caption.
        text = raw.decode("utf-8-sig").strip()
    except UnicodeDecodeError as exc:
        return None, (
            f"{rel_txt}: caption file is not UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "re-save it as UTF-8"
        )
    if not text and required:
        return None, f"{rel_txt}: caption file is empty; write a caption for {f.rel_path}"
    return text, None


# An entry is (where, image name as written, caption or None, problem or None); `where` names its origin
# (`manifest.csv:12`, `inline caption 3`) in messages.
_Entry = tuple[str, str, "str | None", "str | None"]


def _manifest_entries(manifest: str | os.PathLike[str] | None, folder: Path) -> list[_Entry]:
    if manifest is None:
        return [("captions", "", None, "caption source `manifest` needs a `file`; name the JSONL or CSV file")]
    path = Path(manifest)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [(str(path), "", None, f"{path}: manifest file does not exist; fix `captions.file`")]
    except OSError as exc:
        return [(str(path), "", None, f"{path}: cannot read manifest ({exc.strerror or exc})")]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return [(str(path), "", None, f"{path}: manifest is not UTF-8 (offset {exc.start}); re-save it as UTF-8")]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_entries(text, str(path))
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_entries(text, str(path))
    if suffix == ".json":
        return _json_list_entries(text, str(path))
    return [(str(path), "", None, f"{path}: unknown manifest type {suffix or '(none)'}; use .jsonl or .csv")]


def _record(where: str, obj: object) -> _Entry:
    """One manifest record (a dict) → entry, accepting `file`/`image` and `caption`/`prompt`."""
    if not isinstance(obj, dict):
        return (where, "", None, f"{where}: expected an object with `file` and `caption`, got {type(obj).__name__}")
    name = next((obj[k] for k in _FILE_KEYS if obj.get(k) not in (None, "")), None)
    caption = next((obj[k] for k in _CAPTION_KEYS if k in obj and obj[k] is not None), None)
    if not isinstance(name, str):
        return (where, "", None, f"{where}: missing `file` (or `image`): the image's path in the dataset folder")
    if not isinstance(caption, str):
        what = "missing `caption` (or `prompt`)" if caption is None else "`caption` must be a string"
        return (where, name, None, f"{where}: {what} for {name}; add the caption text")
    caption = caption.strip()
    if not caption:
        return (where, name, None, f"{where}: empty caption for {name}; write a caption")
    return (where, name, caption, None)


def _jsonl_entries(text: str, label: str) -> list[_Entry]:
    entries = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            entries.append((where, "", None, f"{where}: not valid JSON ({exc.msg}); fix the line"))
            continue
        entries.append(_record(where, obj))
    return entries


def _json_list_entries(text: str, label: str) -> list[_Entry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [(f"{label}:{exc.lineno}", "", None, f"{label}:{exc.lineno}: not valid JSON ({exc.msg})")]
    if not isinstance(data, list):
        return [(label, "", None, f"{label}: expected a JSON list of {{file, caption}} objects")]
    return [_record(f"{label} item {i}", obj) for i, obj in enumerate(data, start=1)]


def _csv_entries(text: str, label: str) -> list[_Entry]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        return [(f"{label}:1", "", None, f"{label}:1: cannot parse the CSV header ({exc})")]
    if not any(k in header for k in _FILE_KEYS) or not any(k in header for k in _CAPTION_KEYS):
        return [(f"{label}:1", "", None, f"{label}:1: header must have a `file` (or `image`) and a `caption` "
                 f"(or `prompt`) column; found {', '.join(header) or 'nothing'}")]
    reader.fieldnames = header
    entries = []
    try:
        for row in reader:
            where = f"{label}:{reader.line_num}"
            if None in row:  # DictReader collects surplus fields under the key None
                entries.append((where, "", None, f"{where}: more fields than the header has; quote the caption"))
                continue
            entries.append(_record(where, {k: v for k, v in row.items() if v is not None}))
    except csv.Error as exc:
        where = f"{label}:{reader.line_num}"
        entries.append((where, "", None, f"{where}: cannot parse CSV ({exc}); fix the quoting"))
    return entries


def _inline_entries(inline: Iterable[tuple[str, str]] | None) -> list[_Entry]:
    entries = []
    for i, pair in enumerate(inline or (), start=1):
        where = f"inline caption {i}"
        try:
            name, caption = pair
        except (TypeError, ValueError):
            entries.append((where, "", None, f"{where}: expected an (image, caption) pair"))
            continue
        entries.append(_record(where, {"file": name, "caption": caption}))
    return entries


def _normalise_name(name: str, folder: Path) -> str:
    """Manifest spelling → scan's `rel_path`: `/` separators, no `./`, absolute paths made relative."""
    name = name.strip().replace("\\", "/")
    if posixpath.isabs(name) or os.path.isabs(name):
        try:
            name = Path(name).relative_to(folder.absolute()).as_posix()
        except ValueError:
            return name
    return posixpath.normpath(name)


def _match_entries(
    result: CaptionResult,
    files: Sequence[_HasPaths],
    entries: list[_Entry],
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
        rel = _normalise_name(name, folder)
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
) -> None:
    if not template:
        result.problems.append("caption source `template` needs a `template` string, e.g. '{trigger}, {caption}'")
        return
    pieces, problems = _parse_template(template)
    if not problems and not trigger and any(name == "trigger" for _, name in pieces):
        problems.append("captions.template uses {trigger} but the dataset has no `trigger`; set one")
    if problems:
        result.problems.extend(problems)
        return
    uses_caption = any(name == "caption" for _, name in pieces)
    for f in files:
        values = {"trigger": trigger or "", "filename": caption_from_filename(f.rel_path), "caption": ""}
        if uses_caption:
            text, problem = _read_sidecar(f, extension, required=False)
            if problem:
                result.problems.append(problem)
                continue
            values["caption"] = text or ""
        text = _tidy("".join(lit + (values[name] if name else "") for lit, name in pieces))
        _store(result, f.rel_path, text, None if text else f"{f.rel_path}: the template gives an empty caption")


def _tidy(text: str) -> str:
    """Clean what empty placeholders leave behind: `a, , b` → `a, b`, no leading/trailing separators."""
    text = re.sub(r"\s*,(\s*,)+", ",", text)
    return " ".join(text.split()).strip(" ,;")
