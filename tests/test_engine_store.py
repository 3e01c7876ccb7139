"""Store: atomic entries, manifests, verification, corrupt entries become misses, write races."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from zrecipe.engine.keys import hash_bytes
from zrecipe.engine.store import MANIFEST, Store, write_atomic

KEY = "ab" + "0" * 30


def test_commit_writes_manifest_and_entry(tmp_path):
    store = Store(tmp_path, fsync=True)
    assert not store.has(KEY) and store.get(KEY) is None
    with store.writer(KEY) as tmp:
        assert tmp.parent == store.path(KEY).parent and tmp.name.startswith(".tmp-")
        (tmp / "a.txt").write_text("hello")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
        assert not store.has(KEY)  # invisible until committed
    assert store.has(KEY)
    manifest = json.loads((store.path(KEY) / MANIFEST).read_text())
    assert manifest["key"] == KEY
    assert manifest["files"] == {
        "a.txt": [5, hash_bytes(b"hello")],
        "sub/b.bin": [2, hash_bytes(b"\x00\x01")],
    }
    assert store.get(KEY, verify=True) == store.path(KEY)
    assert store.manifest(KEY)["a.txt"] == (5, hash_bytes(b"hello"))
    assert list(store.iter_temps()) == []


def test_exception_leaves_no_entry_and_no_temp(tmp_path):
    store = Store(tmp_path, fsync=False)
    with pytest.raises(RuntimeError), store.writer(KEY) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("step crashed")
    assert not store.path(KEY).exists()
    assert list(store.iter_temps()) == []


def test_truncated_file_is_a_miss_and_discarded(tmp_path):
    store = Store(tmp_path, fsync=False)
    store.put_bytes(KEY, {"a.txt": b"hello world"})
    (store.path(KEY) / "a.txt").write_bytes(b"hello")
    assert store.check(KEY, "exists") == "ok"  # the cheap check cannot see it...
    assert store.check(KEY, "sizes") == "corrupt"  # ...the size check does
    assert store.get(KEY) is None
    assert not store.path(KEY).exists()  # discarded: the next build rebuilds it
    assert list(store.iter_temps()) == []


def test_same_size_damage_needs_hash_verification(tmp_path):
    store = Store(tmp_path, fsync=False)
    store.put_bytes(KEY, {"a.txt": b"hello"})
    (store.path(KEY) / "a.txt").write_bytes(b"HELLO")
    assert store.check(KEY, "sizes") == "ok"
    assert store.check(KEY, "hashes") == "corrupt"
    assert store.get(KEY, verify=True) is None and not store.path(KEY).exists()


def test_missing_manifest_is_corrupt_and_rewrite_replaces_it(tmp_path):
    store = Store(tmp_path, fsync=False)
    store.put_bytes(KEY, {"a.txt": b"v1"})
    (store.path(KEY) / MANIFEST).unlink()
    assert not store.has(KEY)
    assert store.check(KEY) == "corrupt"
    # committing the key again replaces the damaged folder that is in the way
    store.put_bytes(KEY, {"a.txt": b"v1"})
    assert store.get(KEY, verify=True) is not None


def test_losing_a_race_keeps_the_winner(tmp_path):
    store = Store(tmp_path, fsync=False)
    with store.writer(KEY) as tmp:
        (tmp / "a.txt").write_text("mine")
        store.put_bytes(KEY, {"a.txt": b"theirs"})  # another process commits first
    assert (store.path(KEY) / "a.txt").read_text() == "theirs"
    assert list(store.iter_temps()) == []


def test_existing_lists_shards_once(tmp_path):
    store = Store(tmp_path, fsync=False)
    keys = [f"{i:02x}" + "1" * 30 for i in range(0, 256, 17)]
    for k in keys[::2]:
        store.put_bytes(k, {"x": b"1"})
    assert store.existing(keys + ["ff" + "2" * 30]) == set(keys[::2])
    assert sorted(store.iter_entries()) == sorted(keys[::2])
    assert Store(tmp_path / "empty").existing(keys) == set()


def test_step_cannot_write_its_own_manifest(tmp_path):
    store = Store(tmp_path, fsync=False)
    with pytest.raises(ValueError, match="MANIFEST"), store.writer(KEY) as tmp:
        (tmp / MANIFEST).write_text("{}")
    assert not store.path(KEY).exists()


def test_write_atomic(tmp_path):
    target = tmp_path / "d" / "f.json"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(target.parent) == ["f.json"]


def _hammer(root: str, n: int) -> None:
    store = Store(root, fsync=False)
    for i in range(n):
        key = f"{i % 4:02x}" + f"{i:030x}"
        with store.writer(key) as tmp:
            (tmp / "data.bin").write_bytes(key.encode() * 100)


def test_concurrent_writers_never_corrupt(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), 40)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    store = Store(tmp_path)
    keys = list(store.iter_entries())
    assert len(keys) == 40
    for key in keys:
        assert store.check(key, "hashes") == "ok"
    assert list(store.iter_temps()) == []
