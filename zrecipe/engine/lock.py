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
import threading
import time
from pathlib import Path

from ..errors import LockTimeout

# flock is per open file: a second open+flock in the same process would deadlock against itself, so
# nested StoreLocks on one store in one process share the first one (reentrant).
_held: dict[str, list] = {}
_held_guard = threading.Lock()


class StoreLock:
    """`with StoreLock(root, timeout=600): ...` — exclusive lock on `<root>/LOCK`.

    Waits up to `timeout` seconds (None: forever, 0: fail at once) and then raises LockTimeout naming
    the holder's pid and host. Reentrant within one process.
    """

    def __init__(self, root: str | os.PathLike[str], timeout: float | None = 600.0, poll: float = 0.1):
        self.path = Path(root) / "LOCK"
        self.timeout = timeout
        self.poll = poll
        self._key = os.path.realpath(Path(root))

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if deadline is not None and time.monotonic() >= deadline:
                        h = self.holder()
                        who = f"pid {h.get('pid', '?')} on {h.get('host', '?')} since {h.get('since', '?')}"
                        raise LockTimeout(
                            f"the store {self.path.parent} is locked by another zrecipe process ({who}); "
                            f"waited {self.timeout:g} s. Wait for it to finish, or use another "
                            "--cache folder."
                        ) from None
                    time.sleep(self.poll)
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        with _held_guard:
            _held[self._key] = [fd, 1]

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
        finally:
            os.close(fd)  # closing the file releases the flock

    def __enter__(self) -> StoreLock:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
