"""Training callbacks: what watches a run (progress, stop requests, TensorBoard, EMA, validation).

`train()` calls every callback's hooks in list order (mlx-lm's `TrainingCallback`, plus a stop vote):

    on_train_begin(state)        before the first step (install handlers, open files, draw a bar)
    stop_reason(state)           once per step, before the ranks agree: a reason to stop after it, or None
    on_step(state, report)       after each optimiser step, on every rank (`state.world.main` to write)
    on_train_end(state)          always, also after an error (in reverse order): restore, close

A stop reason from any callback on any rank stops every rank after the same step, with a checkpoint
(`distributed.step_stats`). Callbacks only observe: the model, optimiser and data order are the loop's,
so a run trains the same bytes with or without them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zrecipe.errors import UserError


@dataclass
class TrainState:
    """The run as callbacks see it; `step` is the number of optimiser steps done so far (in `stop_reason`
    and `on_step`: including the one just run)."""

    model: Any
    optimizer: Any
    world: Any  # distributed.World
    step: int
    total_steps: int
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class StepReport:
    """One optimiser step: its number, mean loss over the micro-batches (global), learning rate, seconds,
    every rank's items/s (empty on a single process), and the global gradient norm before clipping (None
    when the run neither clips nor logs it)."""

    step: int
    loss: float
    learning_rate: float
    seconds: float
    rank_rates: Sequence[float] = ()
    grad_norm: float | None = None

    def record(self) -> dict[str, Any]:
        """The step's entry in loss.json."""
        out = {"step": self.step, "loss": self.loss, "lr": self.learning_rate, "time": self.seconds}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        return out


class TrainingCallback:
    """Base class with every hook a no-op; override the ones you need."""

    def on_train_begin(self, state: TrainState) -> None:
        pass

    def stop_reason(self, state: TrainState) -> str | None:
        return None

    def on_step(self, state: TrainState, report: StepReport) -> None:
        pass

    def on_train_end(self, state: TrainState) -> None:
        pass


class Callbacks:
    """A list of callbacks called as one."""

    def __init__(self, callbacks: Sequence[TrainingCallback]):
        self.callbacks = list(callbacks)

    def stop_reason(self, state: TrainState) -> str | None:
        reasons = [cb.stop_reason(state) for cb in self.callbacks]  # ask every one (battery checks count)
        return next((r for r in reasons if r), None)

    def on_step(self, state: TrainState, report: StepReport) -> None:
        for cb in self.callbacks:
            cb.on_step(state, report)

    @contextlib.contextmanager
    def running(self, state: TrainState) -> Iterator[Callbacks]:
        """on_train_begin now; on_train_end on the way out (errors too) for every callback that began."""
        begun: list[TrainingCallback] = []
        try:
            for cb in self.callbacks:
                cb.on_train_begin(state)
                begun.append(cb)
            yield self
        finally:
            for cb in reversed(begun):
                cb.on_train_end(state)


class ProgressBar(TrainingCallback):
    """Rank 0's progress line (step, loss, smoothed loss, it/s, ETA, every rank's items/s)."""

    def __init__(self, every: int = 10):
        self.every = every
        self.bar: Any = None

    def on_train_begin(self, state: TrainState) -> None:
        from zrecipe.training.distributed import RankProgress

        self.bar = RankProgress(
            state.total_steps, start=state.step, every=self.every, enabled=state.world.main
        )

    def on_step(self, state: TrainState, report: StepReport) -> None:
        self.bar.update_ranks(report.step, report.loss, report.rank_rates)

    def on_train_end(self, state: TrainState) -> None:
        self.bar.close()


def require_tensorboard() -> None:
    """UserError (exit 2) unless tensorboardX can be imported."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "training_loop.tensorboard: true needs the tensorboardX package, which is not installed "
            f"({exc}). Install it with `pip install 'zrecipe[tensorboard]'` (or `pip install tensorboardX`), "
            "or set tensorboard: false."
        ) from None


class TensorBoardLogger(TrainingCallback):
    """TensorBoard event files in `log_dir`, written by rank 0 with tensorboardX: `train/loss`,
    `train/learning_rate` and `train/grad_norm` (before clipping) at every optimiser step. A resumed run
    starts its file with a purge at its first step, so TensorBoard drops what an interrupted run logged
    after the checkpoint it resumed from."""

    def __init__(self, log_dir: str | Path):
        require_tensorboard()  # while preparing: a missing package stops the run before it trains
        self.log_dir = Path(log_dir)
        self.writer: Any = None

    def on_train_begin(self, state: TrainState) -> None:
        if not state.world.main:
            return
        from tensorboardX import SummaryWriter

        # Its file name has the second it opened in: a resumed run in the same second needs its own file.
        suffix = f".from-step-{state.step}.{time.time_ns()}"
        purge = state.step + 1 if state.step else None
        self.writer = SummaryWriter(str(self.log_dir), purge_step=purge, filename_suffix=suffix)

    def on_step(self, state: TrainState, report: StepReport) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("train/loss", report.loss, report.step)
        self.writer.add_scalar("train/learning_rate", report.learning_rate, report.step)
        if report.grad_norm is not None:
            self.writer.add_scalar("train/grad_norm", report.grad_norm, report.step)

    def on_train_end(self, state: TrainState) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def default_callbacks(progress: bool = True, battery_limit: int | None = None) -> list[TrainingCallback]:
    """What `zrecipe build` / `zrecipe train` run with: Ctrl-C / SIGTERM / battery stop, and the progress bar."""
    from zrecipe.training.stop import StopMonitor

    return [StopMonitor(battery_limit), *([ProgressBar()] if progress else [])]
