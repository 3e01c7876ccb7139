"""The build graph: step kinds, per-item nodes and the references between them.

A *step kind* (e.g. "resize") is code: a name, a version and a `run(tasks, ctx)` function. A *node* is one
run of a kind on one item (e.g. resize of `photos/a.jpg`) with its parameters and inputs. Inputs are the
outputs of upstream nodes (`Ref`) and/or literal identities such as the content hash of an input file or a
model. Nodes only reference nodes of *other* kinds, so the kinds themselves form a DAG and the executor can
run each kind once, on all its stale nodes together (one model load, batching per bucket).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

OnError = Literal["fail", "skip"]


class Ref(NamedTuple):
    """A reference to the output of node (`kind`, `item`). `optional=True`: when that node is skipped
    (failed with on_error skip), this node still runs and sees the input as None instead of being skipped.
    (A NamedTuple: immutable and ~10× cheaper to create than a frozen dataclass, for 100k-input nodes.)"""

    kind: str
    item: str
    optional: bool = False


# Not frozen: a frozen dataclass costs ~10× more to create, which shows at 100,000 nodes per plan.
# Treat nodes as immutable once added (the planner caches per params object).
@dataclass(slots=True)
class Node:
    """One run of step kind `kind` on `item` (an id unique within the kind, e.g. a relative image path).

    params:   everything besides the inputs that can change the output (JSON-like values, see keys.canonical).
    inputs:   `Ref`s to upstream nodes and/or literal identity strings (file content hashes, model identity);
              order is meaningful and part of the key.
    watch:    parameter names (dotted paths into nested params) whose old → new values are worth showing
              in reasons; None shows every changed parameter's values. Unwatched changes are named
              without values.
    on_error: "fail" — a failure stops the build after this kind (every failed item listed);
              "skip" — the item is skipped and reported, its dependents are skipped (unless optional Ref).
    """

    kind: str
    item: str
    params: Mapping[str, Any] = field(default_factory=dict)
    inputs: Sequence[Ref | str] = ()
    watch: tuple[str, ...] | None = None
    on_error: OnError = "fail"

    @property
    def id(self) -> tuple[str, str]:
        return (self.kind, self.item)


@dataclass(frozen=True)
class StepKind:
    """A kind of step.

    run:       `run(tasks: list[Task], ctx: RunContext) -> None`, called once per build with every stale node
               of this kind (or once per chunk in a worker process when `parallel`); writes each task's
               output with `with ctx.output(task) as folder: ...` (see executor.RunContext).
    version:   bump whenever the code changes its output: every node of the kind becomes stale.
    after:     kinds this kind depends on (also inferred from the nodes' Refs).
    parallel:  per-item CPU work: chunks of tasks run in a process pool (`run` must be picklable, i.e. a
               module-level function, and so must the ctx data).
    item_batch: tasks per chunk for parallel kinds (None: chosen from the count and the number of workers).
    """

    name: str
    version: int | str
    run: Callable[..., Any]
    after: tuple[str, ...] = ()
    parallel: bool = False
    item_batch: int | None = None
    description: str = ""


def closure(needs: Mapping[str, Iterable[str]], roots: Iterable[str]) -> set[str]:
    """`roots` and every name they need, transitively (`needs[name]`: what `name` depends on)."""
    keep: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack.extend(needs.get(name, ()))
    return keep


class GraphError(ValueError):
    """A malformed graph (a programming error of the code that builds it, not a user error)."""


class Graph:
    """Step kinds and their nodes. `graph_id` names the graph's build record in the store (e.g. the
    recipe path): the previous build of the same id is what reasons are computed against."""

    def __init__(self, graph_id: str, kinds: Iterable[StepKind] = ()):
        self.graph_id = graph_id
        self.kinds: dict[str, StepKind] = {}
        self.nodes: dict[str, dict[str, Node]] = {}
        # Kinds of the full graph left out by until(): their previous records are kept, not dropped.
        self.omitted_kinds: frozenset[str] = frozenset()
        self._ref_kinds: dict[str, set[str]] = {}  # kinds referenced by each kind's nodes (kept on add)
        for k in kinds:
            self.add_kind(k)

    def add_kind(self, kind: StepKind) -> StepKind:
        """Register a step kind (names are unique)."""
        if kind.name in self.kinds:
            raise GraphError(f"step kind {kind.name!r} registered twice")
        self.kinds[kind.name] = kind
        self.nodes[kind.name] = {}
        self._ref_kinds[kind.name] = set()
        return kind

    def add(self, node: Node) -> Node:
        """Add a node; its kind must be registered and (kind, item) unique."""
        if node.kind not in self.kinds:
            raise GraphError(f"node {node.kind}:{node.item} has unregistered kind {node.kind!r}")
        items = self.nodes[node.kind]
        if node.item in items:
            raise GraphError(f"node {node.kind}:{node.item} added twice")
        refs = self._ref_kinds[node.kind]
        for inp in node.inputs:
            if type(inp) is Ref:
                if inp.kind == node.kind:
                    raise GraphError(f"node {node.kind}:{node.item} references its own kind ({inp.item})")
                refs.add(inp.kind)
            elif type(inp) is not str:
                raise GraphError(f"node {node.kind}:{node.item}: input {inp!r} is neither a Ref nor a str")
        items[node.item] = node
        return node

    def node(self, kind: str, item: str) -> Node:
        """The node (`kind`, `item`); KeyError if absent."""
        return self.nodes[kind][item]

    def __len__(self) -> int:
        return sum(len(v) for v in self.nodes.values())

    def dependencies(self) -> dict[str, set[str]]:
        """{kind: kinds it needs}, from `after` plus every node's Refs (missing Ref targets are reported
        by the planner, which resolves every Ref anyway)."""
        deps = {name: set(k.after) | self._ref_kinds[name] for name, k in self.kinds.items()}
        for name, deps_of in deps.items():
            for d in deps_of:
                if d not in self.kinds:
                    raise GraphError(f"step kind {name!r} needs unknown kind {d!r}")
        return deps

    def order(self) -> list[str]:
        """Kind names in a deterministic topological order (registration order among equals)."""
        deps = self.dependencies()
        done: list[str] = []
        placed: set[str] = set()
        pending = list(self.kinds)
        while pending:
            ready = [k for k in pending if deps[k] <= placed]
            if not ready:
                raise GraphError(f"step kinds form a cycle: {', '.join(pending)}")
            for k in ready:
                done.append(k)
                placed.add(k)
            pending = [k for k in pending if k not in placed]
        return done

    def until(self, kind: str) -> Graph:
        """The subgraph of `kind` and every kind it needs (transitively), nothing downstream."""
        if kind not in self.kinds:
            raise GraphError(f"unknown step kind {kind!r}; known: {', '.join(self.kinds)}")
        keep = closure(self.dependencies(), [kind])
        sub = Graph(self.graph_id)
        for name, k in self.kinds.items():
            if name in keep:
                sub.add_kind(k)
                sub.nodes[name] = dict(self.nodes[name])
                sub._ref_kinds[name] = set(self._ref_kinds[name])
        sub.omitted_kinds = frozenset(self.kinds) - keep | self.omitted_kinds
        return sub
