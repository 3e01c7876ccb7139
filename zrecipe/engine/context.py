"""What a step's `run(tasks, ctx)` sees: the tasks to do and a context to read inputs and write outputs.

A step writes each task's output inside `with ctx.output(task) as folder:`. Leaving the block normally
commits the entry atomically; an exception inside it marks that task failed (the exception is recorded and
suppressed so the step carries on with its other tasks; the executor decides afterwards whether the failure
stops the build or the item is skipped). A task for which the step wrote no output counts as failed.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputDamaged, UserError, disk_full, is_environment_error, os_problem
from .graph import Node, Ref
from .store import Store


@dataclass(frozen=True, slots=True)
class Task:
    """One stale node to run: the node, its store key and its resolved inputs (upstream keys for `Ref`
    inputs, the literal strings otherwise), aligned with `node.inputs`."""

    node: Node
    key: str
    inputs: tuple[str, ...]

    @property
    def item(self) -> str:
        return self.node.item

    @property
    def params(self) -> Any:
        return self.node.params


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a task ended: ok, or failed with an error message (`user_error`: a UserError or an OS fault,
    e.g. a corrupt image or a full disk, rather than a bug; `damaged`: the key of a store entry the task
    was about to read that failed its hash check and was discarded — rebuilding it fixes the failure)."""

    ok: bool
    error: str = ""
    user_error: bool = False
    damaged: str = ""


class RunContext:
    """Handed to `StepKind.run`. `data` is whatever the caller passed to execute(ctx=...)."""

    def __init__(
        self,
        store: Store,
        data: Any = None,
        skipped_keys: frozenset[str] = frozenset(),
        on_done: Callable[[Task, Outcome], None] | None = None,
    ):
        self.store = store
        self.data = data
        self.outcomes: dict[str, Outcome] = {}
        self._skipped = skipped_keys
        self._verified: set[str] = set()  # entries read (and hash-checked) by this run of the kind
        self._on_done = on_done

    def _finish(self, task: Task, outcome: Outcome) -> None:
        if task.key in self.outcomes and not self.outcomes[task.key].ok:
            return  # a failure recorded first (ctx.fail) wins over a later commit
        self.outcomes[task.key] = outcome
        if self._on_done is not None:
            self._on_done(task, outcome)

    @contextmanager
    def output(self, task: Task) -> Iterator[Path]:
        """Yield an empty folder for `task`'s output files; committed to the store on a clean exit."""
        try:
            with self.store.writer(task.key) as folder:
                yield folder
        except Exception as exc:  # noqa: BLE001 — recorded per item; KeyboardInterrupt still propagates
            self.fail(task, exc)
            return
        self._finish(task, Outcome(True))

    def fail(self, task: Task, error: BaseException | str) -> None:
        """Mark `task` failed without raising (e.g. a step that validates a batch up front)."""
        damaged = ""
        if isinstance(error, InputDamaged):
            damaged = error.key
        if isinstance(error, BaseException) and is_environment_error(error):
            error = os_problem(error)  # type: ignore[arg-type]
        elif isinstance(error, Exception) and not isinstance(error, (UserError, InputDamaged)):
            error = disk_full(error, self.store.root) or error  # MLX reports a full disk as RuntimeError
        if isinstance(error, BaseException):
            user = isinstance(error, UserError) or bool(damaged)  # damage is the machine's, not a bug
            text = (
                str(error) if user else "".join(traceback.format_exception_only(type(error), error)).strip()
            )
        else:
            user, text = False, str(error)
        self._finish(task, Outcome(False, text or type(error).__name__, user, damaged))

    def input_dir(self, task: Task, index: int = 0) -> Path | None:
        """Store folder of the `index`-th input of `task` (which must be a Ref), every file checked
        against the entry's manifest hashes before the step reads it (once per entry per kind's run).

        None when that input is an optional Ref whose node was skipped. Raises InputDamaged when the entry
        is missing or fails the check: a damaged entry is discarded, so the task fails ("input damaged")
        instead of building on wrong bytes, and the next plan rebuilds the entry (`build()` does so at
        once)."""
        ref = task.node.inputs[index]
        if not isinstance(ref, Ref):
            raise TypeError(f"input #{index} of {task.node.kind}:{task.item} is a literal, not a Ref")
        key = task.inputs[index]
        if key in self._skipped:
            return None
        state = "ok" if key in self._verified else self.store.verified(key)
        if state == "ok":
            self._verified.add(key)
        else:
            what = "failed its hash check and was discarded" if state == "corrupt" else "is missing"
            raise InputDamaged(
                f"input damaged: store entry {key} of {ref.kind}:{ref.item} {what}; it is rebuilt on the next "
                "run",
                key,
            )
        return self.store.path(key)

    def input_dirs(self, task: Task) -> list[Path | None]:
        """Store folders of every Ref input of `task`, in order (None for skipped optional inputs)."""
        return [self.input_dir(task, i) for i, inp in enumerate(task.node.inputs) if isinstance(inp, Ref)]

    def work_dir(self, task: Task) -> Path:
        """Persistent scratch folder for `task` (resumable intermediates; survives a killed build)."""
        return self.store.work_dir(task.key)


def run_tasks(run: Callable[..., Any], tasks: list[Task], ctx: RunContext) -> dict[str, Outcome]:
    """Call a step's run() on `tasks` and return every task's outcome.

    An exception escaping run() (e.g. a model that fails to load) fails every task not finished yet; a
    task the step never wrote counts as failed too."""
    try:
        run(tasks, ctx)
    except Exception as exc:  # noqa: BLE001 — turned into per-item failures listed in the report
        for t in tasks:
            if t.key not in ctx.outcomes:
                ctx.fail(t, exc)
    for t in tasks:
        if t.key not in ctx.outcomes:
            ctx.fail(t, f"step {t.node.kind!r} finished without writing an output for this item")
    return {t.key: ctx.outcomes[t.key] for t in tasks}


def run_chunk(
    run: Callable[..., Any],
    tasks: list[Task],
    store_root: str,
    fsync: bool,
    data: Any,
    skipped: frozenset[str],
) -> dict[str, Outcome]:
    """Worker-process entry point for parallel kinds: run one chunk against its own Store handle."""
    ctx = RunContext(Store(store_root, fsync=fsync), data, skipped)
    return run_tasks(run, tasks, ctx)
