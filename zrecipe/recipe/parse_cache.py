"""A recipe's parse, remembered by the bytes of its text, so that a `zrecipe plan` of an unchanged recipe
need not import PyYAML: the import compiles yaml's regexes and costs ~10 ms of a ~0.12 s start-up
(issue 16); reading a remembered parse costs ~0.3 ms.

An entry is the result of `yamlsource.parse_recipe_text` — (data, lines, problems), plain Python values —
in `marshal` form, under the digest of everything the parse depends on: the text, the parser (this
package's version and yamlsource.py's file stamp), PyYAML's file stamp and Python's version. A read checks
that the entry names that same digest and that its payload hashes to the digest stored with it; anything
else (a torn, foreign or edited file, a value marshal cannot hold such as a YAML date) is a miss and the
text is parsed again. Entries live in the per-user cache folder, newest `KEEP` kept; the folder being
unwritable only turns the cache off.
"""

from __future__ import annotations

import contextlib
import functools
import marshal
import os
import sys
from pathlib import Path
from typing import Any

import xxhash

MAGIC = b"zrecipe-parse\x01"
KEEP = 256  # entries kept (each is a few kB): more than the recipes anyone edits at once
_DIGEST = 16


def _stamp(path: str | None) -> bytes:
    try:
        st = os.stat(path) if path else None
    except OSError:
        st = None
    return f"{path}:{st.st_mtime_ns}:{st.st_size}".encode() if st else b"-"


@functools.cache
def _parser_identity() -> bytes:
    """What, besides the text, decides the parse (found without importing PyYAML; once per process)."""
    import importlib.util

    from zrecipe import __version__
    from zrecipe.recipe import yamlsource

    spec = importlib.util.find_spec("yaml")
    return b"\0".join(
        [
            MAGIC,
            __version__.encode(),
            _stamp(yamlsource.__file__),
            _stamp(spec.origin if spec else None),
            repr(sys.version_info[:2]).encode(),
        ]
    )


def folder() -> Path:
    from zrecipe.cache_home import user_cache_folder

    return user_cache_folder("recipe-parses")


def _key(text: str) -> bytes:
    return xxhash.xxh3_128(_parser_identity() + b"\0" + text.encode("utf-8", "surrogatepass")).digest()


def read(text: str) -> tuple[Any, dict, list] | None:
    """The remembered parse of `text`, or None (never seen, or the entry is not what its name says)."""
    key = _key(text)
    path = folder() / key.hex()
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError:
        return None
    head = len(MAGIC)
    if blob[:head] != MAGIC or blob[head : head + _DIGEST] != key:
        return None
    payload = blob[head + 2 * _DIGEST :]
    if xxhash.xxh3_128(payload).digest() != blob[head + _DIGEST : head + 2 * _DIGEST]:
        return None
    try:
        value = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    if not (isinstance(value, tuple) and len(value) == 3 and isinstance(value[1], dict)):
        return None
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by the pruning below
    data, lines, problems = value
    return data, lines, list(problems)


def write(text: str, result: tuple[Any, dict, list]) -> None:
    """Remember `result` as the parse of `text`; silently does nothing where it cannot."""
    try:
        payload = marshal.dumps((result[0], result[1], tuple(result[2])))
    except ValueError:  # a value marshal cannot hold (a YAML timestamp): parse this recipe every time
        return
    key = _key(text)
    blob = MAGIC + key + xxhash.xxh3_128(payload).digest() + payload
    where = folder()
    try:
        from zrecipe.engine.files import atomic_path

        where.mkdir(parents=True, exist_ok=True)
        with atomic_path(where / key.hex()) as tmp:
            tmp.write_bytes(blob)
        _prune(where)
    except OSError:
        return


def _prune(where: Path) -> None:
    entries = []
    with os.scandir(where) as it:
        for entry in it:
            with contextlib.suppress(OSError):
                entries.append((entry.stat().st_mtime_ns, entry.path))
    for _, path in sorted(entries, reverse=True)[KEEP:]:
        with contextlib.suppress(OSError):
            os.unlink(path)
