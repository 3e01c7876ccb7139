"""Garbage collection: remove store entries that no graph's latest build references.

Roots are the build records under `roots/` (one per graph id that used the store) plus the `.pending`
key lists of builds that are running or were killed (their finished entries and work folders are what the
next build resumes from). Everything else under `objects/` and `work/` goes, as do temp and trash folders
left by killed processes. Runs under the store lock, so no build is writing meanwhile.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .lock import StoreLock
from .record import iter_records
from .store import Store


@dataclass
class GcReport:
    """What gc removed (or would remove, with dry_run) and kept."""

    dry_run: bool
    roots: list[str] = field(default_factory=list)
    removed_entries: int = 0
    removed_bytes: int = 0
    kept_entries: int = 0
    kept_bytes: int = 0
    removed_work_dirs: int = 0
    removed_temps: int = 0

    def to_dict(self) -> dict:
        """JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """One-paragraph human summary with sizes."""
        verb = "would remove" if self.dry_run else "removed"
        return (
            f"{verb} {self.removed_entries} entr{'y' if self.removed_entries == 1 else 'ies'} "
            f"({_size(self.removed_bytes)}), {self.removed_work_dirs} work folder(s) and "
            f"{self.removed_temps} temp folder(s); kept {self.kept_entries} ({_size(self.kept_bytes)}) "
            f"referenced by {len(self.roots)} build record(s)"
        )


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _tree_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _abandoned(tmp: Path) -> bool:
    """A temp folder `.tmp-<key>-<pid>-<rand>` is abandoned when its writer process is gone (or it is a
    day old: pids get reused). Builds that skip the lock may still be writing the others."""
    try:
        pid = int(tmp.name.rsplit("-", 2)[1])
    except (IndexError, ValueError):
        return True
    if not _pid_alive(pid):
        return True
    try:
        return time.time() - tmp.stat().st_mtime > 86400
    except OSError:
        return False


def referenced_keys(store: Store) -> tuple[set[str], list[str]]:
    """(every key referenced by a build record or a pending build, the graph ids of the records)."""
    keys: set[str] = set()
    ids = []
    for rec in iter_records(store.root):
        keys |= rec.keys()
        ids.append(rec.graph_id)
    roots = store.root / "roots"
    if roots.is_dir():
        for p in roots.glob("*.pending"):
            try:
                keys.update(k for k in p.read_text().split() if k)
            except OSError:
                pass
    return keys, ids


def collect(store: Store, dry_run: bool = False, lock_timeout: float | None = 600.0) -> GcReport:
    """Remove unreferenced entries, work folders and leftover temp folders; returns the GcReport."""
    with StoreLock(store.root, timeout=lock_timeout, on_wait=lambda text: print(text, file=sys.stderr)):
        keep, ids = referenced_keys(store)
        report = GcReport(dry_run=dry_run, roots=sorted(ids))
        for key in list(store.iter_entries()):
            size = _tree_size(store.path(key))
            if key in keep:
                report.kept_entries += 1
                report.kept_bytes += size
            else:
                report.removed_entries += 1
                report.removed_bytes += size
                if not dry_run:
                    store.discard(key)
        work = store.root / "work"
        if work.is_dir():
            for d in list(work.iterdir()):
                if d.name not in keep:
                    report.removed_work_dirs += 1
                    report.removed_bytes += _tree_size(d)
                    if not dry_run:
                        shutil.rmtree(d, ignore_errors=True)
        for tmp in list(store.iter_temps()):
            if not _abandoned(tmp):
                continue
            report.removed_temps += 1
            report.removed_bytes += _tree_size(tmp)
            if not dry_run:
                shutil.rmtree(tmp, ignore_errors=True)
        return report
