"""Stat cache: hashes reused while the stat signature holds, racy entries re-hashed, damage tolerated."""

from __future__ import annotations

import os
import sqlite3

import pytest
import xxhash

from zrecipe.engine.statcache import BATCH_MIN_FILES, BATCHES_KEPT, StatCache, hash_file


def _files(tmp_path, n=3):
    paths = []
    for i in range(n):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(f"content {i}".encode())
        old = 1_600_000_000_000_000_000 + i  # well in the past: not racy
        os.utime(p, ns=(old, old))
        paths.append(p)
    return paths


def test_hashes_are_content_hashes_and_cached(tmp_path):
    paths = _files(tmp_path)
    with StatCache(tmp_path / "db" / "stat.sqlite") as sc:
        got = sc.hash_files(paths)
        assert sc.hashed == 3
        assert got == {str(p): xxhash.xxh128_hexdigest(p.read_bytes()) for p in paths}
        assert sc.hash_files(paths) == got
        assert sc.hashed == 0
    # persisted across instances
    with StatCache(tmp_path / "db" / "stat.sqlite") as sc:
        assert sc.hash_files([str(p) for p in paths]) == got
        assert sc.hashed == 0


def test_changed_file_is_rehashed_and_touch_keeps_hash(tmp_path):
    paths = _files(tmp_path)
    sc = StatCache(tmp_path / "stat.sqlite")
    first = sc.hash_files(paths)
    paths[1].write_bytes(b"new bytes!")
    t = 1_600_000_100_000_000_000
    os.utime(paths[1], ns=(t, t))
    os.utime(paths[2], ns=(t, t))  # touched, same bytes
    second = sc.hash_files(paths)
    assert sc.hashed == 2
    assert second[str(paths[0])] == first[str(paths[0])]
    assert second[str(paths[1])] != first[str(paths[1])]
    assert second[str(paths[2])] == first[str(paths[2])]


def _poison(db, path):
    # Pretend the file changed after we hashed it without its stat signature changing (same tick,
    # same size): the cached hash is now wrong, and only the racy rule can save us.
    with sqlite3.connect(db) as con:
        con.execute("UPDATE files SET hash = 'stale' WHERE path = ?", (str(path),))


def test_racy_entries_are_rehashed(tmp_path):
    fresh = tmp_path / "fresh.txt"
    fresh.write_text("aaaa")  # mtime = now: within the granularity of the moment it is recorded
    old = _files(tmp_path, 1)[0]
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db)
    sc.hash_files([fresh, old])
    _poison(db, fresh)
    _poison(db, old)
    got = sc.hash_files([fresh, old])
    assert sc.hashed == 1
    assert got[str(fresh)] == hash_file(fresh)  # racy: re-hashed
    assert got[str(old)] == "stale"  # not racy: the stat signature is trusted (that is the point)


def test_entry_stops_being_racy_once_recorded_late_enough(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("x")
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db, granularity_ns=10**18)  # everything counts as racy
    sc.hash_files([p])
    sc.hash_files([p])
    assert sc.hashed == 1
    sc.granularity_ns = 0  # a filesystem with exact timestamps: nothing is racy
    sc.hash_files([p])
    assert sc.hashed == 0


def test_precomputed_stats_are_used(tmp_path, monkeypatch):
    paths = _files(tmp_path, 2)
    sc = StatCache(tmp_path / "stat.sqlite")
    sc.hash_files(paths)
    stats = {str(p): os.stat(p) for p in paths}

    def no_stat(*a, **k):
        raise AssertionError("os.stat called although stats were given")

    monkeypatch.setattr("zrecipe.engine.statcache.os.stat", no_stat)
    assert len(sc.hash_files(paths, stats)) == 2 and sc.hashed == 0


def test_missing_file_raises(tmp_path):
    sc = StatCache(tmp_path / "stat.sqlite")
    with pytest.raises(FileNotFoundError):
        sc.hash_files([tmp_path / "nope"])


def test_corrupted_database_is_recreated_with_a_warning(tmp_path):
    paths = _files(tmp_path, 2)
    db = tmp_path / "stat.sqlite"
    db.write_bytes(b"this is not an sqlite database" * 100)
    with pytest.warns(RuntimeWarning, match="recreating"):
        sc = StatCache(db)
    assert sc.hash_files(paths)[str(paths[0])] == hash_file(paths[0])
    sc.close()
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT count(*) FROM files").fetchone()[0] == 2


def test_prune_forgets_deleted_files(tmp_path):
    paths = _files(tmp_path, 3)
    sc = StatCache(tmp_path / "stat.sqlite")
    sc.hash_files(paths)
    paths[0].unlink()
    assert sc.prune() == 1
    sc.hash_files(paths[1:])
    assert sc.hashed == 0


# --- batches: one row answers a whole unchanged call over many files --------------------------------------

N_BATCH = BATCH_MIN_FILES + 6


def _texts(tmp_path, n=N_BATCH):
    paths = []
    for i in range(n):
        p = tmp_path / f"c{i}.txt"
        p.write_text(f"caption number {i}" + "!" * (i % 5))
        old = 1_600_000_000_000_000_000 + i
        os.utime(p, ns=(old, old))
        paths.append(str(p))
    return paths


def _count(db, table):
    with sqlite3.connect(db) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_an_unchanged_call_is_answered_by_its_batch(tmp_path):
    paths = _files(tmp_path, N_BATCH)
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db)
    want = {str(p): hash_file(p) for p in paths}
    assert sc.hash_files(paths) == want and sc.hashed == N_BATCH
    assert _count(db, "batches") == 1
    _poison(db, paths[3])  # the per-file row is not read: the batch answers
    assert sc.hash_files(paths) == want and sc.hashed == 0
    # A call below the batch size goes by the rows (and a poisoned row is trusted there, as before).
    assert sc.hash_files(paths[3:4]) == {str(paths[3]): "stale"}


def test_a_changed_file_misses_the_batch(tmp_path):
    paths = _files(tmp_path, N_BATCH)
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db)
    sc.hash_files(paths)
    paths[5].write_bytes(b"changed!")
    t = 1_600_000_100_000_000_000
    os.utime(paths[5], ns=(t, t))
    got = sc.hash_files(paths)
    assert sc.hashed == 1 and got[str(paths[5])] == hash_file(paths[5])
    assert got == {str(p): hash_file(p) for p in paths}
    assert sc.hash_files(paths) == got and sc.hashed == 0  # the new batch
    assert _count(db, "batches") == 2


def test_a_racy_batch_is_not_trusted(tmp_path):
    paths = _files(tmp_path, N_BATCH)
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db, granularity_ns=10**18)  # every mtime is "too recent"
    sc.hash_files(paths)
    with sqlite3.connect(db) as con:
        con.execute("UPDATE batches SET data = ?", (b",".join([b"bad"] * N_BATCH),))
    got = sc.hash_files(paths)
    assert sc.hashed == N_BATCH and got == {str(p): hash_file(p) for p in paths}


def test_small_files_come_from_their_batch_byte_for_byte(tmp_path):
    paths = _texts(tmp_path)
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db)
    want = {p: open(p, "rb").read() for p in paths}
    assert sc.read_small_files(paths) == want
    assert _count(db, "batches") == 1
    with sqlite3.connect(db) as con:  # rows no longer consulted for an unchanged call
        con.execute("UPDATE texts SET data = x'00'")
    assert sc.read_small_files(paths) == want
    # One caption rewritten with another length: the batch misses, the new bytes are read.
    with open(paths[7], "w") as f:
        f.write("a new and longer caption")
    t = 1_600_000_100_000_000_000
    os.utime(paths[7], ns=(t, t))
    got = sc.read_small_files(paths)
    assert got[paths[7]] == b"a new and longer caption" and got[paths[8]] == b"\x00"  # row trusted again


def test_a_missing_small_file_is_reported_and_makes_no_batch(tmp_path):
    paths = _texts(tmp_path)
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db)
    gone = paths[2]
    os.unlink(gone)
    got = sc.read_small_files(paths)
    assert isinstance(got[gone], FileNotFoundError) and len(got) == len(paths)
    assert _count(db, "batches") == 0


def test_only_the_newest_batches_are_kept(tmp_path):
    paths = _files(tmp_path, N_BATCH + BATCHES_KEPT + 2)
    db = tmp_path / "stat.sqlite"
    sc = StatCache(db)
    for i in range(BATCHES_KEPT + 3):
        sc.hash_files(paths[i : i + N_BATCH])  # a different set of files each time
    assert _count(db, "batches") == BATCHES_KEPT
    newest, oldest = paths[-N_BATCH:], paths[:N_BATCH]
    _poison(db, newest[0])
    _poison(db, oldest[0])
    assert sc.hash_files(newest)[str(newest[0])] == hash_file(newest[0])  # its batch was kept
    assert sc.hash_files(oldest)[str(oldest[0])] == "stale"  # evicted: the rows answer


def test_stat_columns_keep_signatures_beyond_64_bits(tmp_path):
    """A date after 2262 does not fit the packed rows: the columns switch to Python ints, values intact."""
    from zrecipe.engine.statcache import _stat_columns

    paths = _files(tmp_path, 4)
    far = 2**63 + 10**9
    try:
        os.utime(paths[2], ns=(far, far))
    except (OverflowError, OSError):
        pytest.skip("this file system cannot store a date after 2262")
    errors: dict = {}
    names, *columns = _stat_columns([*paths, tmp_path / "missing"], errors)
    assert names == [str(p) for p in paths]
    assert list(errors) == [str(tmp_path / "missing")]
    stats = [os.stat(p) for p in paths]
    expected = [[getattr(st, f) for st in stats] for f in ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino")]
    assert [list(c) for c in columns] == expected


def test_a_date_after_2262_is_hashed_every_time_not_a_crash(tmp_path):
    """SQLite integers are 64-bit: a file stamped after 2262 (a bad clock, a hostile archive) cannot be
    recorded. It is left out of the cache (hashed anew on every call, correctly); the others are cached."""
    paths = _files(tmp_path, 4)
    far = 2**63 + 10**9
    try:
        os.utime(paths[1], ns=(far, far))
    except (OverflowError, OSError):
        pytest.skip("this file system cannot store a date after 2262")
    want = {str(p): hash_file(p) for p in paths}
    with StatCache(tmp_path / "stat.sqlite") as sc:
        assert sc.hash_files(paths) == want
        assert sc.hash_files(paths) == want
        assert sc.hashed == 1  # only the file that could not be recorded
        texts = sc.read_small_files(paths)
        assert texts[str(paths[1])] == paths[1].read_bytes()
