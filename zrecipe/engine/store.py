"""Content-addressed store of step outputs.

Layout under `root`:

    objects/<key[:2]>/<key>/            one entry: the step's files + MANIFEST.json (written last)
    objects/<key[:2]>/.tmp-<key>-<pid>-<rand>/   an entry being written (same parent → rename is atomic)
    objects/<key[:2]>/.trash-<key>-...  a corrupt entry being removed
    work/<key>/                          scratch space of a resumable step (e.g. training checkpoints)
    roots/                               build records of every graph that used the store (gc roots)

An entry only ever appears by renaming a complete, fsync'ed temp folder into place, so a crash or kill -9
at any moment leaves either no entry or a complete one. Damage after the fact (a truncated file, a deleted
manifest, flipped bytes) is caught by verification and the entry is discarded and rebuilt, never used:
`verified(key)` hashes every file against the manifest before a step reads the entry, and `copy_out`
checks the bytes it copies out of the store as it reads them.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import xxhash

from ..errors import EnvironmentProblem, InputDamaged, os_problem
from .files import copy_verified, probe_writable
from .statcache import UNWRITABLE_FIX, hash_file

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
Check = Literal["ok", "missing", "corrupt"]
VerifyLevel = Literal["exists", "sizes", "hashes"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike[str], data: bytes, fsync: bool = True) -> None:
    """Write `data` to `path` via a temp file in the same folder and os.replace (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def prepare_root(root: str | os.PathLike[str]) -> Path:
    """Create the store folder `root` if needed and check that builds can write there; an OS fault (a
    file in the way, a read-only disk, no permission) becomes the EnvironmentProblem that says so."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise EnvironmentProblem(
            f"the store folder (--cache / `cache:`) {root} is a file; the store is a folder: pass --cache "
            "with a folder (created if missing), or move that file away."
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe_writable(root)
    except OSError as exc:
        raise os_problem(exc, "the store folder (--cache / `cache:`)", UNWRITABLE_FIX) from exc
    return root


class Store:
    """A content-addressed store rooted at `root` (created on first write).

    `fsync=False` skips the per-file fsync (measured: ~3 ms per file on ext4, which dominates a
    100,000-item first build); kill -9 safety does not depend on it, only power-loss durability does, and
    a torn entry after a power loss is still caught by the size check.
    """

    def __init__(self, root: str | os.PathLike[str], fsync: bool = True):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.fsync = fsync

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, key: str) -> Path:
        """Folder of entry `key` (it may not exist)."""
        return self.objects / key[:2] / key

    def work_dir(self, key: str) -> Path:
        """Persistent scratch folder of a step run (created): intermediate outputs a killed step resumes
        from. Kept by gc while `key` is referenced by a root or a pending build."""
        d = self.root / "work" / key
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- reading -------------------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        """True when entry `key` is committed (its manifest exists). One stat, no verification."""
        return (self.path(key) / MANIFEST).is_file()

    def existing(self, keys: Iterable[str]) -> set[str]:
        """The subset of `keys` whose entry folder exists, listing each shard folder once.

        For planning 100,000 keys this is ~5× faster than a stat per key. Folder existence means the entry
        was committed complete (entries appear only by rename); later damage is found by `check`.
        """
        keys = keys if isinstance(keys, (set, frozenset, list, tuple)) else list(keys)
        objects = str(self.objects)
        try:
            # Many keys touch every shard anyway: list the shard folders instead of slicing each key.
            shards = os.listdir(objects) if len(keys) > 4096 else {k[:2] for k in keys}
        except FileNotFoundError:
            return set()
        found: set[str] = set()
        for shard in shards:
            try:
                found.update(os.listdir(os.path.join(objects, shard)))  # temp names start with "."
            except (FileNotFoundError, NotADirectoryError):
                continue
        return found.intersection(keys)

    def manifest(self, key: str) -> dict[str, tuple[int, str]] | None:
        """{relative file path: (size, xxh128)} of entry `key`, or None if missing or unreadable."""
        try:
            data = json.loads((self.path(key) / MANIFEST).read_bytes())
            return {f: (int(s), str(h)) for f, (s, h) in data["files"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def check(self, key: str, level: VerifyLevel = "sizes") -> Check:
        """Verify entry `key` without changing anything: "ok", "missing" or "corrupt".

        "exists" checks the folder, "sizes" also the manifest and every file's size (cheap), "hashes" also
        every file's content hash.
        """
        folder = self.path(key)
        if not folder.is_dir():
            return "missing"
        if level == "exists":
            return "ok"
        files = self.manifest(key)
        if files is None:
            return "corrupt"
        for rel, (size, digest) in files.items():
            try:
                if os.stat(folder / rel).st_size != size:
                    return "corrupt"
            except OSError:
                return "corrupt"
            try:
                if level == "hashes" and hash_file(folder / rel) != digest:
                    return "corrupt"
            except FileNotFoundError:  # removed since the stat: damage; other errors are the machine's
                return "corrupt"
        return "ok"

    def get(self, key: str, verify: bool = False) -> Path | None:
        """Folder of entry `key` after verification (sizes always, hashes when `verify`), else None.

        A corrupt or partial entry is discarded (so the next build rebuilds it) and reported as a miss.
        """
        state = self.check(key, "hashes" if verify else "sizes")
        if state == "ok":
            return self.path(key)
        if state == "corrupt":
            self.discard(key)
        return None

    def verified(self, key: str) -> Check:
        """`check(key, "hashes")` for an entry a step is about to read; a corrupt entry is discarded.

        Every file is hashed (xxh3 at memory speed; the step then reads the same bytes from the page
        cache). RunContext remembers the entries it verified, so each is hashed once per step kind.
        """
        state = self.check(key, "hashes")
        if state == "corrupt":
            self.discard(key)
        return state

    def copy_out(self, key: str, rel: str, dst: str | os.PathLike[str]) -> str:
        """Copy file `rel` of entry `key` to `dst` atomically, checking the bytes against the manifest hash
        as they are read; returns that hash. A mismatch (or a missing file) discards the entry and raises
        InputDamaged, writing nothing at `dst`; an OSError at `dst` (a full disk) leaves no temp file."""
        digest = self._listed(key, rel)
        try:
            ok = copy_verified(self.path(key) / rel, dst, digest)
        except FileNotFoundError as exc:
            if exc.filename is None or os.fspath(exc.filename) != os.fspath(self.path(key) / rel):
                raise  # the destination's folder is gone: not the store's problem
            ok = False
        if not ok:
            self.discard(key)
            raise InputDamaged(
                f"store entry {key}: {rel} does not match its manifest; the entry was discarded", key
            )
        return digest

    def read_file(self, key: str, rel: str) -> bytes:
        """The bytes of file `rel` of entry `key`, checked against the manifest (InputDamaged otherwise)."""
        digest = self._listed(key, rel)
        try:
            data = (self.path(key) / rel).read_bytes()
        except FileNotFoundError:
            data = None
        if data is None or xxhash.xxh128_hexdigest(data) != digest:
            self.discard(key)
            raise InputDamaged(
                f"store entry {key}: {rel} does not match its manifest; the entry was discarded", key
            )
        return data

    def _listed(self, key: str, rel: str) -> str:
        """The manifest hash of `rel` in entry `key`; a missing manifest or entry discards it."""
        files = self.manifest(key)
        if files is None or rel not in files:
            self.discard(key)
            raise InputDamaged(
                f"store entry {key} has no intact manifest listing {rel}; it was discarded", key
            )
        return files[rel][1]

    # -- writing -------------------------------------------------------------------------------------
    def discard(self, key: str) -> None:
        """Remove entry `key` (first renamed aside, so readers never see a half-deleted entry)."""
        folder = self.path(key)
        trash = folder.parent / f".trash-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    @contextmanager
    def writer(self, key: str) -> Iterator[Path]:
        """Write entry `key`: yields an empty temp folder; on a clean exit the manifest is written, files
        and manifest are fsync'ed and the folder is renamed into place. On an exception the temp folder is
        removed. If another process committed the same key first, ours is discarded (same key, same
        content by construction)."""
        shard = self.objects / key[:2]
        shard.mkdir(parents=True, exist_ok=True)
        tmp = shard / f".tmp-{key}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
            self._seal(key, tmp)
            self._commit(key, tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _seal(self, key: str, tmp: Path) -> None:
        files: dict[str, list] = {}
        for dirpath, _dirs, names in os.walk(tmp):
            for name in names:
                full = Path(dirpath) / name
                rel = full.relative_to(tmp).as_posix()
                if rel == MANIFEST:
                    raise ValueError(f"a step wrote its own {MANIFEST} into store entry {key}")
                if self.fsync:
                    with open(full, "rb") as f:
                        os.fsync(f.fileno())
                files[rel] = [full.stat().st_size, hash_file(full)]
        data = json.dumps({"format": MANIFEST_FORMAT, "key": key, "files": dict(sorted(files.items()))})
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            f.write(data)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        if self.fsync:
            for dirpath, _dirs, _names in os.walk(tmp):
                _fsync_dir(Path(dirpath))

    def _commit(self, key: str, tmp: Path) -> None:
        final = self.path(key)
        for _attempt in range(2):
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                if self.check(key, "sizes") == "ok":
                    return  # another process won the race with an equal entry: keep theirs
                self.discard(key)  # a damaged entry is in the way: replace it
                continue
            if self.fsync:
                _fsync_dir(final.parent)
            return
        raise OSError(f"could not commit store entry {key}: {final} keeps reappearing damaged")

    def put_bytes(self, key: str, files: dict[str, bytes]) -> Path:
        """Convenience: commit an entry made of in-memory files {relative name: bytes}."""
        with self.writer(key) as tmp:
            for rel, data in files.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
        return self.path(key)

    # -- enumeration (gc) ----------------------------------------------------------------------------
    def iter_entries(self) -> Iterator[str]:
        """Every committed entry key in the store."""
        try:
            shards = list(os.scandir(self.objects))
        except FileNotFoundError:
            return
        for shard in shards:
            if shard.is_dir() and not shard.name.startswith("."):
                for e in os.scandir(shard.path):
                    if not e.name.startswith("."):
                        yield e.name

    def iter_temps(self) -> Iterator[Path]:
        """Temp and trash folders left in the store (by killed processes or running writers)."""
        try:
            shards = list(os.scandir(self.objects))
        except FileNotFoundError:
            return
        for shard in shards:
            if shard.is_dir():
                for e in os.scandir(shard.path):
                    if e.name.startswith((".tmp-", ".trash-")):
                        yield Path(e.path)
