"""A tiny generic graph for the build-engine tests: files → per-item "transform" → one "aggregate".

transform(item): upper-cased file content + params["suffix"] (sleeps params["sleep"] s; content "FAIL"
raises a DatasetError). aggregate: the transforms' outputs joined in item order. Each run appends
"kind:item" to the log file in ctx.data["log"] (O_APPEND, so worker processes can share it).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from zrecipe.engine import Graph, Node, Record, Ref, StatCache, StepKind, Store, build, plan
from zrecipe.errors import DatasetError


def _log(ctx, line: str) -> None:
    with open(ctx.data["log"], "a", encoding="utf-8") as f:
        f.write(line + "\n")


def run_transform(tasks, ctx) -> None:
    for task in tasks:
        with ctx.output(task) as out:
            _log(ctx, f"transform:{task.item}")
            time.sleep(task.params.get("sleep", 0))
            text = (Path(ctx.data["root"]) / task.item).read_text()
            if text == "FAIL":
                raise DatasetError(f"{task.item}: cannot transform this item")
            (out / "out.txt").write_text(text.upper() + task.params["suffix"])


def run_aggregate(tasks, ctx) -> None:
    for task in tasks:
        with ctx.output(task) as out:
            _log(ctx, f"aggregate:{task.item}")
            parts = [d.joinpath("out.txt").read_text() for d in ctx.input_dirs(task) if d is not None]
            (out / "all.txt").write_text("|".join(parts))


def make_graph(
    root: Path,
    statcache: StatCache,
    suffix: str = "!",
    sleep: float = 0.0,
    parallel: bool = False,
    on_error: str = "fail",
    transform_version: int = 1,
    optional: bool = False,
) -> Graph:
    """The test graph over every file in `root` (sorted), hashing inputs through `statcache`."""
    entries = sorted((e for e in os.scandir(root) if e.is_file()), key=lambda e: e.name)
    hashes = statcache.hash_files([e.path for e in entries], {e.path: e.stat() for e in entries})
    g = Graph(
        "test-graph",
        [
            StepKind("transform", transform_version, run_transform, parallel=parallel, item_batch=2),
            StepKind("aggregate", 1, run_aggregate, after=("transform",)),
        ],
    )
    params = {"suffix": suffix, "sleep": sleep}
    for e in entries:
        g.add(Node("transform", e.name, params, [hashes[e.path]], on_error=on_error))
    g.add(Node("aggregate", "all", {}, [Ref("transform", e.name, optional) for e in entries]))
    return g


def read_log(path: Path) -> list[str]:
    """Lines of the run log (empty if nothing ran)."""
    return path.read_text().split() if path.exists() else []


OLD_NS = 1_600_000_000_000_000_000


class Env:
    """A data folder, store, stat cache and run log for one test; `build()` reports what ran."""

    def __init__(self, tmp: Path, n: int = 5):
        self.data = tmp / "data"
        self.data.mkdir()
        self.store = Store(tmp / "cache", fsync=False)
        self.sc = StatCache(tmp / "cache" / "stat.sqlite")
        self.log = tmp / "log.txt"
        self.ctx = {"root": str(self.data), "log": str(self.log)}
        for i in range(n):
            self.write(f"f{i}.txt", f"item {i}")

    def write(self, name: str, text: str, ns: int = OLD_NS) -> None:
        p = self.data / name
        p.write_text(text)
        os.utime(p, ns=(ns, ns))  # old mtimes: not racy, so tests do not depend on the clock

    def graph(self, **kw):
        return make_graph(self.data, self.sc, **kw)

    def plan(self, **kw):
        force = kw.pop("force", ())
        g = self.graph(**kw)
        return plan(g, self.store, Record.load(self.store.root, g.graph_id), force=force)

    def build(self, **kw):
        """Build; returns (plan, report, ["kind:item" that ran])."""
        before = len(read_log(self.log))
        force = kw.pop("force", ())
        until = kw.pop("until", None)
        p, r = build(self.graph(**kw), self.store, self.ctx, progress=False, force=force, until=until)
        return p, r, read_log(self.log)[before:]
