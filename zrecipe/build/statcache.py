"""Stat cache: (path, size, mtime_ns, ctime_ns, inode) → content hash, in SQLite.

A no-op build must not reread the dataset (or a 20 GB model): a file whose stat signature is unchanged
keeps its cached hash. Git's "racy" rule closes the hole left by coarse timestamps: a file written in the
same timestamp tick as we hashed it could change again without changing its mtime, so an entry whose mtime
is within `granularity_ns` of the moment it was recorded is re-hashed on the next lookup.
"""

from __future__ import annotations

import os
import sqlite3
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

import xxhash

from .pause import paused_gc

# 2 s covers FAT's timestamps (the coarsest in use); ext4/APFS ticks are far finer, so this only means
# that files written in the last 2 s before a build are hashed once more on the next one.
DEFAULT_GRANULARITY_NS = 2_000_000_000
_CHUNK = 1 << 20

_SCHEMA = """CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER,
    hash TEXT, recorded_ns INTEGER) WITHOUT ROWID"""


def hash_file(path: str | os.PathLike[str]) -> str:
    """xxh128 hex digest of a file's content, read in 1 MiB chunks (flat memory for big weights)."""
    h = xxhash.xxh128()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class StatCache:
    """Content hashes of files, cached against their stat signature in an SQLite database.

    Safe to share between processes (WAL mode, busy timeout). A corrupted database is recreated with a
    warning: it is only a cache, so the worst case is hashing every file once more.
    """

    def __init__(self, db_path: str | os.PathLike[str], granularity_ns: int = DEFAULT_GRANULARITY_NS):
        self.db_path = Path(db_path)
        self.granularity_ns = granularity_ns
        self.hashed = 0  # files actually read by the last hash_files() call (tests and reports use it)
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            return self._recreate(exc)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable enough for a cache under WAL and avoids an fsync per transaction.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute("SELECT count(*) FROM files WHERE path = ''").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _recreate(self, exc: Exception) -> sqlite3.Connection:
        warnings.warn(
            f"stat cache {self.db_path} is unreadable ({exc}); recreating it (files will be re-hashed once)",
            RuntimeWarning,
            stacklevel=3,
        )
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.db_path}{suffix}")
            except FileNotFoundError:
                pass
        return self._connect()

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> StatCache:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self) -> dict[str, tuple]:
        try:
            cur = self._db.execute(
                "SELECT path, size, mtime_ns, ctime_ns, inode, hash, recorded_ns FROM files"
            )
            return {r[0]: r for r in cur}
        except sqlite3.DatabaseError as exc:
            self._db.close()
            self._db = self._recreate(exc)
            return {}

    def hash_files(
        self,
        paths: Iterable[str | os.PathLike[str]],
        stats: Mapping[str, os.stat_result] | None = None,
    ) -> dict[str, str]:
        """Content hash of every path, as {os.fspath(path): xxh128 hex}.

        `stats` may give pre-computed stat results by os.fspath(path) (e.g. from os.scandir while scanning)
        so no file is stat'ed twice. Raises FileNotFoundError for a path that does not exist.
        """
        with paused_gc():  # 100k row tuples would otherwise trigger repeated full collections
            return self._hash_files(paths, stats)

    def _hash_files(self, paths, stats) -> dict[str, str]:
        rows = self._rows()  # one SELECT for all: far cheaper than 100k single-row lookups
        now = time.time_ns()
        result: dict[str, str] = {}
        updates = []
        self.hashed = 0
        for p in paths:
            path = os.fspath(p)
            st = stats.get(path) if stats is not None else None
            if st is None:
                st = os.stat(path)
            row = rows.get(path)
            if (
                row is not None
                and row[1] == st.st_size
                and row[2] == st.st_mtime_ns
                and row[3] == st.st_ctime_ns
                and row[4] == st.st_ino
                and row[6] - st.st_mtime_ns >= self.granularity_ns  # racy entries are re-hashed
            ):
                result[path] = row[5]
                continue
            digest = hash_file(path)
            self.hashed += 1
            result[path] = digest
            updates.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest, now))
        if updates:
            self._write(updates)
        return result

    def _write(self, updates: list[tuple]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", updates)
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            # A cache that cannot be written (read-only medium, lock held too long) only costs speed.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            warnings.warn(f"stat cache {self.db_path}: could not save hashes ({exc})", RuntimeWarning, 3)

    def prune(self) -> int:
        """Forget files that no longer exist; returns how many rows were removed (used by gc)."""
        gone = [(p,) for p in self._rows() if not os.path.exists(p)]
        if gone:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM files WHERE path = ?", gone)
            self._db.execute("COMMIT")
        return len(gone)
