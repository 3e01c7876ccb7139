"""The build report: what ran, what was cached, what failed or was skipped, why, how long, peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .store import write_atomic


@dataclass
class KindReport:
    """Counts for one step kind. `reasons` counts why stale nodes ran ({category: n}); `failures` and
    `skipped_items` are [{"item", "error"}] (every one, nothing truncated)."""

    total: int = 0
    ran: int = 0
    cached: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    skipped_items: list[dict[str, str]] = field(default_factory=list)


@dataclass
class BuildReport:
    """The report of one execute() call. status: "ok", "failed" (items failed), "interrupted" (Ctrl-C)
    or "error" (the engine or a step raised outside any item). `repaired`: keys of store entries that
    failed their hash check while being read, were discarded and rebuilt. `outputs`: what the caller
    published from the store, {path: {kind, item, key, hash, action}} (which run each file came from)."""

    graph: str
    status: str = "ok"
    started: str = ""
    seconds: float = 0.0
    jobs: int = 1
    kinds: dict[str, KindReport] = field(default_factory=dict)
    peak_rss_bytes: int = 0
    peak_rss_children_bytes: int = 0
    repaired: list[str] = field(default_factory=list)
    outputs: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def ran(self) -> int:
        return sum(k.ran for k in self.kinds.values())

    @property
    def failed(self) -> int:
        return sum(k.failed for k in self.kinds.values())

    @property
    def skipped(self) -> int:
        return sum(k.skipped for k in self.kinds.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)

    def to_json(self) -> str:
        """Pretty JSON text."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the report atomically to `path`."""
        write_atomic(path, (self.to_json() + "\n").encode("utf-8"))
        return Path(path)

    def summary(self) -> str:
        """Human summary: a line per kind (ran / cached / failed / skipped, seconds) and the total."""
        width = max((len(k) for k in self.kinds), default=4)
        lines = [
            f"{name:<{width}}  ran {k.ran:>6}  cached {k.cached:>6}  failed {k.failed:>4}  "
            f"skipped {k.skipped:>4}  {k.seconds:7.2f} s"
            for name, k in self.kinds.items()
        ]
        lines.append(
            f"{self.status}: {self.ran} ran, {self.failed} failed, {self.skipped} skipped "
            f"in {self.seconds:.2f} s (peak RSS {self.peak_rss_bytes / 2**20:.0f} MiB)"
        )
        return "\n".join(lines)

    def measure_memory(self) -> None:
        """Fill the peak RSS fields from getrusage (ru_maxrss is KiB on Linux, bytes on macOS)."""
        scale = 1 if sys.platform == "darwin" else 1024
        self.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        self.peak_rss_children_bytes = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * scale
