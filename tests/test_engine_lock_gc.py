"""Store lock (timeout naming the holder, recovery after kill -9) and garbage collection."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers_build import Env, make_graph

from zrecipe.engine import Record, StoreLock, build, collect, plan
from zrecipe.engine.record import pending_path
from zrecipe.errors import LockTimeout

HOLD = "import sys, time; from zrecipe.engine import StoreLock\nwith StoreLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n"


def _holder(root):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_locker_times_out_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        t = time.monotonic()
        with pytest.raises(LockTimeout, match=f"pid {proc.pid}"), StoreLock(tmp_path, timeout=0.3):
            pass
        assert time.monotonic() - t >= 0.3
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_killed_holder_is_released(tmp_path):
    proc = _holder(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with StoreLock(tmp_path, timeout=2):  # no stale lock: the kernel dropped it with the process
        pass


def test_lock_is_reentrant_in_one_process(tmp_path):
    with StoreLock(tmp_path, timeout=0):
        with StoreLock(tmp_path, timeout=0):
            pass
        assert StoreLock(tmp_path).holder()["pid"] == os.getpid()
    assert StoreLock(tmp_path).holder() == {}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_gc_removes_only_unreferenced_entries(tmp_path):
    e = Env(tmp_path, n=4)
    e.build()
    keep = {n.key for ps in e.plan().nodes.values() for n in ps}
    _, _, _ = e.build(suffix="?")  # the "!" outputs are now unreferenced
    keep_new = {n.key for ps in e.plan(suffix="?").nodes.values() for n in ps}
    # a second graph using the same store keeps its own entries alive
    g2 = make_graph(e.data, e.sc, suffix="#")
    g2.graph_id = "other-graph"
    build(g2, e.store, e.ctx, progress=False)
    keep_other = {n.key for ps in plan(g2, e.store, None).nodes.values() for n in ps}
    # leftovers of a killed writer
    shard = e.store.objects / "ab"
    shard.mkdir(parents=True, exist_ok=True)
    (shard / f".tmp-{'ab' * 16}-{_dead_pid()}-0000").mkdir()
    (shard / f".tmp-{'ab' * 16}-{os.getpid()}-1111").mkdir()  # a live writer: kept
    (e.store.root / "work" / ("cd" * 16)).mkdir(parents=True)

    dry = collect(e.store, dry_run=True)
    assert dry.removed_entries == len(keep - keep_new - keep_other) == 5
    assert len(list(e.store.iter_entries())) == len(keep | keep_new | keep_other)
    report = collect(e.store)
    assert report.removed_entries == 5 and report.removed_temps == 1 and report.removed_work_dirs == 1
    assert report.removed_bytes > 0 and report.kept_bytes > 0
    assert sorted(report.roots) == ["other-graph", "test-graph"]
    assert set(e.store.iter_entries()) == keep_new | keep_other
    assert "removed 5 entries" in report.summary()
    _, _, ran = e.build(suffix="?")
    assert ran == []


def test_gc_keeps_what_a_killed_build_was_producing(tmp_path):
    e = Env(tmp_path, n=2)
    g = e.graph()
    p = plan(g, e.store, Record.load(e.store.root, g.graph_id))
    key = p.by_id()[("transform", "f0.txt")].key
    # a killed build: its pending list exists, one entry and a work folder were finished
    pending_path(e.store.root, g.graph_id).parent.mkdir(parents=True)
    pending_path(e.store.root, g.graph_id).write_text(key)
    e.store.put_bytes(key, {"out.txt": b"ITEM 0!"})
    e.store.work_dir(key)
    report = collect(e.store)
    assert report.removed_entries == 0 and report.removed_work_dirs == 0
    assert e.store.has(key)
