"""Build records: what the last build of a graph had, per (kind, item); also the store's gc roots.

A record is a file `roots/<graph slug>-<hash>.record` under the store with two JSON lines: a small header
(graph id, per-kind digests) and the body (per kind: version, the distinct parameter sets, and per item
[key, parameter-set index, resolved inputs]). Parameter sets are stored once per distinct value, so
100,000 items sharing one set of resize parameters cost one dict, not 100,000.

The header alone answers "did anything change since the last build?" (per-kind digests), so a no-op build
neither parses nor rewrites the body; the body is parsed lazily, only when a stale node needs its reason.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePath
from typing import Any

import xxhash

from .store import write_atomic

RECORD_FORMAT = 1


def record_path(store_root: str | os.PathLike[str], graph_id: str) -> Path:
    """Where the record of graph `graph_id` lives in the store rooted at `store_root`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", graph_id)[-60:].strip("._") or "graph"
    return Path(store_root) / "roots" / f"{slug}-{xxhash.xxh64_hexdigest(graph_id.encode())}.record"


def pending_path(store_root: str | os.PathLike[str], graph_id: str) -> Path:
    """Keys a running (or killed) build of `graph_id` is producing: gc keeps their entries/work dirs."""
    return record_path(store_root, graph_id).with_suffix(".pending")


def jsonable(obj: Any) -> Any:
    """Parameters as plain JSON values (paths → posix str, tuples/sets → lists, bytes → hex)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, PurePath):
        return PurePath(os.path.normpath(obj)).as_posix()
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=repr)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()
    raise TypeError(f"cannot record parameter value {obj!r}")


@dataclass(frozen=True, slots=True)
class Entry:
    """One node as recorded by a build: its key, parameters (JSON form) and resolved inputs."""

    key: str
    params: dict[str, Any]
    inputs: list[str]


def kind_digest(items: Iterable[tuple[str, str]]) -> str:
    """Digest of a kind's (item, key) pairs, in order: equal digests → nothing of that kind changed.

    The xxh128 of the lines `item NUL key` joined by newlines, hashed a slice of lines at a time: one
    join per slice is ~10× faster than hashing pair by pair, and 100,000 items never become one text
    (~30 MB more at the end of every plan)."""
    h = xxhash.xxh3_128()  # streaming xxh3_128: the same digest as xxh128_hexdigest of the whole text
    items = iter(items)
    separator = ""
    while chunk := [f"{item}\0{key}" for item, key in islice(items, _DIGEST_SLICE)]:
        h.update((separator + "\n".join(chunk)).encode("utf-8", "surrogatepass"))
        separator = "\n"
    return h.hexdigest()


_DIGEST_SLICE = 4096  # lines hashed per update in kind_digest


class Record:
    """The record of one graph's last build (see module docstring). Build with `RecordBuilder`."""

    def __init__(self, header: dict[str, Any], body: dict[str, Any] | None = None, path: Path | None = None):
        self.header = header
        self._body = body
        self.path = path

    @classmethod
    def load(cls, store_root: str | os.PathLike[str], graph_id: str) -> Record | None:
        """The record of `graph_id` in the store, or None (never built, or unreadable: treated as new)."""
        return cls.load_file(record_path(store_root, graph_id))

    @classmethod
    def load_file(cls, path: Path) -> Record | None:
        """Read a record's header (the body is parsed on first use)."""
        try:
            with open(path, "rb") as f:
                header = json.loads(f.readline())
        except (OSError, ValueError):
            return None
        if not isinstance(header, dict) or header.get("format") != RECORD_FORMAT:
            return None
        return cls(header, None, path)

    @property
    def graph_id(self) -> str:
        return self.header["graph"]

    @property
    def digests(self) -> dict[str, str]:
        """{kind: kind_digest} as recorded."""
        return self.header.get("digests", {})

    def body(self) -> dict[str, Any]:
        """The parsed body (parsed once; an unreadable body reads as empty: every node looks new)."""
        if self._body is None:
            body: dict[str, Any] = {"kinds": {}, "pending": []}
            if self.path is not None:
                try:
                    with open(self.path, "rb") as f:
                        f.readline()
                        body = json.loads(f.readline())
                except (OSError, ValueError):
                    pass
            self._body = body
        return self._body

    def version(self, kind: str) -> int | str | None:
        """The step version `kind` had, or None if the kind was not built."""
        k = self.body()["kinds"].get(kind)
        return None if k is None else k["version"]

    def entry(self, kind: str, item: str) -> Entry | None:
        """The recorded node (`kind`, `item`), or None."""
        k = self.body()["kinds"].get(kind)
        row = None if k is None else k["items"].get(item)
        if row is None:
            return None
        return Entry(row[0], k["params"][row[1]], row[2])

    def kinds(self) -> list[str]:
        """Kinds present in the record."""
        return list(self.body()["kinds"])

    def iter_kind(self, kind: str) -> Iterator[tuple[str, Entry]]:
        """(item, Entry) of every recorded node of `kind`."""
        k = self.body()["kinds"].get(kind)
        if k is not None:
            for item, row in k["items"].items():
                yield item, Entry(row[0], k["params"][row[1]], row[2])

    def keys(self) -> set[str]:
        """Every key the record references (its nodes and pending keys): gc roots."""
        out = set(self.body().get("pending", []))
        for k in self.body()["kinds"].values():
            out.update(row[0] for row in k["items"].values())
        return out


class RecordBuilder:
    """Accumulates a new record kind by kind, deduplicating parameter sets."""

    def __init__(self, graph_id: str):
        self.graph_id = graph_id
        self.kinds: dict[str, dict[str, Any]] = {}
        self._param_index: dict[tuple[str, int], int] = {}
        self.pending: set[str] = set()
        self.digests: dict[str, str] = {}

    def kind(self, kind: str, version: int | str) -> dict[str, Any]:
        """The record of `kind` (created empty, so kinds without nodes are recorded too)."""
        return self.kinds.setdefault(kind, {"version": version, "params": [], "items": {}, "_byval": {}})

    def add(self, kind: str, version: int | str, item: str, key: str, params: Any, inputs: list[str]) -> None:
        """Record node (`kind`, `item`); `params` objects are deduplicated by identity, then by value."""
        k = self.kind(kind, version)
        idx = self._param_index.get((kind, id(params)))
        if idx is None:
            value = jsonable(params)
            text = json.dumps(value, sort_keys=True)
            idx = k["_byval"].get(text)
            if idx is None:
                idx = k["_byval"][text] = len(k["params"])
                k["params"].append(value)
            self._param_index[(kind, id(params))] = idx
            k.setdefault("_keep", []).append(params)  # keep alive so id() is not reused
        k["items"][item] = [key, idx, inputs]

    def copy_kind(self, record: Record, kind: str) -> None:
        """Carry `kind` over unchanged from a previous record (kinds left out by `Graph.until`)."""
        src = record.body()["kinds"].get(kind)
        if src is not None:
            self.kinds[kind] = {"version": src["version"], "params": src["params"], "items": src["items"]}
            if kind in record.digests:
                self.digests[kind] = record.digests[kind]

    def write(self, store_root: str | os.PathLike[str]) -> Path:
        """Write the record atomically; returns its path."""
        kinds = {}
        for name, k in self.kinds.items():
            kinds[name] = {"version": k["version"], "params": k["params"], "items": k["items"]}
            if name not in self.digests:
                self.digests[name] = kind_digest((i, row[0]) for i, row in k["items"].items())
        header = {"format": RECORD_FORMAT, "graph": self.graph_id, "digests": self.digests}
        body = {"kinds": kinds, "pending": sorted(self.pending)}
        path = record_path(store_root, self.graph_id)
        data = json.dumps(header).encode() + b"\n" + json.dumps(body, separators=(",", ":")).encode() + b"\n"
        write_atomic(path, data)
        return path


def iter_records(store_root: str | os.PathLike[str]) -> Iterator[Record]:
    """Every readable record in the store."""
    roots = Path(store_root) / "roots"
    if roots.is_dir():
        for p in sorted(roots.glob("*.record")):
            rec = Record.load_file(p)
            if rec is not None:
                yield rec
