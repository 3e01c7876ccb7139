"""Reading users' files without surprises: regular files only, bounded, hashed from the bytes read.

A caption sidecar that is a FIFO would block `open()` forever; one linked to /dev/zero would be read until
memory runs out. `read_regular` opens without blocking, checks the opened file (not the path, which could
be swapped in between) and reads at most `limit` bytes. `read_verified` returns a file's bytes only if
they hash to what the plan was made with, so a file changed during a build is never stored under the key
of its old content.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path

import xxhash

from ..errors import InputChanged

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}  # fmt: skip


class NotRegularFile(OSError):
    """The path names a FIFO, device, socket or folder where a regular file is expected."""

    def __init__(self, path: str, mode: int):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        super().__init__(errno.EINVAL, f"is {kind}, not a regular file", path)


class FileTooLarge(OSError):
    """A file bigger than what its role allows (a caption of megabytes is the wrong file)."""

    def __init__(self, path: str, limit: int):
        super().__init__(
            errno.EFBIG, f"is larger than {limit:,} bytes, more than a file of this kind holds", path
        )


def read_regular(path: str | os.PathLike[str], limit: int | None = None) -> bytes:
    """The content of the regular file at `path` (symlinks followed), at most `limit` bytes.

    Raises NotRegularFile for a FIFO, device, socket or folder (without blocking on a FIFO), FileTooLarge
    when the file holds more than `limit` bytes, and the OSError of open/read otherwise.
    """
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, st.st_mode)
        want = st.st_size if limit is None else min(st.st_size, limit) + 1
        chunks, got = [], 0
        while True:  # the file may grow while it is read: stop at `limit` + 1 whatever st_size said
            chunk = os.read(fd, max(want - got, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if limit is not None and got > limit:
                raise FileTooLarge(path, limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_verified(path: str | os.PathLike[str], expected: str) -> bytes:
    """The bytes of `path`, checked against `expected` (its xxh128 content hash at plan time).

    Raises InputChanged ("changed during the build; run it again") when they differ: whatever is made from
    these bytes must not be stored under a key computed from the old content.
    """
    try:
        data = read_regular(path)
    except FileNotFoundError:
        raise InputChanged(
            f"{os.fspath(path)}: the file was removed during the build; put it back or run the build again "
            "(it then leaves the dataset)",
            items=[os.fspath(path)],
        ) from None
    if xxhash.xxh128_hexdigest(data) != expected:
        raise InputChanged(
            f"{os.fspath(path)}: the file changed during the build (its content no longer matches the plan); "
            "run the build again",
            items=[os.fspath(path)],
        )
    return data


def probe_writable(folder: str | os.PathLike[str]) -> None:
    """Create and remove a small file in `folder`: raises the OSError a real write would meet there (read
    only, permission denied, a full disk), before hours of work depend on it."""
    probe = os.path.join(os.fspath(folder), f".zrecipe-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"z")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(folder)) from exc


def copy_verified(src: str | os.PathLike[str], dst: str | os.PathLike[str], expected: str) -> bool:
    """Copy `src` to `dst` atomically (a temp file beside `dst`, then rename) if its bytes, as read, hash
    (xxh128) to `expected`; returns False, writing nothing, when they do not. Whatever fails (a full disk
    at `dst`), no temp file is left behind. The copy gets the current time as mtime, never the source's."""
    dst = Path(dst)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    h = xxhash.xxh128()
    try:
        with open(src, "rb", buffering=0) as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(1 << 20):
                h.update(chunk)
                fout.write(chunk)
        if h.hexdigest() != expected:
            tmp.unlink()
            return False
        os.replace(tmp, dst)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.filename is None:  # a failed write names no file: say which one (a full disk at dst)
            raise OSError(exc.errno, exc.strerror, os.fspath(dst)) from exc
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True
