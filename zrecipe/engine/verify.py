"""`zrecipe doctor --store` / `zrecipe gc --verify`: check every entry of a store against its manifest.

Builds verify what they read as they read it; this checks everything at once (after a disk scare, before
archiving a store): every file of every entry is hashed against its manifest, and every zip in the work
folders (resumable steps' checkpoints) has its members' CRCs checked. Damaged entries and zips are removed
(a damaged entry is a miss: the next build rebuilds it) unless `repair` is off.
"""

from __future__ import annotations

import os
import sys
import zipfile
from dataclasses import asdict, dataclass, field

from .lock import StoreLock
from .store import Store


@dataclass
class VerifyReport:
    """What verification found: entries and work-folder zips checked, and the damaged ones (removed
    when `repaired`)."""

    entries: int = 0
    bytes: int = 0
    damaged: list[str] = field(default_factory=list)
    zips: int = 0
    damaged_zips: list[str] = field(default_factory=list)
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.damaged_zips

    def to_dict(self) -> dict:
        """JSON-able dict."""
        return asdict(self)

    def summary(self) -> str:
        """One paragraph: what was checked and what was wrong."""
        text = (
            f"checked {self.entries} entr{'y' if self.entries == 1 else 'ies'} ({self.bytes / 2**20:.1f} MiB) "
            f"and {self.zips} checkpoint zip(s): "
        )
        if self.ok:
            return text + "every file matches its hash"
        what = "removed (the next build rebuilds them)" if self.repaired else "left in place (--dry-run)"
        lines = [f"  entry {k}" for k in self.damaged] + [f"  zip {z}" for z in self.damaged_zips]
        return text + f"{len(self.damaged)} damaged entr{'y' if len(self.damaged) == 1 else 'ies'} and " \
            f"{len(self.damaged_zips)} damaged zip(s), {what}:\n" + "\n".join(lines)  # fmt: skip


def verify_store(store: Store, repair: bool = True, lock_timeout: float | None = 600.0) -> VerifyReport:
    """Hash every entry of `store` against its manifest and test every work-folder zip (under the store
    lock, so no build writes meanwhile); damaged ones are removed when `repair`."""
    report = VerifyReport(repaired=repair)
    with StoreLock(store.root, timeout=lock_timeout, on_wait=lambda text: print(text, file=sys.stderr)):
        for key in sorted(store.iter_entries()):
            report.entries += 1
            files = store.manifest(key) or {}
            report.bytes += sum(size for size, _ in files.values())
            if store.check(key, "hashes") != "ok":
                report.damaged.append(key)
                if repair:
                    store.discard(key)
        work = store.root / "work"
        for dirpath, _dirs, names in os.walk(work):
            for name in sorted(names):
                if not name.endswith(".zip") or name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                report.zips += 1
                try:
                    with zipfile.ZipFile(path) as zf:
                        sound = zf.testzip() is None
                except (zipfile.BadZipFile, OSError, EOFError, ValueError):
                    sound = False
                if not sound:
                    report.damaged_zips.append(path)
                    if repair:
                        os.unlink(path)
    return report
