"""Validation helpers: a problem collector that knows lines, typed field specs, did-you-mean, paths.

A *spec* is a callable `value -> converted value` that raises `Bad` with one or more (sub-path, message)
pairs. `Reader` applies specs to the keys of one mapping and records every problem in the `Context`
instead of raising, so one load reports everything that is wrong.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from zrecipe.errors import RecipeError

KeyPath = tuple  # ("datasets", 0, "captions")
Spec = Callable[[Any], Any]
MISSING: Any = object()


def format_path(path: KeyPath) -> str:
    """`("datasets", 0, "path")` → `datasets[0].path`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def describe(value: Any) -> str:
    """A short, user-facing rendering of a value and its YAML type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    kind = {int: "an integer", float: "a number", str: "text"}.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{shown[:40]}{'...' if len(shown) > 40 else ''} ({kind})"


def suggest(word: Any, choices: Iterable[str]) -> str:
    """` (did you mean `x`?)` for the closest choice, or ``."""
    if not isinstance(word, str):
        return ""
    lowered = {c.lower(): c for c in choices}
    if word.lower() in lowered:  # differs only in case
        return f"; did you mean `{lowered[word.lower()]}`?"
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


class Bad(Exception):
    """A value that does not fit its spec: `items` = [(sub-path, message)]."""

    def __init__(self, message: str = "", at: KeyPath = (), items: list | None = None):
        super().__init__(message)
        self.items = items if items is not None else [(at, message)]


class Context:
    """Collects problems as `FILE:LINE: key.path: message`; the line is the nearest known ancestor's."""

    def __init__(self, label: str, lines: Mapping[KeyPath, int] | None = None):
        self.label = label
        self.lines = lines or {}
        self._problems: list[tuple[int, int, str]] = []

    @property
    def count(self) -> int:
        return len(self._problems)

    def line(self, path: KeyPath) -> int | None:
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return None

    def add(self, path: KeyPath, message: str, line: int | None = None) -> None:
        line = line if line is not None else self.line(path)
        where = f"{self.label}:{line}" if line is not None else self.label
        key = format_path(path)
        text = f"{where}: {key}: {message}" if key else f"{where}: {message}"
        self._problems.append((line or 0, len(self._problems), text))

    def raise_if_any(self) -> None:
        if self._problems:
            lines = [text for _, _, text in sorted(self._problems)]
            raise RecipeError("\n".join(lines), lines)


# ----------------------------------------------------------------------------------------------- specs


def integer(
    *,
    min: int | None = None,
    max: int | None = None,
    multiple_of: int | None = None,
    nullable: bool = False,
    words: tuple[str, ...] = (),
) -> Spec:
    """An int (never a bool or float), optionally null or one of `words`, within bounds."""

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, str) and value in words:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            alt = " or " + " / ".join(f"`{w}`" for w in words) if words else ""
            null = " or null" if nullable else ""
            raise Bad(f"expected an integer{alt}{null}, got {describe(value)}")
        if min is not None and value < min:
            raise Bad(f"must be at least {min}, got {value}")
        if max is not None and value > max:
            raise Bad(f"must be at most {max}, got {value}")
        if multiple_of and value % multiple_of:
            raise Bad(
                f"must be a multiple of {multiple_of}, got {value} (try {_nearest(value, multiple_of)})"
            )
        return value

    return check


def _nearest(value: int, step: int) -> int:
    return max(step, round(value / step) * step)


def number(
    *,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    nullable: bool = False,
) -> Spec:
    """A finite float (ints accepted, bools not) within bounds; returned as float."""

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Bad(f"expected a number{' or null' if nullable else ''}, got {describe(value)}")
        try:
            out = float(value)
        except OverflowError:
            raise Bad(f"{value} is too large") from None
        if not math.isfinite(out):
            raise Bad(f"must be a finite number, got {value}")
        if gt is not None and not out > gt:
            raise Bad(f"must be greater than {gt:g}, got {out:g}")
        if ge is not None and not out >= ge:
            raise Bad(f"must be at least {ge:g}, got {out:g}")
        if lt is not None and not out < lt:
            raise Bad(f"must be less than {lt:g}, got {out:g}")
        if le is not None and not out <= le:
            raise Bad(f"must be at most {le:g}, got {out:g}")
        return out

    return check


def boolean() -> Spec:
    """true / false only (not 0/1, not "yes" in quotes)."""

    def check(value: Any) -> Any:
        if not isinstance(value, bool):
            raise Bad(f"expected true or false, got {describe(value)}")
        return value

    return check


def text(
    *, choices: tuple[str, ...] | None = None, nullable: bool = False, allow_empty: bool = False
) -> Spec:
    """A string, optionally from a closed set (with a did-you-mean)."""

    def check(value: Any) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, str):
            if choices:
                raise Bad(f"expected one of {', '.join(choices)}; got {describe(value)}")
            raise Bad(f"expected text{' or null' if nullable else ''}, got {describe(value)}")
        if choices is not None and value not in choices:
            raise Bad(f"must be one of {', '.join(choices)}; got {value!r}{suggest(value, choices)}")
        if not allow_empty and not value.strip():
            raise Bad("must not be empty")
        return value

    return check


def list_of(item: Spec, *, nonempty: bool = False, unique: bool = False, length: int | None = None) -> Spec:
    """A list whose every item fits `item`; all bad items are reported. Returned as a tuple."""

    def check(value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise Bad(f"expected a list, got {describe(value)}")
        if length is not None and len(value) != length:
            raise Bad(f"expected a list of {length} items, got {len(value)}")
        if nonempty and not value:
            raise Bad("must not be empty")
        out, bad, seen = [], [], {}
        for i, v in enumerate(value):
            try:
                converted = item(v)
            except Bad as exc:
                bad.extend(((i,) + at, msg) for at, msg in exc.items)
                continue
            if unique and _hashable(converted) and converted in seen:
                bad.append(((i,), f"{converted!r} is listed twice (also item {seen[converted]})"))
                continue
            if _hashable(converted):
                seen.setdefault(converted, i)
            out.append(converted)
        if bad:
            raise Bad(items=bad)
        return tuple(out)

    return check


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------- reader


class Reader:
    """One mapping of the recipe at `path`: typed access that records problems instead of raising."""

    def __init__(self, ctx: Context, path: KeyPath, data: Mapping[str, Any]):
        self.ctx, self.path, self.data = ctx, path, data

    @classmethod
    def open(cls, ctx: Context, path: KeyPath, value: Any) -> Reader | None:
        """A Reader over `value` if it is a mapping (with text keys); None (and a problem) otherwise."""
        if not isinstance(value, Mapping):
            ctx.add(path, f"expected a mapping of keys, got {describe(value)}")
            return None
        good = {}
        for key, item in value.items():
            if isinstance(key, str):
                good[key] = item
            else:
                ctx.add(path, f"keys must be text, got {describe(key)}")
        return cls(ctx, path, good)

    def check_keys(self, allowed: Iterable[str], hints: Mapping[str, str] | None = None) -> None:
        """Report every key not in `allowed`, with a did-you-mean or a hint where the key belongs."""
        allowed = tuple(allowed)
        for key in self.data:
            if key in allowed:
                continue
            hint = suggest(key, allowed)
            if not hint and hints and key in hints:
                hint = f"; it belongs in `{hints[key]}`"
            self.ctx.add(self.path + (key,), f"unknown key{hint}")

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, spec: Spec, default: Any = MISSING) -> Any:
        """The converted value of `key`, `default` when absent, MISSING (problem recorded) when bad."""
        if key not in self.data:
            return default
        try:
            return spec(self.data[key])
        except Bad as exc:
            for at, msg in exc.items:
                self.ctx.add(self.path + (key,) + at, msg)
            return MISSING

    def require(self, key: str, spec: Spec, why: str = "") -> Any:
        """Like get, but a missing key is a problem."""
        if key not in self.data:
            self.ctx.add(self.path + (key,), f"missing{'; ' + why if why else ''}")
            return MISSING
        return self.get(key, spec)

    def fill(self, specs: Mapping[str, Spec]) -> dict[str, Any]:
        """Converted values of the keys of `specs` that are present and valid (dataclass kwargs)."""
        out = {}
        for key, spec in specs.items():
            value = self.get(key, spec)
            if value is not MISSING:
                out[key] = value
        return out

    def sub(self, key: str) -> Reader | None:
        """A Reader over a nested mapping; None when the key is absent, null, or not a mapping."""
        value = self.data.get(key)
        return None if value is None else Reader.open(self.ctx, self.path + (key,), value)


# ----------------------------------------------------------------------------------------------- paths

_ENV = re.compile(r"\$(\w+)|\$\{(\w+)\}")
_PATH_PREFIXES = ("/", "./", "../", "~", "$", ".\\", "..\\")


def written_as_path(raw: str, root: Path | None = None) -> bool:
    """`raw` is meant as a path rather than a name (a preset, a Hugging Face `org/repo`): written as one
    (absolute, `./`, `../`, `~`, `$VAR`, `.`, `..`), or, given `root`, an existing folder there."""
    if raw.startswith(_PATH_PREFIXES) or raw in (".", "..") or os.path.isabs(raw):
        return True
    return root is not None and "\0" not in raw and os.path.isdir(os.path.join(root, raw))


def resolve_path(ctx: Context, path: KeyPath, raw: Any, root: Path) -> Path | None:
    """Expand `$VAR`, `${VAR}` and `~`, then make absolute against `root` (lexically: `..` folded,
    symlinks kept). None (and a problem) for something that is not a usable path."""
    if not isinstance(raw, str):
        ctx.add(path, f"expected a path, got {describe(raw)}")
        return None
    if not raw.strip():
        ctx.add(path, "must not be empty")
        return None
    if "\0" in raw:
        ctx.add(path, "contains a NUL character")
        return None
    unset = [a or b for a, b in _ENV.findall(raw) if (a or b) not in os.environ]
    if unset:
        ctx.add(path, f"environment variable ${unset[0]} is not set")
        return None
    try:
        expanded = Path(os.path.expanduser(os.path.expandvars(raw)))
        if not expanded.is_absolute():
            expanded = root / expanded
        return Path(os.path.abspath(expanded))
    except (ValueError, OSError) as exc:  # e.g. `~user` lookup of a name the OS cannot encode
        ctx.add(path, f"not a usable path: {exc}")
        return None
