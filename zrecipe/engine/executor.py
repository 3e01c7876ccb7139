"""The executor: runs a plan's stale nodes kind by kind, records the outcome, writes the build record.

Each kind's stale nodes go to its `run()` in one call (or in chunks across a process pool for `parallel`
kinds), so a step loads its model once and batches. Outputs are committed one entry at a time through the
store's atomic writer, so an interrupt at any moment loses at most the entries in flight. The build record
(see record.py) is rewritten at the end — also after a failure or Ctrl-C — keeping the previous entry of
every node that did not complete, so the next plan still explains it.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import StepFailed, ZRecipeWarning, os_problem
from .context import Outcome, RunContext, Task, run_chunk, run_tasks
from .graph import Graph, Ref, StepKind
from .planner import Plan, PlannedNode
from .record import RecordBuilder, pending_path
from .report import BuildReport, KindReport
from .store import Store, VerifyLevel, write_atomic

# A damaged entry found while a step reads it is discarded and rebuilt by a new plan; a store that keeps
# returning damaged bytes after this many rebuilds has a deeper problem (a failing disk) to report.
REPAIR_ATTEMPTS = 2
FINISH_FIX = "free some space or fix the store folder, then run the build again (finished steps are kept)"


def _progress(enabled: bool):
    """A rich Progress with items/s and ETA columns, or None when disabled / not a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task):  # type: ignore[override]
            return Text(f"{task.speed:.1f} items/s" if task.speed else "", style="progress.data.speed")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _failure_message(failures: list[tuple[str, str, str]]) -> str:
    shown = [f"  {kind}:{item}: {err}" for kind, item, err in failures[:50]]
    more = f"\n  ... and {len(failures) - 50} more (see the build report)" if len(failures) > 50 else ""
    return f"{len(failures)} item(s) failed:\n" + "\n".join(shown) + more


def _mp_context(name: str | None):
    import multiprocessing  # imported here: `zrecipe plan` never needs it

    # fork is cheap on Linux; macOS needs spawn (fork after Metal/ObjC initialisation is unsafe).
    if name is None:
        name = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(name)


def _die_with_parent(parent: int) -> None:
    """Worker initializer: on Linux, ask the kernel to kill this worker when the build process dies (a
    forked worker of a kill -9'ed build would otherwise wait on its task queue forever)."""
    if not sys.platform.startswith("linux"):
        return  # spawned workers (macOS) see their queue close when the parent dies
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the build died before the request took effect
        os._exit(1)


def run_kind(
    sk: StepKind,
    tasks: list[Task],
    store: Store,
    data: Any,
    skipped: frozenset[str],
    jobs: int,
    mp_context: str | None = None,
    advance=lambda n: None,
) -> dict[str, Outcome]:
    """Run `tasks` of one kind (in chunks over a process pool for a parallel kind with jobs > 1); returns
    {key: Outcome}. `skipped`: keys of skipped upstream nodes; `advance(n)` moves the progress bar."""
    if not sk.parallel or jobs <= 1 or len(tasks) < 2:
        ctx = RunContext(store, data, skipped, on_done=lambda t, o: advance(1))
        return run_tasks(sk.run, tasks, ctx)
    from concurrent.futures import ProcessPoolExecutor, as_completed

    batch = sk.item_batch or max(1, min(256, math.ceil(len(tasks) / (jobs * 4))))
    chunks = [tasks[i : i + batch] for i in range(0, len(tasks), batch)]
    outcomes: dict[str, Outcome] = {}
    pool = ProcessPoolExecutor(
        max_workers=min(jobs, len(chunks)),
        mp_context=_mp_context(mp_context),
        initializer=_die_with_parent,
        initargs=(os.getpid(),),
    )
    try:
        futures = {
            pool.submit(run_chunk, sk.run, chunk, str(store.root), store.fsync, data, skipped): chunk
            for chunk in chunks
        }
        for fut in as_completed(futures):
            chunk = futures[fut]
            try:
                outcomes.update(fut.result())
            except Exception as exc:  # noqa: BLE001 — a worker died (OOM, segfault): fail its chunk
                outcomes.update({t.key: Outcome(False, f"worker process failed: {exc!r}") for t in chunk})
            advance(len(chunk))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return outcomes


def execute(
    plan: Plan,
    store: Store,
    ctx: Any = None,
    *,
    jobs: int | None = None,
    progress: bool = True,
    keep_going_kinds: Iterable[str] = (),
    report_path: str | os.PathLike[str] | None = None,
    mp_context: str | None = None,
    repaired: Iterable[str] = (),
) -> BuildReport:
    """Run every stale node of `plan`, kind by kind in topological order; returns the BuildReport.

    ctx: any object, handed to steps as `RunContext.data` (must be picklable for parallel kinds).
    jobs: worker processes for `parallel` kinds (default os.cpu_count()).
    keep_going_kinds: kinds whose failed items are skipped as if their nodes said on_error="skip".
    A failed item of a node with on_error="fail" stops the build after its kind: StepFailed lists every
    failed item (its exit_code is 2 when every failure is a UserError, e.g. bad input data). Nodes that
    depend on a failed or skipped node are skipped (an optional Ref sees None instead). The build record
    and the report (when `report_path` is given) are written atomically at the end, whatever happened.
    A task that fails because a store entry it reads is damaged records the entry (discarded) in the
    StepFailed's `damaged`; `repaired` lists entries an earlier attempt discarded (for the report).
    """
    jobs = jobs or os.cpu_count() or 1
    finished = False
    keep_going = set(keep_going_kinds)
    graph = plan.graph
    t0 = time.perf_counter()
    report = BuildReport(graph.graph_id, started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), jobs=jobs)
    done: dict[str, bool] = {}  # key → ok, for stale nodes that finished (ok or not)
    bad: dict[tuple[str, str], str] = {}  # (kind, item) → "failed" | "skipped"
    failures: list[tuple[str, str, str]] = []
    damaged: list[str] = []  # keys of store entries found damaged (and discarded) while being read
    all_user = True
    pending = pending_path(store.root, graph.graph_id)
    if plan.stale_count:
        # Before any work: tell gc which keys this build is producing (it may be killed before the end).
        try:
            write_atomic(pending, "\n".join(sorted({p.key for p in plan.stale()})).encode(), fsync=False)
        except OSError as exc:
            raise os_problem(exc, "writing the build's pending list", FINISH_FIX) from exc
    bar = _progress(progress)
    try:
        if bar is not None:
            bar.start()
        for kind in plan.order:
            sk = graph.kinds[kind]
            kr = report.kinds[kind] = KindReport(total=len(plan.nodes[kind]))
            stale = [p for p in plan.nodes[kind] if p.stale]
            kr.cached = kr.total - len(stale)
            if not stale:
                continue
            k0 = time.perf_counter()
            runnable: list[PlannedNode] = []
            for p in stale:
                blocker = next(
                    (
                        i
                        for i in p.node.inputs
                        if isinstance(i, Ref) and not i.optional and (i.kind, i.item) in bad
                    ),
                    None,
                )
                if blocker is None:
                    runnable.append(p)
                else:
                    bad[(kind, p.node.item)] = "skipped"
                    kr.skipped += 1
                    why = f"upstream {blocker.kind}:{blocker.item} did not build"
                    kr.skipped_items.append({"item": p.node.item, "error": why})
            skipped_keys = frozenset(p.key for p in plan.stale() if (p.node.kind, p.node.item) in bad)
            unique: dict[str, Task] = {}
            for p in runnable:
                unique.setdefault(p.key, Task(p.node, p.key, tuple(p.inputs)))
            for p in runnable:
                kr.reasons[p.category or "stale"] = kr.reasons.get(p.category or "stale", 0) + 1
            bar_id = bar.add_task(kind, total=len(unique)) if bar is not None and unique else None
            advance = (lambda n, b=bar_id: bar.advance(b, n)) if bar_id is not None else (lambda n: None)
            outcomes = (
                run_kind(sk, list(unique.values()), store, ctx, skipped_keys, jobs, mp_context, advance)
                if unique
                else {}  # every node was blocked upstream: don't call run() (it may load a model)
            )
            for p in runnable:
                o = outcomes[p.key]
                done[p.key] = o.ok
                if o.ok:
                    kr.ran += 1
                elif (p.node.on_error == "skip" or kind in keep_going) and not o.damaged:
                    # (an item whose input was damaged is never skipped: a rebuild would train without it)
                    bad[(kind, p.node.item)] = "skipped"
                    kr.skipped += 1
                    kr.skipped_items.append({"item": p.node.item, "error": o.error})
                else:
                    bad[(kind, p.node.item)] = "failed"
                    kr.failed += 1
                    kr.failures.append({"item": p.node.item, "error": o.error})
                    failures.append((kind, p.node.item, o.error))
                    all_user = all_user and o.user_error
                    if o.damaged:
                        damaged.append(o.damaged)
            kr.seconds = time.perf_counter() - k0
            if failures:
                report.status = "failed"
                break
        finished = True
    except KeyboardInterrupt:
        report.status = "interrupted"
        raise
    except BaseException:
        report.status = "error"  # the engine or a step broke (not an item failure): a bug to report
        raise
    finally:
        if bar is not None:
            bar.stop()
        report.seconds = time.perf_counter() - t0
        report.measure_memory()
        report.repaired = sorted(set(repaired or ()) | set(damaged))
        _finish(plan, store, done, pending, report, report_path, raise_errors=finished and not failures)
    if failures:
        err = StepFailed(_failure_message(failures))
        err.failures = failures  # type: ignore[attr-defined]
        err.report = report  # type: ignore[attr-defined]
        err.damaged = damaged  # type: ignore[attr-defined]
        # Every failure came from a damaged input (now discarded): a new plan rebuilds it (build() does).
        err.only_damaged = len(damaged) == len(failures)  # type: ignore[attr-defined]
        if all_user:
            err.exit_code = 2  # bad input data (UserError in every item) → the CLI's user-error exit code
        raise err
    return report


def _finish(plan, store, done, pending, report, report_path, raise_errors: bool) -> None:
    """Write the build record and the report, and drop the pending list. When an exception is already on
    its way out (`raise_errors` False), a failure here (a full disk) must not hide it: it becomes a
    warning. Otherwise it is raised as the EnvironmentProblem naming the file."""
    problems: list[tuple[str, OSError]] = []
    for what, write in (
        ("writing the build record", lambda: _write_record(plan, store, done)),
        ("removing the pending list", lambda: pending.unlink(missing_ok=True)),
        ("writing the build report", lambda: report.write(report_path) if report_path is not None else None),
    ):
        try:
            write()
        except OSError as exc:
            problems.append((what, exc))
    if not problems:
        return
    first = os_problem(problems[0][1], problems[0][0], FINISH_FIX)
    if raise_errors:
        raise first from problems[0][1]
    warnings.warn(str(first), ZRecipeWarning, stacklevel=3)


def _write_record(plan: Plan, store: Store, done: dict[str, bool]) -> Path | None:
    """Write the graph's new record: nodes that are up to date or just built with their new entry, the
    others with their previous entry (so reasons stay informative) and their new key kept as pending."""
    prev = plan.previous
    graph = plan.graph
    if (
        prev is not None
        and plan.stale_count == 0
        and all(prev.digests.get(k) == plan.digests[k] for k in plan.order)
    ):
        return None  # a no-op build: the record on disk already says exactly this
    builder = RecordBuilder(graph.graph_id)
    for kind in plan.order:
        sk = graph.kinds[kind]
        builder.kind(kind, sk.version)
        for p in plan.nodes[kind]:
            if not p.stale or done.get(p.key):
                builder.add(kind, sk.version, p.node.item, p.key, p.node.params, p.inputs)
                continue
            builder.pending.add(p.key)
            old = prev.entry(kind, p.node.item) if prev is not None else None
            if old is not None:
                builder.add(kind, prev.version(kind), p.node.item, old.key, old.params, old.inputs)
        incomplete = any(p.stale and not done.get(p.key) for p in plan.nodes[kind])
        # Nodes that did not complete keep their old entry, so keep the old version they were built
        # with too: the next plan then still says "step version changed" for them.
        old_version = prev.version(kind) if prev is not None and incomplete else None
        builder.kinds[kind]["version"] = sk.version if old_version is None else old_version
        if incomplete:
            builder.digests[kind] = "incomplete"  # never equal to a plan digest: rewrite next time
    if prev is not None:
        for kind in graph.omitted_kinds:
            builder.copy_kind(prev, kind)
    return builder.write(store.root)


def build(
    graph: Graph,
    store: Store,
    ctx: Any = None,
    *,
    until: str | None = None,
    force: Iterable[str] = (),
    dry_run: bool = False,
    lock_timeout: float | None = 600.0,
    verify: VerifyLevel = "exists",
    on_plan: Callable[[Plan], None] | None = None,
    on_wait: Callable[[str], None] | None = None,
    **execute_kwargs: Any,
) -> tuple[Plan, BuildReport | None]:
    """Lock the store, plan `graph` (optionally `until` one kind) against its previous record — checking
    the stored inputs that stale nodes will read, so damaged ones are rebuilt first — and execute the
    plan unless `dry_run`. Returns (plan, report or None). Extra kwargs go to execute().

    A store entry that fails its hash check while a step reads it is discarded and the graph re-planned
    and run again (at most REPAIR_ATTEMPTS times), so the build ends with the bytes a clean build makes.
    `on_plan(plan)` is called after each planning (e.g. for warnings about stale items); `on_wait(text)`
    gets a line saying who holds the lock when the build has to wait for it (default: printed on stderr).
    """
    from .lock import StoreLock
    from .planner import plan as make_plan
    from .record import Record

    if until is not None:
        graph = graph.until(until)
    with StoreLock(store.root, timeout=lock_timeout, on_wait=on_wait or _print_wait):
        repaired: list[str] = []
        for attempt in range(REPAIR_ATTEMPTS + 1):
            previous = Record.load(store.root, graph.graph_id)
            the_plan = make_plan(graph, store, previous, force=force, verify=verify, check_inputs=True)
            if on_plan is not None:
                on_plan(the_plan)
            if dry_run:
                return the_plan, None
            try:
                return the_plan, execute(the_plan, store, ctx, repaired=repaired, **execute_kwargs)
            except StepFailed as exc:
                if not getattr(exc, "only_damaged", False) or attempt == REPAIR_ATTEMPTS:
                    raise
                found = sorted(set(exc.damaged))  # type: ignore[attr-defined]
                repaired.extend(found)
                one = len(found) == 1
                print(
                    f"{len(found)} store entr{'y' if one else 'ies'} failed the hash check while being read "
                    f"and {'was' if one else 'were'} discarded; rebuilding", file=sys.stderr,
                )  # fmt: skip
    raise AssertionError("unreachable")  # the loop returns or raises


def _print_wait(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
