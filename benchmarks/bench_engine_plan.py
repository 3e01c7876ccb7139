"""Engine-only planning benchmark: no-op plan over N generic file items (no images, no models).

    python benchmarks/bench_engine_plan.py 10000 100000 [--dir /tmp/zrecipe-bench-engine] [--repeat 3]

For each N: create N tiny files (in 100 sub-folders, like a dataset), run a first build of the generic
graph files → per-item "transform" → one "aggregate" (store without fsync), then time — in this process,
excluding interpreter start — the work a no-op `plan` does: scandir + stat of every file, stat cache
lookup, building the graph, loading the previous record's header, computing every key and asking the
store which exist. Also: plan after touching every file (each re-hashed, nothing stale) and after adding
10 files. Prints medians.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

from zrecipe.engine import Graph, Node, Record, Ref, StatCache, StepKind, Store, build, paused_gc, plan


def run_transform(tasks, ctx) -> None:
    for task in tasks:
        with ctx.output(task) as out:
            (out / "out.txt").write_text(task.item)


def run_aggregate(tasks, ctx) -> None:
    for task in tasks:
        with ctx.output(task) as out:
            (out / "n.txt").write_text(str(len(task.inputs)))


def scan(data: Path) -> tuple[list[str], dict[str, os.stat_result]]:
    paths, stats = [], {}
    for sub in sorted(os.scandir(data), key=lambda e: e.name):
        for e in os.scandir(sub.path):
            if e.is_file():
                paths.append(e.path)
                stats[e.path] = e.stat()
    paths.sort()
    return paths, stats


def make(data: Path, sc: StatCache) -> Graph:
    with paused_gc():  # what a caller building a 100k-node graph should do (see zrecipe.engine)
        return _make(data, sc)


def _make(data: Path, sc: StatCache) -> Graph:
    paths, stats = scan(data)
    hashes = sc.hash_files(paths, stats)
    g = Graph("bench", [StepKind("transform", 1, run_transform), StepKind("aggregate", 1, run_aggregate)])
    params = {"size": 512}
    prefix = len(str(data)) + 1
    for p in paths:
        g.add(Node("transform", p[prefix:], params, [hashes[p]]))
    g.add(Node("aggregate", "all", {}, [Ref("transform", p[prefix:]) for p in paths]))
    return g


def timed_plan(data: Path, store: Store, sc: StatCache):
    """(wall seconds, CPU seconds, plan): CPU time is reported too because shared machines are noisy."""
    t, c = time.perf_counter(), time.process_time()
    g = make(data, sc)
    p = plan(g, store, Record.load(store.root, g.graph_id))
    return time.perf_counter() - t, time.process_time() - c, p


def bench(n: int, root: Path, repeat: int, keep: bool = False) -> None:
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    for i in range(100):
        (data / f"d{i:02d}").mkdir(parents=True)
    old = time.time_ns() - 10 * 10**9  # older than the racy window
    for i in range(n):
        f = data / f"d{i % 100:02d}" / f"f{i:06d}.txt"
        f.write_bytes(b"x%d" % i)
        os.utime(f, ns=(old, old))
    store = Store(root / "cache", fsync=False)
    sc = StatCache(root / "cache" / "stat.sqlite")
    t = time.perf_counter()
    build(make(data, sc), store, None, progress=False)
    first = time.perf_counter() - t
    noop, noop_cpu = [], []
    for _ in range(repeat):
        dt, cpu, p = timed_plan(data, store, sc)
        assert p.stale_count == 0
        noop.append(dt)
        noop_cpu.append(cpu)
    for f in data.rglob("*.txt"):
        os.utime(f, ns=(old + 10**9, old + 10**9))
    dt_touch, _, p = timed_plan(data, store, sc)
    assert p.stale_count == 0 and sc.hashed == n
    for i in range(10):
        (data / "d00" / f"new{i}.txt").write_bytes(b"new %d" % i)
    dt_add, _, p = timed_plan(data, store, sc)
    assert p.counts()["transform"]["stale"] == 10
    print(
        f"N={n:>7}: first build {first:7.2f} s | no-op plan median {statistics.median(noop):.3f} s "
        f"(runs {', '.join(f'{x:.3f}' for x in noop)}; CPU median {statistics.median(noop_cpu):.3f} s) | after touching all {dt_touch:.3f} s | "
        f"after adding 10 {dt_add:.3f} s"
    )
    sc.close()
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sizes", nargs="*", type=int, default=[10_000])
    ap.add_argument("--dir", default="/tmp/zrecipe-bench-engine")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the files and store afterwards")
    args = ap.parse_args()
    for n in args.sizes:
        bench(n, Path(args.dir) / str(n), args.repeat, args.keep)


if __name__ == "__main__":
    main()
