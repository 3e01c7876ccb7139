"""Stat cache: (path, size, mtime_ns, ctime_ns, inode) → content hash, in SQLite.

A no-op build must not reread the dataset (or a 20 GB model): a file whose stat signature is unchanged
keeps its cached hash. Git's "racy" rule closes the hole left by coarse timestamps: a file written in the
same timestamp tick as we hashed it could change again without changing its mtime, so an entry whose mtime
is within `granularity_ns` of the moment it was recorded is re-hashed on the next lookup.

The same signature check also caches the *content* of small text files (caption sidecars) in a second
table, so a no-op plan over 100,000 captioned images stats each caption instead of opening and reading it.

A third table keeps whole *batches*: for a call over many files (a dataset's images, its captions), the
digest of every (path, size, mtime_ns, ctime_ns, inode) signature in order → all of their hashes (or
bytes) in one row. When nothing changed, one indexed lookup replaces reading and comparing a row per file
(at 100,000 files: a third of a second and ~50 MB less); any change in any signature misses the batch and
takes the per-file path, which then records the new batch. Git's racy rule applies to a batch as a whole.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import time
import warnings
from collections.abc import Iterable, Mapping
from itertools import accumulate
from pathlib import Path

import xxhash

from ..errors import EnvironmentProblem, os_problem
from .files import probe_writable, read_regular
from .pause import paused_gc

# 2 s covers FAT's timestamps (the coarsest in use); ext4/APFS ticks are far finer, so this only means
# that files written in the last 2 s before a build are hashed once more on the next one.
DEFAULT_GRANULARITY_NS = 2_000_000_000
_CHUNK = 1 << 20

_SCHEMA = """CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER,
    hash TEXT, recorded_ns INTEGER) WITHOUT ROWID"""
# A separate table (not a column of `files`): databases written before it existed keep working, and the
# big SELECT of image rows does not drag caption bytes along.
_TEXT_SCHEMA = """CREATE TABLE IF NOT EXISTS texts (
    path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, ctime_ns INTEGER, inode INTEGER,
    recorded_ns INTEGER, data BLOB) WITHOUT ROWID"""
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1  # what an SQLite INTEGER holds
# Batches: whole calls over this many files or more, the newest BATCHES_KEPT of them per table.
_BATCH_SCHEMA = """CREATE TABLE IF NOT EXISTS batches (
    digest TEXT PRIMARY KEY, tbl TEXT, recorded_ns INTEGER, data BLOB) WITHOUT ROWID"""
BATCH_MIN_FILES = 64
BATCHES_KEPT = 8
# Files larger than this are read on every call but not cached (captions are a few hundred bytes).
MAX_CACHED_BYTES = 64 * 1024
# read_small_files refuses files larger than this (a "caption" of megabytes is the wrong file).
MAX_SMALL_FILE_BYTES = 1 << 20
STAT_CACHE_NAME = "stat.sqlite"  # the stat cache's file name in a store folder
UNWRITABLE_FIX = "builds (and plans) write their stat cache and lock into the store: make it writable or pass --cache with another folder"


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
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_problem(exc, "the store folder", UNWRITABLE_FIX) from exc
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            # A cache on a read-only or full disk is not corrupt: say what is wrong instead of deleting it.
            try:
                probe_writable(self.db_path.parent)
            except OSError as os_exc:
                raise os_problem(os_exc, "the store folder", UNWRITABLE_FIX) from exc
            return self._recreate(exc)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable enough for a cache under WAL and avoids an fsync per transaction.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(_SCHEMA)
            db.execute(_TEXT_SCHEMA)
            db.execute(_BATCH_SCHEMA)
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
            except OSError as os_exc:
                raise os_problem(os_exc, "the stat cache", UNWRITABLE_FIX) from exc
        try:
            return self._connect()
        except sqlite3.DatabaseError as again:
            raise EnvironmentProblem(
                f"the stat cache {self.db_path} cannot be created ({again}); {UNWRITABLE_FIX}."
            ) from again

    def close(self) -> None:
        """Close the database connection."""
        self._db.close()

    def __enter__(self) -> StatCache:  # noqa: PYI034 (typing.Self needs Python 3.11)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(
        self, query: str = "SELECT path, size, mtime_ns, ctime_ns, inode, hash, recorded_ns FROM files"
    ):
        try:
            return {r[0]: r for r in self._db.execute(query)}
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
        sigs = []
        for p in paths:
            path = os.fspath(p)
            st = stats.get(path) if stats is not None else None
            if st is None:
                st = os.stat(path)
            sigs.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        return self._hash_signed(sigs)

    def hash_signed(
        self,
        signatures: Iterable[tuple[str, int, int, int, int]],
        errors: dict[str, OSError] | None = None,
    ) -> dict[str, str]:
        """`hash_files` for callers that already hold each file's stat signature, given as tuples
        (path, size, mtime_ns, ctime_ns, inode) — e.g. a scan's records: no stat, no per-file object.

        With `errors` (a dict), a file that cannot be read is recorded there ({path: OSError}) and left out
        of the result instead of raising, so the caller can report or skip every such file at once."""
        with paused_gc():
            return self._hash_signed(signatures, errors)

    def _hash_signed(self, signatures, errors=None) -> dict[str, str]:
        signatures = signatures if isinstance(signatures, (list, tuple)) else list(signatures)
        self.hashed = 0
        if not signatures:  # e.g. a recipe without masks: no reason to read 100,000 rows
            return {}
        columns = list(zip(*signatures, strict=True))
        batch = self._batch_digest("files", columns)
        data = self._batch(batch, columns[2])
        if data is not None:
            hashes = data.decode("ascii").split(",")
            if len(hashes) == len(signatures):
                return dict(zip([sig[0] for sig in signatures], hashes, strict=True))
        started = time.time_ns()  # no later than the per-file rows' time: the batch is no less racy
        result = self._hash_each(signatures, errors)
        if batch is not None and all(sig[0] in result for sig in signatures):
            data = ",".join([result[sig[0]] for sig in signatures]).encode("ascii")
            self._write_batch(batch, "files", started, data)
        return result

    def _hash_each(self, signatures, errors) -> dict[str, str]:
        rows = self._rows()  # one SELECT for all: far cheaper than 100k single-row lookups
        now = time.time_ns()
        granularity = self.granularity_ns
        result: dict[str, str] = {}
        updates = []
        for sig in signatures:
            path = sig[0]
            row = rows.get(path)
            # row = (path, size, mtime_ns, ctime_ns, inode, hash, recorded_ns): one tuple comparison checks
            # the whole stat signature; racy entries (recorded too soon after their mtime) are re-hashed.
            if row is not None and row[:5] == sig and row[6] - sig[2] >= granularity:
                result[path] = row[5]
                continue
            try:
                digest = hash_file(path)
            except OSError as exc:
                if errors is None:
                    raise
                errors[path] = exc
                continue
            self.hashed += 1
            result[path] = digest
            updates.append((*sig, digest, now))
        if updates:
            self._write(updates)
        return result

    def read_small_files(self, paths: Iterable[str | os.PathLike[str]]) -> dict[str, bytes | OSError]:
        """Content of every path as {os.fspath(path): bytes}, or the OSError met (missing file, no access).

        A file whose stat signature matches its cached row (and is not racy) is not opened: its bytes come
        from the cache. Meant for many small files read on every plan (caption sidecars); files over
        MAX_CACHED_BYTES are read but not cached.
        """
        with paused_gc():
            return self._read_small_files(paths)

    def _read_small_files(self, paths) -> dict[str, bytes | OSError]:
        result: dict[str, bytes | OSError] = {}
        names, sizes, mtimes, ctimes, inodes = _stat_columns(paths, result)
        if not names:
            return result
        columns = (names, sizes, mtimes, ctimes, inodes)
        batch = None
        if not result:  # every file is there: the whole call may be one cached batch
            batch = self._batch_digest("texts", columns)
            data = self._batch(batch, mtimes)
            if data is not None and len(data) == sum(sizes):
                pieces = [data[end - size : end] for end, size in zip(accumulate(sizes), sizes, strict=True)]
                return dict(zip(names, pieces, strict=True))
        started = time.time_ns()
        self._read_each(columns, result)
        if batch is not None and all(
            type(got := result[path]) is bytes and len(got) == size <= MAX_CACHED_BYTES
            for path, size in zip(names, sizes, strict=True)
        ):
            self._write_batch(batch, "texts", started, b"".join([result[path] for path in names]))
        return result

    def _read_each(self, columns, result: dict[str, bytes | OSError]) -> None:
        """Read (or take from their rows) the files whose signatures `columns` holds, into `result`."""
        rows = self._rows("SELECT path, size, mtime_ns, ctime_ns, inode, recorded_ns, data FROM texts")
        now = time.time_ns()
        granularity = self.granularity_ns
        updates = []
        for sig in zip(*columns, strict=True):
            path, size, mtime = sig[0], sig[1], sig[2]
            row = rows.get(path)
            # row = (path, size, mtime_ns, ctime_ns, inode, recorded_ns, data): one comparison checks the
            # whole signature; racy rows (recorded too soon after their mtime) are read again.
            if row is not None and row[:5] == sig and row[5] - mtime >= granularity:
                result[path] = row[6]
                continue
            try:
                data = read_regular(path, MAX_SMALL_FILE_BYTES)  # a FIFO or /dev/zero link: an error
            except OSError as exc:
                result[path] = exc
                continue
            result[path] = data
            # The signature recorded is the one taken before reading: if the file changed in between, its
            # new stat differs and the next call reads it again.
            if len(data) == size and size <= MAX_CACHED_BYTES:
                updates.append((*sig, now, data))
        if updates:
            self._write(updates, "texts")

    def _batch_digest(self, table: str, columns: list) -> str | None:
        """The key of a batch of signatures given as columns (paths, sizes, mtimes, ctimes, inodes; in
        order), or None for a call too small to batch."""
        paths, sizes, mtimes, ctimes, inodes = columns
        if len(paths) < BATCH_MIN_FILES:
            return None
        h = xxhash.xxh3_128(b"%s\0%d\0" % (table.encode(), len(paths)))
        # NUL cannot occur in a path; the numbers go in as fixed-width machine integers (3× cheaper than
        # text), in the byte layout of array(code, column).tobytes().
        for start in range(0, len(paths), 4096):  # in slices: no second copy of 100,000 paths at once
            h.update("\0".join(paths[start : start + 4096]).encode("utf-8", "surrogatepass") + b"\0")
        try:
            for column, code in ((sizes, "q"), (mtimes, "q"), (ctimes, "q"), (inodes, "Q")):
                h.update(column.tobytes() if type(column) is memoryview else _packed(code, column))
        except struct.error:  # not a value a file system gives: no batch, the per-file path works
            return None
        return f"{table}:{h.hexdigest()}"

    def _batch(self, digest: str | None, mtimes: Iterable[int]) -> bytes | None:
        """A batch's data when it is recorded and not racy (every file's mtime older than the granularity
        before the batch was recorded), else None."""
        if digest is None:
            return None
        try:
            row = self._db.execute(
                "SELECT recorded_ns, data FROM batches WHERE digest = ?", (digest,)
            ).fetchone()
        except sqlite3.DatabaseError:
            return None
        if row is None or row[0] - max(mtimes) < self.granularity_ns:
            return None
        return row[1]

    def _write_batch(self, digest: str, table: str, recorded_ns: int, data: bytes) -> None:
        """Record a batch, keeping the newest BATCHES_KEPT of its table."""

        def write() -> None:
            self._db.execute(
                "INSERT OR REPLACE INTO batches VALUES (?, ?, ?, ?)", (digest, table, recorded_ns, data)
            )
            self._db.execute(
                "DELETE FROM batches WHERE tbl = ? AND digest NOT IN "
                "(SELECT digest FROM batches WHERE tbl = ? ORDER BY recorded_ns DESC LIMIT ?)",
                (table, table, BATCHES_KEPT),
            )

        self._save(write)

    def _write(self, updates: list[tuple], table: str = "files") -> None:
        # SQLite integers are 64-bit signed: a row with a stat field beyond (a date after 2262, an inode
        # over 2^63) is not recorded, so that file is hashed anew on every call instead of failing the save.
        fits = [row for row in updates if all(_INT64_MIN <= v <= _INT64_MAX for v in row[1:5])]
        self._save(
            lambda: self._db.executemany(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?, ?, ?, ?, ?)", fits)
        )

    def _save(self, write) -> None:
        """Run `write` in one immediate transaction. Whatever happens (a path SQLite cannot encode, Ctrl-C)
        the transaction is never left open; a cache that cannot be written (read-only medium, lock held too
        long) only costs speed: a warning, and the next call takes the per-file path again."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            write()
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.OperationalError):
                raise
            warnings.warn(f"stat cache {self.db_path}: could not save hashes ({exc})", RuntimeWarning, 4)

    def lookup(self, paths: Iterable[str | os.PathLike[str]]) -> dict[str, str]:
        """Content hash of each existing path, like `hash_files`, but with one indexed query per few
        hundred paths instead of reading the whole table: for a handful of files (a build's outputs)
        in a cache that also holds 100,000 dataset rows. Missing paths are left out."""
        sigs = []
        for p in paths:
            path = os.fspath(p)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            sigs.append((path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
        rows: dict[str, tuple] = {}
        try:
            for i in range(0, len(sigs), 500):
                chunk = [s[0] for s in sigs[i : i + 500]]
                query = (
                    "SELECT path, size, mtime_ns, ctime_ns, inode, hash, recorded_ns FROM files WHERE path IN "
                    f"({', '.join('?' * len(chunk))})"
                )
                rows.update((r[0], r) for r in self._db.execute(query, chunk))
        except sqlite3.DatabaseError:
            rows = {}
        now = time.time_ns()
        result, updates = {}, []
        for sig in sigs:
            row = rows.get(sig[0])
            if row is not None and row[:5] == sig and row[6] - sig[2] >= self.granularity_ns:
                result[sig[0]] = row[5]
                continue
            result[sig[0]] = digest = hash_file(sig[0])
            updates.append((*sig, digest, now))
        if updates:
            self._write(updates)
        return result

    def remember(self, path: str | os.PathLike[str], digest: str) -> None:
        """Record that `path` (as it is now) has content hash `digest`, e.g. a file just written from
        verified bytes, so the next lookup does not read it again (git's racy rule still applies)."""
        st = os.stat(path)
        self._write([(os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, digest,
                      time.time_ns())])  # fmt: skip

    def prune(self) -> int:
        """Forget files that no longer exist; returns how many rows were removed (used by gc)."""
        removed = 0
        for table in ("files", "texts"):
            gone = [(p,) for p in self._rows(f"SELECT path FROM {table}") if not os.path.exists(p)]
            if gone:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(f"DELETE FROM {table} WHERE path = ?", gone)
                self._db.execute("COMMIT")
            removed += len(gone)
        return removed


# A stat signature's numbers as machine integers: size, mtime_ns, ctime_ns (signed), inode (unsigned); the
# same bytes as array("q")/array("Q") items, native order.
_SIGNATURE = struct.Struct("=qqqQ")


def _packed(code: str, column) -> bytes:
    """`column` (Python ints) as `array(code, column).tobytes()` gives it, without array's per-item
    argument parsing (struct.error when a value does not fit)."""
    return struct.pack(f"={len(column)}{code}", *column)


def _stat_columns(paths, errors: dict) -> tuple:
    """Stat every path: (names, sizes, mtimes, ctimes, inodes) of the files there, in order; a path that
    cannot be stat'ed lands in `errors` ({path: OSError}) instead.

    The numbers are packed into one buffer, a row of 32 bytes per file, and returned as strided views of
    it: 100,000 stat results held at once would cost ~70 MB, Python ints ~14 MB, this 3 MB — and one pack
    per file is cheaper than four array appends."""
    stat, pack = os.stat, _SIGNATURE.pack
    names: list[str] = []
    rows = bytearray()
    big: list[list[int]] | None = None  # Python-int columns, once a value does not fit 64 bits
    for p in paths:
        path = os.fspath(p)
        try:
            st = stat(path)
        except OSError as exc:
            errors[path] = exc
            continue
        if big is None:
            try:
                rows += pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
                names.append(path)
                continue
            except struct.error:  # beyond 64 bits (a date after 2262): Python ints from here on
                big = [list(column) for column in _columns(rows)]
        for column, value in zip(big, (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino), strict=True):
            column.append(value)
        names.append(path)
    return (names, *(big if big is not None else _columns(rows)))


def _columns(rows: bytearray) -> list[memoryview]:
    """The size, mtime, ctime and inode columns of `_stat_columns`' packed rows."""
    signed, unsigned = memoryview(rows).cast("q"), memoryview(rows).cast("Q")
    return [signed[0::4], signed[1::4], signed[2::4], unsigned[3::4]]
