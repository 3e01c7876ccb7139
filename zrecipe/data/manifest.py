"""Caption manifests (JSONL, JSON list, CSV) and inline caption lists → entries with their origin.

Every record is checked on its own, so one bad line is one problem naming `file:line`, never an exception.
Matching entries to scanned images is `captions.py`'s job.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from zrecipe.engine.files import FileTooLarge, NotRegularFile, read_regular

# 100,000 captions of a few hundred bytes are tens of MB; anything near this is not a caption manifest.
MAX_MANIFEST_BYTES = 1 << 30
_FILE_KEYS = ("file", "image")
_CAPTION_KEYS = ("caption", "prompt")

# An entry is (where, image name as written, caption or None, problem or None); `where` names its origin
# (`manifest.csv:12`, `inline caption 3`) in messages.
Entry = tuple[str, str, "str | None", "str | None"]


def manifest_entries(manifest: str | os.PathLike[str] | None) -> list[Entry]:
    """Entries of a JSONL (.jsonl/.ndjson), JSON list (.json) or CSV (.csv) manifest file."""
    if manifest is None:
        return [
            ("captions", "", None, "caption source `manifest` needs a `file`; name the JSONL or CSV file")
        ]
    path = Path(manifest)
    try:
        raw = read_regular(path, MAX_MANIFEST_BYTES)  # a FIFO or a link to a device is refused, not read
    except FileNotFoundError:
        return [(str(path), "", None, f"{path}: manifest file does not exist; fix `captions.file`")]
    except (NotRegularFile, FileTooLarge) as exc:
        return [(str(path), "", None, f"{path}: the manifest {exc.strerror}; fix `captions.file`")]
    except OSError as exc:
        why = exc.strerror or exc
        return [
            (
                str(path),
                "",
                None,
                f"{path}: cannot read manifest ({why}); fix `captions.file` or its permissions",
            )
        ]
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        where = f"{path}:{line}"
        return [
            (
                where,
                "",
                None,
                f"{where}: manifest is not UTF-8 (byte offset {exc.start}); re-save it as UTF-8",
            )
        ]
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_entries(text, str(path))
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_entries(text, str(path))
    if suffix == ".json":
        return _json_list_entries(text, str(path))
    return [(str(path), "", None, f"{path}: unknown manifest type {suffix or '(none)'}; use .jsonl or .csv")]


def _record(where: str, obj: object) -> Entry:
    """One manifest record (a dict) → entry, accepting `file`/`image` and `caption`/`prompt`."""
    if not isinstance(obj, dict):
        return (
            where,
            "",
            None,
            f"{where}: expected an object with `file` and `caption`, got {type(obj).__name__}",
        )
    name = next((obj[k] for k in _FILE_KEYS if obj.get(k) not in (None, "")), None)
    caption = next((obj[k] for k in _CAPTION_KEYS if k in obj and obj[k] is not None), None)
    if not isinstance(name, str):
        return (
            where,
            "",
            None,
            f"{where}: missing `file` (or `image`): the image's path in the dataset folder",
        )
    if not isinstance(caption, str):
        what = "missing `caption` (or `prompt`)" if caption is None else "`caption` must be a string"
        return (where, name, None, f"{where}: {what} for {name}; add the caption text")
    caption = caption.strip()
    if not caption:
        return (where, name, None, f"{where}: empty caption for {name}; write a caption")
    return (where, name, caption, None)


def _jsonl_entries(text: str, label: str) -> list[Entry]:
    entries = []
    # split("\n"), not splitlines(): JSON strings may hold U+2028 etc. raw, which splitlines() breaks on.
    for lineno, line in enumerate(text.split("\n"), start=1):
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


def _json_list_entries(text: str, label: str) -> list[Entry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [(f"{label}:{exc.lineno}", "", None, f"{label}:{exc.lineno}: not valid JSON ({exc.msg})")]
    if not isinstance(data, list):
        return [(label, "", None, f"{label}: expected a JSON list of {{file, caption}} objects")]
    return [_record(f"{label} item {i}", obj) for i, obj in enumerate(data, start=1)]


def _csv_entries(text: str, label: str) -> list[Entry]:
    # csv.reader rather than DictReader: it yields blank lines as [], so line numbers stay exact.
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    entries: list[Entry] = []
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1  # a quoted caption may span lines: name the line the row starts on
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            entries.append(
                (f"{label}:{start}", "", None, f"{label}:{start}: cannot parse CSV ({exc}); fix the quoting")
            )
            break
        where = f"{label}:{start}"
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip().lower() for h in row]
            if not any(k in header for k in _FILE_KEYS) or not any(k in header for k in _CAPTION_KEYS):
                problem = (
                    f"{where}: header must have a `file` (or `image`) and a `caption` (or `prompt`) column; "
                    f"found {', '.join(header)}"
                )
                return [(where, "", None, problem)]
            continue
        if len(row) > len(header):
            entries.append((where, "", None, f"{where}: more fields than the header has; quote the caption"))
            continue
        entries.append(_record(where, dict(zip(header, row, strict=False))))
    return entries


def inline_entries(inline: Iterable[tuple[str, str]] | None) -> list[Entry]:
    """Entries of the recipe's inline (image, caption) pairs, labelled `inline caption N`."""
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


def normalise_name(name: str, folder: Path) -> str:
    """Manifest spelling → scan's `rel_path`: `/` separators, no `./`, absolute paths made relative."""
    name = name.strip().replace("\\", "/")
    if posixpath.isabs(name) or os.path.isabs(name):
        try:
            name = Path(name).relative_to(folder.absolute()).as_posix()
        except ValueError:
            return name
    return posixpath.normpath(name)
