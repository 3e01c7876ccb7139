"""A store-wide lock so that two builds (or a build and gc) never interleave on one store.

fcntl.flock is held by the kernel for the open file: when the holder dies — even by kill -9 — the lock is
released with it, so a crashed build never leaves a stale lock behind. The holder's pid, host and start
time are written into the lock file only so that a waiting build can say who it is waiting for.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import EnvironmentProblem, LockTimeout, os_problem

# flock is per open file: a second open+flock in the same process would deadlock against itself, so
# nested StoreLocks on one store in one process share the first one (reentrant).
_held: dict[str, list] = {}
_held_guard = threading.Lock()


def _forget_in_child() -> None:
    """In a forked child (a worker process of a parallel step): close the inherited lock files. A flock
    belongs to the open file, which the child shares: a worker that outlives a killed build would
    otherwise keep the store locked for as long as it lives."""
    for fd, _count in _held.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


class StoreLock:
    """`with StoreLock(root, timeout=600): ...` — exclusive lock on `<root>/LOCK`.

    Waits up to `timeout` seconds (None: forever, 0: fail at once) and then raises LockTimeout naming
    the holder's pid, host and command; after `wait_notice_s` of waiting, `on_wait` gets one line saying
    who holds the lock. Reentrant within one process.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        timeout: float | None = 600.0,
        poll: float = 0.1,
        on_wait: Callable[[str], None] | None = None,
        wait_notice_s: float = 1.0,
    ):
        self.path = Path(root) / "LOCK"
        self.timeout = timeout
        self.poll = poll
        self.on_wait = on_wait
        self.wait_notice_s = wait_notice_s
        self._key = os.path.realpath(Path(root))

    def _who(self) -> str:
        h = self.holder()
        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}"
        return who + (f" ({h['command']})" if h.get("command") else "")

    def holder(self) -> dict:
        """What the lock file says about its holder ({} if nothing readable)."""
        try:
            data = json.loads(self.path.read_text() or "{}")
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock, waiting up to `timeout`."""
        with _held_guard:
            if self._key in _held:
                _held[self._key][1] += 1
                return
        fd = self._open()
        start = time.monotonic()
        deadline = None if self.timeout is None else start + self.timeout
        told = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    now = time.monotonic()
                    if deadline is not None and now >= deadline:
                        raise LockTimeout(
                            f"the store {self.path.parent} is locked by another zrecipe process "
                            f"({self._who()}); waited {self.timeout:g} s. Wait for it to finish, or use "
                            "another --cache folder."
                        ) from None
                    if not told and self.on_wait is not None and now - start >= self.wait_notice_s:
                        told = True
                        limit = "" if self.timeout is None else f" (up to {self.timeout:g} s)"
                        self.on_wait(f"waiting for the store lock {self.path}{limit}: held by {self._who()}")
                    time.sleep(self.poll)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:300] if sys.argv else "",
            }
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(info).encode(), 0)
            except OSError:
                pass  # only informative (a full disk): the lock is held all the same
        except BaseException:
            os.close(fd)
            raise
        with _held_guard:
            _held[self._key] = [fd, 1]

    def _open(self) -> int:
        """The lock file's descriptor (created); OS faults become EnvironmentProblems naming it."""
        if self.path.is_dir():  # os.open would say only "Is a directory"
            raise EnvironmentProblem(
                f"the store's lock file {self.path} is a folder; remove that folder (zrecipe keeps a small "
                "file there) and run again."
            )
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise os_problem(exc, "the store lock", "builds need a writable store: fix it or use another "
                             "--cache folder") from exc  # fmt: skip

    def release(self) -> None:
        """Release the lock (the outermost release in this process closes the file)."""
        with _held_guard:
            entry = _held.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _held[self._key]
        fd = entry[0]
        try:
            os.ftruncate(fd, 0)  # nobody holds it now: don't leave a misleading holder behind
        except OSError:
            pass
        finally:
            os.close(fd)  # closing the file releases the flock

    def __enter__(self) -> StoreLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
