"""Executor: failures and skips, parallel kinds, reports, interrupts, kill -9 and concurrent builds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers_build import Env, make_graph, read_log

from zrecipe.engine import Graph, Node, Record, StepKind, Store, build, execute, plan
from zrecipe.errors import StepFailed

TESTS = Path(__file__).parent


def test_failed_items_stop_the_build_listing_every_one(tmp_path):
    e = Env(tmp_path)
    e.write("f1.txt", "FAIL")
    e.write("f3.txt", "FAIL")
    with pytest.raises(StepFailed) as info:
        e.build()
    err = info.value
    assert [f[:2] for f in err.failures] == [("transform", "f1.txt"), ("transform", "f3.txt")]
    assert "f1.txt: cannot transform" in str(err) and "f3.txt" in str(err)
    assert err.exit_code == 2  # every failure was a UserError (bad input)
    assert err.report.status == "failed" and err.report.kinds["transform"].ran == 3
    assert "aggregate:all" not in read_log(e.log)  # stopped before the next kind
    # the good items are kept: fixing the inputs only runs the two items and the aggregate
    e.write("f1.txt", "fixed")
    e.write("f3.txt", "fixed too")
    _, _, ran = e.build()
    assert sorted(ran) == ["aggregate:all", "transform:f1.txt", "transform:f3.txt"]


def test_skip_items_and_their_dependents(tmp_path):
    e = Env(tmp_path)
    e.write("f2.txt", "FAIL")
    _, r, ran = e.build(on_error="skip")
    kr = r.kinds["transform"]
    assert (kr.ran, kr.skipped, kr.failed) == (4, 1, 0)
    assert kr.skipped_items[0]["item"] == "f2.txt" and "cannot transform" in kr.skipped_items[0]["error"]
    assert (
        r.kinds["aggregate"].skipped == 1
        and "upstream transform:f2.txt" in r.kinds["aggregate"].skipped_items[0]["error"]
    )
    assert "aggregate:all" not in ran


def test_optional_ref_runs_without_the_skipped_input(tmp_path):
    e = Env(tmp_path)
    e.write("f2.txt", "FAIL")
    p, r, _ = e.build(on_error="skip", optional=True)
    assert r.kinds["aggregate"].ran == 1
    out = (e.store.path(p.by_id()[("aggregate", "all")].key) / "all.txt").read_text()
    assert out.split("|") == ["ITEM 0!", "ITEM 1!", "ITEM 3!", "ITEM 4!"]


def test_parallel_kind_uses_worker_processes(tmp_path):
    e = Env(tmp_path, n=7)
    report_path = tmp_path / "out" / "build-report.json"
    g = make_graph(e.data, e.sc, parallel=True)
    p, r = build(g, e.store, e.ctx, jobs=2, progress=False, report_path=report_path)
    assert r.kinds["transform"].ran == 7 and r.jobs == 2
    assert sorted(read_log(e.log)) == sorted([f"transform:f{i}.txt" for i in range(7)] + ["aggregate:all"])
    data = json.loads(report_path.read_text())
    assert data["status"] == "ok" and data["kinds"]["transform"]["reasons"] == {"new input": 7}
    assert data["peak_rss_bytes"] > 0
    for n in p.stale():
        assert e.store.check(n.key, "hashes") == "ok"


def test_parallel_failures_are_collected(tmp_path):
    e = Env(tmp_path, n=6)
    e.write("f4.txt", "FAIL")
    g = make_graph(e.data, e.sc, parallel=True)
    with pytest.raises(StepFailed) as info:
        build(g, e.store, e.ctx, jobs=2, progress=False)
    assert [f[1] for f in info.value.failures] == ["f4.txt"]


def _boom(tasks, ctx):
    raise RuntimeError("model failed to load")


def _lazy(tasks, ctx):
    pass  # writes nothing


def test_step_errors_and_missing_outputs_fail_every_task(tmp_path):
    store = Store(tmp_path, fsync=False)
    g = Graph("g", [StepKind("a", 1, _boom), StepKind("b", 1, _lazy)])
    g.add(Node("a", "x", {"n": 1}))
    g.add(Node("a", "y", {"n": 2}))
    with pytest.raises(StepFailed, match="model failed to load") as info:
        execute(plan(g, store, None), store, progress=False)
    assert len(info.value.failures) == 2 and info.value.exit_code == 1
    g2 = Graph("g2", [StepKind("b", 1, _lazy)])
    g2.add(Node("b", "x"))
    with pytest.raises(StepFailed, match="without writing an output"):
        execute(plan(g2, store, None), store, progress=False)


def _interrupt(tasks, ctx):
    with ctx.output(tasks[0]) as out:
        (out / "a").write_text("done")
    with ctx.output(tasks[1]) as out:
        (out / "a").write_text("half")
        raise KeyboardInterrupt


def test_ctrl_c_keeps_finished_entries_and_records_them(tmp_path):
    store = Store(tmp_path, fsync=False)
    g = Graph("g", [StepKind("a", 1, _interrupt)])
    g.add(Node("a", "x", {"n": 1}))
    g.add(Node("a", "y", {"n": 2}))
    report_path = tmp_path / "report.json"
    with pytest.raises(KeyboardInterrupt):
        execute(plan(g, store, None), store, progress=False, report_path=report_path)
    assert json.loads(report_path.read_text())["status"] == "interrupted"
    p = plan(g, store, Record.load(store.root, "g"))
    assert [n.node.item for n in p.stale()] == ["y"]
    assert list(store.iter_temps()) == []


def _script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "run_build.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(TESTS)!r})
            from pathlib import Path
            from helpers_build import Env, make_graph
            from zrecipe.engine import StatCache, Store, build, execute, plan, Record
            root = Path(sys.argv[1]); store = Store(root / "cache", fsync=False)
            sc = StatCache(root / "cache" / "stat.sqlite")
            ctx = {{"root": str(root / "data"), "log": str(root / "log.txt")}}
            """
        )
        + textwrap.dedent(body)
    )
    return script


def test_kill_9_mid_build_leaves_a_usable_store(tmp_path):
    e = Env(tmp_path, n=6)
    script = _script(
        tmp_path, "build(make_graph(root / 'data', sc, sleep=0.4), store, ctx, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)])
    deadline = time.monotonic() + 30
    while len(read_log(e.log)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    started = read_log(e.log)
    assert 3 <= len(started) < 7, "the build should have been killed mid-way"
    # Only complete entries are visible; the killed writer's temp folder is just left over.
    for key in e.store.iter_entries():
        assert e.store.check(key, "hashes") == "ok"
    p, r, ran = e.build(sleep=0.4)
    assert r.status == "ok" and p.stale_count == len(ran)
    assert len(ran) < 7  # what finished before the kill was kept
    assert "aggregate:all" in ran
    out = (e.store.path(p.by_id()[("aggregate", "all")].key) / "all.txt").read_text()
    assert out == "|".join(f"ITEM {i}!" for i in range(6))


def test_two_concurrent_builds_both_succeed(tmp_path):
    e = Env(tmp_path, n=6)
    script = _script(
        tmp_path, "build(make_graph(root / 'data', sc, sleep=0.05), store, ctx, progress=False)\n"
    )
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)]) for _ in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    # The lock serialised them: each item ran once, and the second build found everything done.
    assert sorted(read_log(e.log)) == sorted([f"transform:f{i}.txt" for i in range(6)] + ["aggregate:all"])
    for key in e.store.iter_entries():
        assert e.store.check(key, "hashes") == "ok"


def test_two_concurrent_unlocked_executions_never_corrupt(tmp_path):
    e = Env(tmp_path, n=6)
    body = """
        g = make_graph(root / 'data', sc, sleep=0.02)
        execute(plan(g, store, Record.load(store.root, g.graph_id)), store, ctx, progress=False)
    """
    script = _script(tmp_path, body)
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path)]) for _ in range(2)]
    assert [p.wait(60) for p in procs] == [0, 0]
    keys = list(e.store.iter_entries())
    assert len(keys) == 7
    for key in keys:
        assert e.store.check(key, "hashes") == "ok"
    assert list(e.store.iter_temps()) == []
    _, _, ran = e.build(sleep=0.02)
    assert ran == []


def test_noop_build_does_not_rewrite_the_record(tmp_path):
    e = Env(tmp_path, n=3)
    e.build()
    rec = Record.load(e.store.root, "test-graph").path
    before = os.stat(rec)
    _, _, ran = e.build()
    after = os.stat(rec)
    assert ran == [] and (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    assert not (rec.with_suffix(".pending")).exists()


def test_parallel_kind_with_spawn_and_progress_bars(tmp_path, monkeypatch):
    # spawn is what macOS uses; progress bars are drawn when stderr is a terminal.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    e = Env(tmp_path, n=4)
    g = make_graph(e.data, e.sc, parallel=True)
    _, r = build(g, e.store, e.ctx, jobs=2, progress=True, mp_context="spawn")
    assert r.kinds["transform"].ran == 4 and r.kinds["aggregate"].ran == 1
    assert r.peak_rss_children_bytes > 0


def test_damaged_input_met_by_a_step_fails_that_item(tmp_path):
    e = Env(tmp_path, n=3)
    e.build()
    g = make_graph(e.data, e.sc)
    key = plan(g, e.store, None).by_id()[("transform", "f1.txt")].key
    (e.store.path(key) / "out.txt").write_text("?")  # damaged after the build
    g = make_graph(e.data, e.sc)
    g.kinds["aggregate"] = StepKind("aggregate", 2, g.kinds["aggregate"].run)  # make the aggregate stale
    quick = plan(g, e.store, Record.load(e.store.root, g.graph_id))  # check_inputs=False
    with pytest.raises(StepFailed, match="input damaged"):
        execute(quick, e.store, e.ctx, progress=False)
    assert not e.store.path(key).exists()  # discarded on the way: the next build rebuilds it
    _, r = build(g, e.store, e.ctx, progress=False)
    assert r.kinds["transform"].ran == 1 and r.kinds["aggregate"].ran == 1
