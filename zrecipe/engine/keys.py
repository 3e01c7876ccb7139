"""Canonical encoding of step parameters and the step key derived from it.

A step key must change when anything that can change a step's output changes, and must NOT change for
spellings that mean the same thing (dict order, `1e-4` vs `0.0001`, `a/./b` vs `a/b`, NFC vs NFD text).
The encoding is a small tagged, length-prefixed byte format, so that no two different values can produce
the same bytes (a string can never be mistaken for a number, a list boundary for a string character).

The format is pinned by golden-hash tests (tests/test_build_keys.py): changing it changes every key in
every user's store, so bump `KEY_FORMAT` and update the goldens on purpose only.
"""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

import xxhash

# Part of every step key: bump to invalidate all stores when the encoding's meaning changes.
KEY_FORMAT = 1


def _text(s: str) -> bytes:
    # NFC so that the same text typed on macOS (NFD file names) and Linux gives one key.
    b = unicodedata.normalize("NFC", s).encode("utf-8")
    return b"%d:" % len(b) + b


def _path(p: PurePath) -> bytes:
    # normpath folds `a/./b` and `a//b`; as_posix keeps keys identical across platforms.
    return _text(PurePath(os.path.normpath(p)).as_posix())


def _encode(obj: Any, out: list[bytes]) -> None:
    # Order matters: bool is a subclass of int, and str/bytes are Sequences.
    if obj is None:
        out.append(b"N")
    elif obj is True:
        out.append(b"T")
    elif obj is False:
        out.append(b"F")
    elif isinstance(obj, int):
        out.append(b"i%d;" % obj)
    elif isinstance(obj, float):
        # repr() is the shortest round-trip spelling: 1e-4 and 0.0001 are the same float, one repr.
        out.append(b"f" + (b"nan" if math.isnan(obj) else repr(obj).encode("ascii")) + b";")
    elif isinstance(obj, str):
        out.append(b"s" + _text(obj))
    elif isinstance(obj, PurePath):
        out.append(b"p" + _path(obj))
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        b = bytes(obj)
        out.append(b"b%d:" % len(b) + b)
    elif isinstance(obj, Mapping):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical(): dict keys must be str, got {type(k).__name__} {k!r}")
            items.append((unicodedata.normalize("NFC", k), v))
        items.sort(key=lambda kv: kv[0])
        if len({k for k, _ in items}) != len(items):
            raise TypeError("canonical(): two dict keys are equal after Unicode NFC normalisation")
        out.append(b"d%d:" % len(items))
        for k, v in items:
            out.append(_text(k))
            _encode(v, out)
    elif isinstance(obj, (list, tuple)):
        # Tuples and lists are one type: YAML gives lists, code often builds tuples.
        out.append(b"l%d:" % len(obj))
        for v in obj:
            _encode(v, out)
    elif isinstance(obj, (set, frozenset)):
        # Sets have no order: sort members by their own encoding.
        members = sorted(canonical(v) for v in obj)
        out.append(b"S%d:" % len(members))
        out.extend(members)
    else:
        raise TypeError(
            f"canonical(): cannot encode {type(obj).__name__} {obj!r}; convert it to "
            "str/int/float/bool/None/bytes/Path/list/dict first"
        )


def canonical(obj: Any) -> bytes:
    """The canonical bytes of `obj` (JSON-like values, bytes, paths, sets); TypeError on anything else.

    Equal meaning → equal bytes: dict keys sorted, floats by their shortest repr, tuples == lists, paths
    normalised (`a/./b` == `a/b`, posix separators), strings NFC. Different values → different bytes:
    `1` != `1.0` != `"1"` != `True`, `Path("a")` != `"a"`.
    """
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


def key_prefix(kind: str, version: int | str, params: Mapping[str, Any]) -> bytes:
    """The leading bytes of every key of one (kind, version, params): lets the planner encode the
    parameters shared by 100,000 items once. `step_key` == xxh128(prefix + canonical(inputs))."""
    return (
        b"l6:"  # one list: [tag, KEY_FORMAT, kind, version, params, inputs]
        + canonical("zrecipe-step")
        + canonical(KEY_FORMAT)
        + canonical(kind)
        + canonical(version)
        + canonical(params)
    )


def _str_list_body(inputs: Sequence[Any]) -> bytes | None:
    """canonical(list(inputs)) for a list of ASCII strings (keys / hex hashes), built with a handful of
    C-level joins instead of one Python call per element: a node over 100,000 inputs is ~50× faster.
    None when the inputs are anything else (the general encoder handles them)."""
    n = len(inputs)
    if n == 1:
        x = inputs[0]
        if type(x) is str and x.isascii():
            return b"l1:s%d:%s" % (len(x), x.encode("ascii"))
        return None
    if n == 0 or set(map(type, inputs)) != {str}:
        return None
    lengths = set(map(len, inputs))
    if len(lengths) == 1:
        tag = f"s{lengths.pop()}:"
        text = tag + tag.join(inputs)
    else:
        text = "".join([f"s{len(x)}:{x}" for x in inputs])
    if not text.isascii():
        return None
    return b"l%d:" % n + text.encode("ascii")


def key_from_prefix(prefix: bytes, inputs: Sequence[Any]) -> str:
    """Finish a key started by `key_prefix` with the node's resolved inputs."""
    body = _str_list_body(inputs) if type(inputs) in (list, tuple) else None
    if body is None:
        body = canonical(list(inputs))
    return xxhash.xxh128_hexdigest(prefix + body)


def step_key(kind: str, version: int | str, params: Mapping[str, Any], inputs: Sequence[Any]) -> str:
    """The store key (32 hex chars, xxh128) of one step run.

    `inputs` are the upstream steps' keys and/or content hashes of input files, in a meaningful order.
    """
    return key_from_prefix(key_prefix(kind, version, params), inputs)


def hash_bytes(data: bytes) -> str:
    """xxh128 hex digest of bytes: the content hash used throughout the store and stat cache."""
    return xxhash.xxh128_hexdigest(data)
