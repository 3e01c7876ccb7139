"""The planner: a pure function from (graph, store contents, previous record) to what must run and why.

Cheapest first: every node's key is computed from its parameters and its inputs' keys/hashes (no file is
read), the store is asked which keys exist with one directory listing per shard, and only when something is
stale is the previous build's record parsed to explain why. Entries that stale nodes are about to read are
verified (sizes) so a damaged upstream output is rebuilt first instead of failing the step that reads it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from xxhash import xxh128_hexdigest

from .graph import Graph, GraphError, Node, Ref
from .keys import key_from_prefix, key_prefix
from .pause import paused_gc
from .record import Entry, Record, jsonable, kind_digest
from .store import Store, VerifyLevel

Status = Literal["up-to-date", "stale"]
# Reason categories, in the order the planner tests them.
REASONS = (
    "forced",
    "corrupt output",
    "missing output",
    "new input",
    "step version changed",
    "changed parameter",
    "upstream changed",
    "changed input",
)


@dataclass(slots=True)
class PlannedNode:
    """A node with its key, resolved inputs (upstream keys / literal hashes) and status.

    `category` is one of REASONS (None when up to date); `reason` is the human sentence, e.g.
    "changed parameter: size 512 → 1024"."""

    node: Node
    key: str
    inputs: list[str]
    status: Status = "up-to-date"
    category: str | None = None
    reason: str | None = None

    @property
    def stale(self) -> bool:
        return self.status == "stale"


@dataclass
class Plan:
    """The planner's result. `nodes[kind]` lists PlannedNodes in graph order; `order` is the kinds'
    topological order; `removed[kind]` counts items of the previous build that left the graph."""

    graph: Graph
    order: list[str]
    nodes: dict[str, list[PlannedNode]]
    previous: Record | None
    removed: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)

    def by_id(self) -> dict[tuple[str, str], PlannedNode]:
        """{(kind, item): PlannedNode}."""
        return {(p.node.kind, p.node.item): p for ps in self.nodes.values() for p in ps}

    def stale(self, kind: str | None = None) -> list[PlannedNode]:
        """Stale nodes (of one kind, or all in topological order)."""
        kinds = [kind] if kind is not None else self.order
        return [p for k in kinds for p in self.nodes[k] if p.stale]

    @property
    def stale_count(self) -> int:
        return sum(1 for ps in self.nodes.values() for p in ps if p.stale)

    def counts(self) -> dict[str, dict[str, Any]]:
        """Per kind: total, stale, up_to_date, removed and {reason category: count}."""
        out = {}
        for k in self.order:
            ps = self.nodes[k]
            stale = [p for p in ps if p.stale]
            out[k] = {
                "total": len(ps),
                "stale": len(stale),
                "up_to_date": len(ps) - len(stale),
                "removed": self.removed.get(k, 0),
                "reasons": dict(Counter(p.category for p in stale)),
            }
        return out

    def to_json(self, verbose: bool = False) -> dict[str, Any]:
        """JSON-able plan; `verbose` adds every stale item with its key and reason."""
        kinds = self.counts()
        if verbose:
            for k in self.order:
                kinds[k]["items"] = [
                    {"item": p.node.item, "key": p.key, "reason": p.reason} for p in self.nodes[k] if p.stale
                ]
        return {"graph": self.graph.graph_id, "stale": self.stale_count, "kinds": kinds}

    def summary(self, verbose: bool = False) -> str:
        """Human summary: one line per kind with counts and reasons; `verbose` lists stale items."""
        counts = self.counts()
        width = max((len(k) for k in self.order), default=4)
        lines = []
        for k in self.order:
            c = counts[k]
            why = ", ".join(f"{n} {r}" for r, n in sorted(c["reasons"].items(), key=lambda x: -x[1]))
            line = f"{k:<{width}}  {c['stale']:>7} stale / {c['total']:<7}"
            if c["removed"]:
                line += f"  ({c['removed']} removed)"
            lines.append(line + (f"  {why}" if why else "  up to date"))
            if verbose:
                lines.extend(f"    {p.node.item}: {p.reason}" for p in self.nodes[k] if p.stale)
        n = self.stale_count
        lines.append("nothing to do: everything is up to date" if n == 0 else f"{n} step(s) to run")
        return "\n".join(lines)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _show(v: Any) -> str:
    s = "(absent)" if v is _ABSENT else json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."


_ABSENT = object()


def param_changes(old: Mapping[str, Any], new: Mapping[str, Any], watch: Iterable[str] | None) -> list[str]:
    """['name a → b', ...] for every changed parameter (dotted paths); unwatched ones by name only."""
    a, b = _flatten(dict(old)), _flatten(jsonable(new))
    watched = None if watch is None else tuple(watch)
    out = []
    for name in sorted(set(a) | set(b)):
        va, vb = a.get(name, _ABSENT), b.get(name, _ABSENT)
        if va == vb and type(va) is type(vb):
            continue
        if watched is None or any(name == w or name.startswith(w + ".") for w in watched):
            out.append(f"{name} {_show(va)} → {_show(vb)}")
        else:
            out.append(name)
    return out


def _input_reason(p: PlannedNode, prev: Entry, ids: dict[tuple[str, str], PlannedNode]) -> tuple[str, str]:
    new, old = p.inputs, prev.inputs
    if len(new) == len(old):
        diff = [i for i in range(len(new)) if new[i] != old[i]]
        refs = [p.node.inputs[i] for i in diff if isinstance(p.node.inputs[i], Ref)]
        if refs:
            r = refs[0]
            more = f" (+{len(refs) - 1} more)" if len(refs) > 1 else ""
            return "upstream changed", f"upstream changed: {r.kind}:{r.item}{more}"
        if diff:
            i = diff[0]
            more = f" (+{len(diff) - 1} more)" if len(diff) > 1 else ""
            return "changed input", f"changed input: #{i} {old[i][:12]} → {new[i][:12]}{more}"
        return "changed input", "changed input"
    added, removed = len(set(new) - set(old)), len(set(old) - set(new))
    return "changed input", f"changed input: {added} added, {removed} removed"


def plan(
    graph: Graph,
    store: Store,
    previous: Record | None,
    *,
    force: Iterable[str] = (),
    verify: VerifyLevel = "exists",
    check_inputs: bool = False,
) -> Plan:
    """Plan a build of `graph` against `store`, explaining staleness relative to `previous`.

    verify: how up-to-date outputs are checked — "exists" (one listing per shard; entries only appear
    complete), "sizes" or "hashes" (per entry).
    check_inputs: also size-check the stored outputs that stale nodes will read; a damaged one becomes
    stale ("corrupt output") and is rebuilt first. Costs one manifest read per such entry (a stale node
    over 100,000 inputs: seconds), so a quick `plan` leaves it off and `build()` turns it on; without it
    a step's ctx.input_dir() still verifies each input it reads and fails that item on damage.
    force: kind names whose every node is stale with reason "forced".
    """
    order = graph.order()
    forced = set(force)
    unknown = forced - set(graph.kinds)
    if unknown:
        raise ValueError(f"cannot force unknown step kind(s): {', '.join(sorted(unknown))}")
    with paused_gc():
        return _plan(graph, store, previous, order, forced, verify, check_inputs)


def _keys(graph: Graph, order: list[str]) -> tuple[dict[str, dict[str, str]], dict[str, list[PlannedNode]]]:
    """Every node's key, kind by kind (upstream keys first): the hot loop of a no-op plan."""
    keys: dict[str, dict[str, str]] = {}  # kind → item → key
    nodes: dict[str, list[PlannedNode]] = {}
    for kind in order:
        version = graph.kinds[kind].version
        prefixes: dict[int, bytes] = {}
        last_params: object = None
        out = nodes[kind] = []
        kind_keys = keys[kind] = {}
        for item, node in graph.nodes[kind].items():
            params = node.params
            if params is not last_params:  # items of a kind usually share one params object
                prefix = prefixes.get(id(params))
                if prefix is None:
                    prefix = prefixes[id(params)] = key_prefix(kind, version, params)
                last_params = params
            inputs = node.inputs
            if len(inputs) == 1 and type(x := inputs[0]) is str and x.isascii():
                # One file hash: the per-item case, inlined (same bytes as key_from_prefix). A list of
                # literal hashes is its own resolution (nodes are not changed once added): no copy per node.
                resolved = inputs if type(inputs) is list else [x]
                key = xxh128_hexdigest(b"%sl1:s%d:%s" % (prefix, len(x), x.encode("ascii")))
            else:
                try:
                    resolved = [i if type(i) is str else keys[i.kind][i.item] for i in inputs]
                except KeyError:
                    bad = next(i for i in inputs if type(i) is Ref and i.item not in keys.get(i.kind, {}))
                    raise GraphError(f"node {kind}:{item} references missing {bad.kind}:{bad.item}") from None
                key = key_from_prefix(prefix, resolved)
            kind_keys[item] = key
            out.append(PlannedNode(node, key, resolved))
    return keys, nodes


def _plan(graph, store, previous, order, forced, verify, check_inputs) -> Plan:
    keys, nodes = _keys(graph, order)
    if verify == "exists":
        present = store.existing(k for kk in keys.values() for k in kk.values())
        corrupt: set[str] = set()
    else:
        states = {k: store.check(k, verify) for kk in keys.values() for k in set(kk.values())}
        present = {k for k, s in states.items() if s == "ok"}
        corrupt = {k for k, s in states.items() if s == "corrupt"}
    stale: list[PlannedNode] = []
    for kind in order:
        if kind in forced:
            for p in nodes[kind]:
                p.status, p.category = "stale", "forced"
            stale.extend(nodes[kind])
            continue
        for p in nodes[kind]:
            if p.key not in present:
                p.status = "stale"
                p.category = "corrupt output" if p.key in corrupt else None
                stale.append(p)

    ids: dict[tuple[str, str], PlannedNode] = {}
    if stale:
        ids = {(p.node.kind, p.node.item): p for ps in nodes.values() for p in ps}
    if stale and check_inputs:
        # Outputs that stale nodes will read must be intact: size-check them, and rebuild damaged ones
        # first (which may in turn need their own inputs checked).
        checked: dict[str, str] = {}
        queue = list(stale)
        while queue:
            p = queue.pop()
            for inp in p.node.inputs:
                if type(inp) is not Ref:
                    continue
                up = ids[(inp.kind, inp.item)]
                if up.stale:
                    continue
                state = checked.get(up.key) or checked.setdefault(up.key, store.check(up.key, "sizes"))
                if state != "ok":
                    up.status, up.category = "stale", "corrupt output" if state == "corrupt" else None
                    stale.append(up)
                    queue.append(up)

    digests = {k: kind_digest((p.node.item, p.key) for p in nodes[k]) for k in order}
    result = Plan(graph, order, nodes, previous, digests=digests)
    unchanged = previous is not None and all(previous.digests.get(k) == digests[k] for k in order)
    if previous is not None and not unchanged:
        for k in order:
            result.removed[k] = sum(1 for item, _ in previous.iter_kind(k) if item not in graph.nodes[k])
    for p in stale:
        if p.reason is None:
            _explain(p, previous, graph, ids)
    return result


def _explain(p: PlannedNode, previous: Record | None, graph: Graph, ids: dict) -> None:
    node = p.node
    if p.category == "forced":
        p.reason = "forced"
        return
    if p.category == "corrupt output":
        p.reason = "corrupt output: the stored result failed verification and will be rebuilt"
        return
    prev = previous.entry(node.kind, node.item) if previous is not None else None
    if prev is None:
        p.category, p.reason = "new input", "new input"
    elif prev.key == p.key:
        p.category, p.reason = "missing output", "missing output"
    elif previous.version(node.kind) != graph.kinds[node.kind].version:
        p.category = "step version changed"
        p.reason = f"step version changed: {previous.version(node.kind)} → {graph.kinds[node.kind].version}"
    elif changes := param_changes(prev.params, node.params, node.watch):
        p.category = "changed parameter"
        p.reason = "changed parameter: " + ", ".join(changes)
    else:
        p.category, p.reason = _input_reason(p, prev, ids)
