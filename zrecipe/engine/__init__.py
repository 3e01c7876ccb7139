"""zrecipe's generic build engine: a content-hashed DAG of steps, a store, a planner and an executor.

It knows nothing about Z-Image, recipes or images. A caller (zrecipe.pipeline) describes work as a Graph
of StepKinds and per-item Nodes; the engine decides what is stale, says why, runs it, and stores results.

Vocabulary
    StepKind(name, version, run, after=(), parallel=False, item_batch=None)
        Code. `run(tasks, ctx)` receives every stale node of the kind at once (load a model once, batch),
        or chunks of them in worker processes when `parallel` (then `run` and ctx data must pickle).
        Bump `version` whenever the code's output changes: every node of the kind becomes stale.
    Node(kind, item, params={}, inputs=(), watch=None, on_error="fail")
        One run of a kind on one item. `inputs`: Ref(kind, item[, optional]) to upstream nodes and/or
        literal identity strings (file content hashes from StatCache, a model identity).
    Graph(graph_id)  .add_kind(StepKind) .add(Node) .order() .until(kind)
        `graph_id` names the build record the next plan compares against (e.g. the recipe's path).

Keys (keys.py)
    step_key(kind, version, params, inputs) = xxh128(canonical(["zrecipe-step", KEY_FORMAT, kind, version,
    params, inputs])).
    canonical(): dict order, float spelling (1e-4 == 0.0001), path spelling (a/./b == a/b), tuple vs list
    and Unicode normalisation do not matter; types do (1 != 1.0 != "1"). Golden tests pin the format.

Typical use
    store = Store(cache_dir)
    with StatCache(cache_dir / "stat.sqlite") as sc:
        hashes = sc.hash_files(paths, stats)           # cheap when nothing changed
    g = Graph("recipes/style.yaml", [StepKind("resize", 1, run_resize, parallel=True), ...])
    g.add(Node("resize", "a.jpg", {"size": 512}, [hashes["/data/a.jpg"]], on_error="skip"))
    the_plan, report = build(g, store, ctx=my_data, until=None, force=(), jobs=2,
                             report_path=out / "build-report.json")
    # or, step by step: with StoreLock(root): p = plan(g, store, Record.load(root, g.graph_id));
    #                                          print(p.summary()); execute(p, store, my_data)

Inside a step
    def run_resize(tasks: list[Task], ctx: RunContext) -> None:
        for task in tasks:                                  # task.node / .key / .item / .params / .inputs
            with ctx.output(task) as folder:                # exception inside → this item failed
                src = ctx.input_dir(task, 0)                # upstream entry folder (Ref inputs)
                (folder / "image.png").write_bytes(...)     # committed atomically on exit
    ctx.data is what execute(ctx=...) got; ctx.work_dir(task) is a persistent scratch folder for
    resumable steps (training checkpoints survive a killed build; gc keeps it while referenced).

Plan (planner.plan, pure apart from reading the store)
    Each PlannedNode has key, status ("up-to-date" | "stale"), category (one of planner.REASONS) and a
    reason sentence: new input / changed input / changed parameter: name a → b / missing output /
    corrupt output / step version changed / upstream changed: kind:item / forced.
    Plan.counts(), .to_json(verbose), .summary(verbose), .stale(kind), .removed (items that left).
    plan(..., check_inputs=True) also size-checks the stored outputs stale nodes will read (build() does
    this; a quick `zrecipe plan` may skip it: one manifest read per input of a stale node).

Execution (executor.execute) → BuildReport (ran / cached / failed / skipped / seconds / reasons per kind,
    peak RSS). Failed items with on_error="fail" → StepFailed listing every failed item (exit_code 2 when
    they are all UserErrors); on_error="skip" → skipped and reported; dependents of failed or skipped nodes
    are skipped (an optional Ref sees None). The build record is written atomically at the end.

Speed: `with paused_gc():` around building a graph of 100,000 nodes (plan() and StatCache pause the
cyclic GC themselves); that and the stat cache keep a no-op plan of 100k items around a second.

Safety: entries appear only by atomic rename of a complete temp folder (kill -9 safe); damaged entries
are detected and rebuilt: the planner size-checks what stale nodes will read, and `ctx.input_dir` hashes
every file of an entry against its manifest before the step reads it (once per entry per build) — a
mismatch discards the entry, fails the reading task, and `build()` re-plans and rebuilds it, so nothing
built from damaged bytes is ever committed. `verify_store` checks a whole store (`zrecipe doctor --store`). StoreLock (flock, released by
the kernel when the holder dies) serialises builds and gc. gc.collect() keeps what the latest build of
every graph id (and any pending build) references.
"""

from .context import Outcome, RunContext, Task
from .executor import build, execute
from .gc import GcReport, collect
from .graph import Graph, GraphError, Node, Ref, StepKind
from .keys import canonical, hash_bytes, step_key
from .lock import StoreLock
from .pause import paused_gc
from .planner import REASONS, Plan, PlannedNode, plan
from .record import Record, record_path
from .report import BuildReport, KindReport
from .statcache import StatCache, hash_file
from .store import Store
from .verify import VerifyReport, verify_store

__all__ = [
    "REASONS",
    "BuildReport",
    "GcReport",
    "Graph",
    "GraphError",
    "KindReport",
    "Node",
    "Outcome",
    "Plan",
    "PlannedNode",
    "Record",
    "Ref",
    "RunContext",
    "StatCache",
    "StepKind",
    "Store",
    "StoreLock",
    "Task",
    "VerifyReport",
    "build",
    "canonical",
    "collect",
    "execute",
    "hash_bytes",
    "hash_file",
    "paused_gc",
    "plan",
    "record_path",
    "step_key",
    "verify_store",
]
