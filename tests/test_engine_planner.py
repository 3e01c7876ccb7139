"""The invalidation matrix on the generic files → transform → aggregate graph, and plan reasons."""

from __future__ import annotations

import os

import pytest
from helpers_build import OLD_NS, Env

from zrecipe.engine import Record, plan
from zrecipe.engine.planner import param_changes
from zrecipe.engine.store import MANIFEST
from zrecipe.errors import StepFailed


def stale(p):
    return {(n.node.kind, n.node.item): n.reason for n in p.stale()}


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.build()
    return e


def test_first_build_runs_everything_then_noop(tmp_path):
    e = Env(tmp_path)
    p, r, ran = e.build()
    assert len(ran) == 6 and r.kinds["transform"].ran == 5 and r.kinds["aggregate"].ran == 1
    assert all(n.category == "new input" for n in p.stale())
    p2, r2, ran2 = e.build()
    assert ran2 == [] and p2.stale_count == 0 and r2.kinds["transform"].cached == 5
    assert "nothing to do" in p2.summary()


def test_changed_bytes_make_exactly_that_item_stale(env):
    env.write("f2.txt", "item two, changed")
    p, _, ran = env.build()
    assert stale(p).keys() == {("transform", "f2.txt"), ("aggregate", "all")}
    assert stale(p)[("transform", "f2.txt")].startswith("changed input")
    assert stale(p)[("aggregate", "all")] == "upstream changed: transform:f2.txt"
    assert ran == ["transform:f2.txt", "aggregate:all"]
    assert (env.store.path(p.by_id()[("aggregate", "all")].key) / "all.txt").read_text().split("|")[2] == (
        "ITEM TWO, CHANGED!"
    )


def test_changed_parameter_names_it(env):
    p = env.plan(suffix="?")
    reasons = stale(p)
    assert len([k for k in reasons if k[0] == "transform"]) == 5
    assert reasons[("transform", "f0.txt")] == 'changed parameter: suffix "!" → "?"'
    assert p.counts()["transform"]["reasons"] == {"changed parameter": 5}


def test_touch_without_change_is_not_stale(env):
    for name in os.listdir(env.data):
        os.utime(env.data / name, ns=(OLD_NS + 10**12, OLD_NS + 10**12))
    p, _, ran = env.build()
    assert p.stale_count == 0 and ran == []
    assert env.sc.hashed == 5  # touched files were re-hashed, found equal


def test_added_items_are_new(env):
    for i in range(5, 8):
        env.write(f"f{i}.txt", f"new {i}")
    p, _, ran = env.build()
    assert {k: v for k, v in stale(p).items() if k[0] == "transform"} == {
        ("transform", f"f{i}.txt"): "new input" for i in range(5, 8)
    }
    assert stale(p)[("aggregate", "all")] == "changed input: 3 added, 0 removed"
    assert sorted(ran) == ["aggregate:all", "transform:f5.txt", "transform:f6.txt", "transform:f7.txt"]


def test_deleted_item_leaves_the_plan(env):
    (env.data / "f1.txt").unlink()
    p, _, ran = env.build()
    assert ("transform", "f1.txt") not in p.by_id()
    assert p.removed["transform"] == 1 and "1 removed" in p.summary()
    assert ran == ["aggregate:all"]
    assert stale(p)[("aggregate", "all")] == "changed input: 0 added, 1 removed"


def test_truncated_upstream_output_is_rebuilt_before_it_is_read(env):
    # Damage f3's stored output, then change only the aggregate's inputs (add an item): the aggregate
    # will read f3's entry, so the planner size-checks it and rebuilds it first.
    key = env.plan().by_id()[("transform", "f3.txt")].key
    (env.store.path(key) / "out.txt").write_text("X")
    env.write("f9.txt", "nine")
    assert ("transform", "f3.txt") not in stale(env.plan())  # a quick plan does not read manifests
    p, _, ran = env.build()
    assert stale(p)[("transform", "f3.txt")].startswith("corrupt output")
    assert "transform:f3.txt" in ran and "aggregate:all" in ran
    agg = p.by_id()[("aggregate", "all")].key
    assert "ITEM 3!" in (env.store.path(agg) / "all.txt").read_text()


def test_deleted_manifest_of_final_output_is_rebuilt(env):
    key = env.plan().by_id()[("aggregate", "all")].key
    (env.store.path(key) / MANIFEST).unlink()
    g = env.graph()
    p = plan(g, env.store, Record.load(env.store.root, g.graph_id), verify="sizes")
    assert stale(p) == {
        ("aggregate", "all"): "corrupt output: the stored result failed verification and will be rebuilt"
    }
    # and a missing output (entry gone) says so
    env.store.discard(key)
    p, _, ran = env.build()
    assert stale(p) == {("aggregate", "all"): "missing output"} and ran == ["aggregate:all"]
    assert env.store.get(key, verify=True) is not None


def test_step_version_change(env):
    p = env.plan(transform_version=2)
    assert stale(p)[("transform", "f0.txt")] == "step version changed: 1 → 2"
    assert p.counts()["transform"]["stale"] == 5


def test_force_and_until(env):
    p = env.plan(force=("aggregate",))
    assert stale(p) == {("aggregate", "all"): "forced"}
    env.write("f0.txt", "changed")
    p, _, ran = env.build(until="transform")
    assert p.order == ["transform"] and ran == ["transform:f0.txt"]
    # the aggregate's record survived the partial build, so its reason is still precise
    p = env.plan()
    assert stale(p) == {("aggregate", "all"): "upstream changed: transform:f0.txt"}
    with pytest.raises(ValueError):
        env.plan(force=("nope",))


def test_reasons_survive_a_failed_build(env):
    env.write("f1.txt", "FAIL")
    env.write("f2.txt", "changed")
    with pytest.raises(StepFailed):
        env.build(suffix="?")
    # f2 built with the new suffix; f1 failed: still explained against what it had before
    p = env.plan(suffix="?")
    assert stale(p)[("transform", "f1.txt")] == 'changed parameter: suffix "!" → "?"'
    assert ("transform", "f2.txt") not in stale(p)


def test_plan_json_and_verbose_summary(env):
    env.write("f4.txt", "changed")
    p = env.plan()
    j = p.to_json(verbose=True)
    assert j["stale"] == 2 and j["kinds"]["transform"]["up_to_date"] == 4
    assert j["kinds"]["transform"]["items"][0]["item"] == "f4.txt"
    assert "f4.txt: changed input" in p.summary(verbose=True)


def test_param_changes_watch_and_nesting():
    old = {"opt": {"lr": 0.0001, "betas": [0.9, 0.99]}, "captions": ["a"] * 50}
    new = {"opt": {"lr": 5e-05, "betas": [0.9, 0.99]}, "captions": ["b"] * 50, "extra": 1}
    assert param_changes(old, new, None)[2] == "opt.lr 0.0001 → 5e-05"
    assert param_changes(old, new, ("opt",)) == ["captions", "extra", "opt.lr 0.0001 → 5e-05"]
    assert param_changes({"x": 1}, {"x": 1.0}, None) == ["x 1 → 1.0"]
    assert param_changes({"x": 1}, {"x": 1}, None) == []


def test_graph_errors_and_order():
    from zrecipe.engine import Graph, GraphError, Node, Ref, StepKind

    def run(tasks, ctx):
        pass

    g = Graph("g", [StepKind("c", 1, run, after=("b",)), StepKind("b", 1, run), StepKind("a", 1, run)])
    g.add(Node("b", "x", {}, [Ref("a", "1")]))
    assert g.order() == ["a", "b", "c"]
    assert g.until("b").order() == ["a", "b"] and g.until("b").omitted_kinds == {"c"}
    with pytest.raises(GraphError, match="added twice"):
        g.add(Node("b", "x"))
    with pytest.raises(GraphError, match="own kind"):
        g.add(Node("a", "2", {}, [Ref("a", "1")]))
    with pytest.raises(GraphError, match="neither a Ref nor a str"):
        g.add(Node("a", "3", {}, [42]))
    with pytest.raises(GraphError, match="missing a:1"):
        plan(g, None, None)  # the Ref target was never added
    g.add(Node("a", "4", {}, [Ref("c", "1")]))
    with pytest.raises(GraphError, match="cycle"):
        g.order()
    with pytest.raises(GraphError, match="unknown step kind"):
        g.until("zzz")
