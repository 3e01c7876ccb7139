"""The build on several MLX ranks (`mlx.launch ... zrecipe build`, or `zrecipe build -n N`).

Every rank builds the same graph and plans it against the same (shared) store; the ranks check that they
agree on the plan — every node's key and status — before any work. Then every rank runs the engine's
executor on that plan with each step kind's `run` wrapped, as its row of the step table (kinds.py) says:

    sharded      rank r runs every W-th batch of stale items (the batches one process would form, so the
                 entries are byte-identical) and writes its entries into the shared store (atomic renames);
    collective   every rank runs it (training: each rank trains its slice of each global batch, rank 0
                 writes the checkpoints and the store entry);
    rank0        rank 0 alone; the others wait (sleeping, not spinning).

After each kind the ranks exchange their items' outcomes (one all_gather), so every rank's executor sees
the same results and takes the same decisions (skip, stop, the build record it writes is identical).

Locking: only rank 0 takes the store's flock, for the whole build. Ranks > 0 never take it (a second
process would wait for rank 0 forever); they work under rank 0's lock, fenced by collectives: nobody plans
before rank 0 holds it and rank 0 releases it after every rank's last store access.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from zrecipe.errors import StepFailed

FLAGS = ".dist"  # folder in the store for the shared-store check and rank 0's "done" flags
POLL_S = 0.2


class RankFailed(SystemExit):
    """A rank failed where its peers may be inside a collective: exit the process now, so their
    collectives fail at once ("connection lost") instead of waiting forever; mlx.launch stops the rest."""


def build_distributed(recipe, cache_dir: Path, until, force, jobs, options: dict, report_path, w):
    """Plan and run `recipe` on every rank of world `w` (`options`: build_recipe's runtime options);
    returns (plan, report, published or None)."""
    from zrecipe.engine import Record, StatCache, Store, StoreLock, execute
    from zrecipe.engine import plan as make_plan
    from zrecipe.pipeline import kinds
    from zrecipe.pipeline.captions import CAPTION_PRODUCERS
    from zrecipe.pipeline.graph import build_graph
    from zrecipe.pipeline.publish import publish
    from zrecipe.training import distributed as dist

    store = Store(cache_dir)
    with dist.phase("reading the recipe and datasets", w):
        # Ranks > 0 keep their stat cache on local disk: SQLite on a network share is unreliable.
        sc = None if w.main else StatCache(_local_stat_cache(cache_dir, w.rank))
        try:
            graph, data = build_graph(recipe, cache_dir, until=until, stat_cache=sc)
        finally:
            if sc is not None:
                sc.close()
        data.options.update(options, progress=options["progress"] and w.main)
    progress = options["progress"]
    lock = StoreLock(cache_dir, timeout=600) if w.main else None
    with dist.phase("locking the store", w):
        if lock is not None:
            lock.acquire()
    token = None
    try:
        token = _check_shared_store(store, w)
        with dist.phase("planning", w):
            the_plan = make_plan(graph, store, Record.load(store.root, graph.graph_id), force=force,
                                 verify="exists", check_inputs=True)  # fmt: skip
        _agree_on_plan(the_plan, recipe, w)
        producers = {p.kind.name: p.kind for p in CAPTION_PRODUCERS.values()}
        rows = {name: kinds.lookup(name, producers) for name in the_plan.graph.kinds}
        if any(p.stale for name, row in rows.items() if row.models for p in the_plan.nodes[name]):
            _resolve_model_first(data, w)
        flags = store.root / FLAGS / token
        for name, kind in the_plan.graph.kinds.items():
            run = RankRun(kind, rows[name], w, jobs or os.cpu_count() or 1, flags, progress)
            the_plan.graph.kinds[name] = replace(kind, run=run, parallel=False)
        try:
            report = execute(the_plan, store, data, jobs=jobs, progress=progress and w.main,
                             report_path=report_path if w.main else None)  # fmt: skip
        except StepFailed as exc:
            exc.all_ranks = True  # type: ignore[attr-defined]  # same outcomes everywhere: same failure
            raise
        with dist.phase("publishing the outputs", w):  # also the barrier before rank 0 unlocks
            published = publish(the_plan, store, recipe) if w.main else None
        return the_plan, report, published
    finally:
        if lock is not None:
            _remove_flags(store.root / FLAGS, token)
            lock.release()


def _local_stat_cache(cache_dir: Path, rank: int) -> Path:
    import xxhash

    name = xxhash.xxh64_hexdigest(str(Path(cache_dir).resolve()).encode())
    folder = Path(tempfile.gettempdir()) / "zrecipe-statcache"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-rank{rank}.sqlite"


def _check_shared_store(store, w) -> str:
    """Rank 0 writes a random token into the store; every rank must read it back (a shared store)."""
    from zrecipe.engine.store import write_atomic
    from zrecipe.training import distributed as dist

    token = dist.gather_bytes(secrets.token_hex(8).encode(), w)[0].decode()
    path = store.root / FLAGS / token / "token"
    with dist.phase("checking that the store is shared", w):
        if w.main:
            write_atomic(path, token.encode(), fsync=False)
    try:
        seen = path.read_text() == token
    except OSError:
        seen = False
    status = dist.gather_json({"seen": seen, "host": socket.gethostname()}, w)
    blind = [f"rank {r} on {s['host']}" for r, s in enumerate(status) if not s["seen"]]
    if blind:
        raise dist.DistributedError(
            f"{', '.join(blind)} cannot see the store {store.root} that rank 0 writes to. A multi-machine "
            "build needs one store on a shared filesystem (the same folder on every machine): put `cache:` "
            "in the recipe or --cache on a shared mount."
        )
    return token


def _remove_flags(folder: Path, token: str | None) -> None:
    import shutil

    if token:
        shutil.rmtree(folder / token, ignore_errors=True)
    try:
        folder.rmdir()  # only when no other build's flags are left
    except OSError:
        pass


def _agree_on_plan(plan, recipe, w) -> None:
    """Every rank must plan exactly the same nodes, keys and statuses; say what differs when not."""
    import xxhash

    from zrecipe.recipe import recipe_hash
    from zrecipe.training import distributed as dist

    h = xxhash.xxh3_128()
    for kind in plan.order:
        for p in plan.nodes[kind]:
            h.update(f"{kind}\t{p.node.item}\t{p.key}\t{p.status}\n".encode())
    counts = {k: sum(p.stale for p in plan.nodes[k]) for k in plan.order}
    views = dist.gather_json({"plan": h.hexdigest(), "recipe": recipe_hash(recipe), "stale": counts}, w)
    differ = [r for r, v in enumerate(views) if v["plan"] != views[0]["plan"]]
    if not differ:
        return
    same_recipe = all(views[r]["recipe"] == views[0]["recipe"] for r in differ)
    why = (
        "The recipes are the same, so the dataset files, the model files or the store differ between "
        "machines: sync the data and model folders and use one shared store."
        if same_recipe
        else "The ranks read different recipes: every machine needs the same recipe file."
    )
    stale = "; ".join(f"rank {r} stale {views[r]['stale']}" for r in [0, *differ][:3])
    raise dist.DistributedError(
        f"the ranks disagree about the build plan (ranks {differ} differ from rank 0). {why} ({stale})"
    )


def _resolve_model_first(data, w) -> None:
    """Rank 0 resolves (for `tiny`: creates) the model before the others look, so they never race."""
    from zrecipe.pipeline.identity import resolve_model_path
    from zrecipe.training import distributed as dist

    with dist.phase("resolving the model", w):
        if w.main:
            resolve_model_path(data)
    if not w.main:
        resolve_model_path(data)


class RankRun:
    """A step kind's `run` on one rank of a distributed build (see the module docstring); `row` is the
    kind's table row (kinds.Kind): how it distributes and which batches its run computes together."""

    def __init__(self, kind, row, w, jobs: int, flags: Path, progress: bool):
        self.kind, self.row, self.w, self.jobs, self.flags, self.progress = (
            kind,
            row,
            w,
            jobs,
            flags,
            progress,
        )

    def __call__(self, tasks: list, ctx) -> None:
        try:
            if self.row.distribution == "collective":
                self._collective(tasks, ctx)
                return
            if self.row.distribution == "sharded":
                # Whole batches, in the executor's order (the same on every rank), round robin.
                mine = self.row.batches(tasks, ctx)[self.w.rank :: self.w.size]
                own = [t for group in mine for t in group]
            else:
                own = list(tasks) if self.w.main else []
            t0 = time.perf_counter()
            if own:
                self._run_local(own, ctx)
            if self.row.distribution == "rank0":
                self._wait_for_main()
            self._share(tasks, own, ctx, time.perf_counter() - t0)
        except (RankFailed, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 — an error outside the step itself: peers may be waiting
            raise RankFailed(f"rank {self.w.rank}: {self.kind.name}: {type(exc).__name__}: {exc}") from exc

    def _run_local(self, tasks: list, ctx) -> None:
        """This rank's share, run as the executor runs a kind (a process pool for parallel kinds)."""
        from zrecipe.engine.executor import run_kind

        skipped = getattr(ctx, "_skipped", frozenset())  # no public accessor; only Ref inputs need it
        ctx.outcomes.update(run_kind(self.kind, tasks, ctx.store, ctx.data, skipped, self.jobs))

    def _collective(self, tasks: list, ctx) -> None:
        """Every rank runs the step (it is collective inside, e.g. training); rank 0's outcome counts."""
        try:
            self.kind.run(tasks, ctx)
        except Exception as exc:
            if not getattr(exc, "all_ranks", False):
                raise  # one rank failed mid-collective: __call__ turns it into RankFailed
            if self.w.main:
                for t in tasks:
                    ctx.fail(t, exc)
        self._share(tasks, list(tasks) if self.w.main else [], ctx, 0.0)

    def _wait_for_main(self) -> None:
        """Ranks > 0 sleep until rank 0 has run a rank-0-only kind (a collective would busy-wait)."""
        flag = self.flags / f"{self.kind.name}.done"
        if self.w.main:
            from zrecipe.engine.store import write_atomic

            write_atomic(flag, b"", fsync=False)
            return
        while not flag.exists():
            time.sleep(POLL_S)

    def _share(self, tasks: list, own: list, ctx, seconds: float) -> None:
        """Exchange the outcomes of every rank's tasks, so each rank's executor sees all of them."""
        from zrecipe.engine.context import Outcome
        from zrecipe.training import distributed as dist

        mine = {t.key: list(_outcome(ctx, t)) for t in own}
        views = dist.gather_json({"outcomes": mine, "seconds": seconds}, self.w)
        everyone: dict[str, list] = {}
        for view in views:
            everyone.update(view["outcomes"])
        owned = {t.key for t in own}
        for t in tasks:
            if t.key in owned:
                continue
            ok, error, user = everyone.get(t.key, (False, "no rank ran this item", False))
            if ok and not ctx.store.has(t.key):
                ok, error = False, f"rank-built entry {t.key} is not visible here (is the store shared?)"
            ctx.outcomes[t.key] = Outcome(bool(ok), error, bool(user))
        if self.row.distribution == "sharded" and self.progress and self.w.main and tasks:
            _print_rates(self.kind.name, views)


def _outcome(ctx, task) -> tuple[bool, str, bool]:
    o = ctx.outcomes.get(task.key)
    if o is None:
        return False, f"step {task.node.kind!r} finished without writing an output for this item", False
    return o.ok, o.error, o.user_error


def _print_rates(kind: str, views: list[dict[str, Any]]) -> None:
    """Rank 0's line after a sharded kind: every rank's items and items/s."""
    parts = []
    for r, v in enumerate(views):
        n, s = len(v["outcomes"]), v["seconds"]
        parts.append(f"rank {r} {n} in {s:.1f} s ({n / s if s > 0 else 0.0:.1f}/s)")
    total = sum(len(v["outcomes"]) for v in views)
    print(f"{kind}: {total} items on {len(views)} ranks: " + ", ".join(parts), file=sys.stderr, flush=True)
