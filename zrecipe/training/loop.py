"""The training loop, top to bottom: prepare, resume, step, report, checkpoint, finish.

The pieces, each with one job: the model family's objective (batch preparation and loss,
`objective.Objective`), the compiled step (`step.make_step`), the optimiser (`optim.make_optimizer`), the
data order (`data.BatchIterator`), the files (`checkpointer.Checkpointer`) and the observers
(`callbacks`: progress bar, stop monitor; and those the settings ask for: the EMA of the weights,
`ema.ExponentialMovingAverage`, and TensorBoard event files, `callbacks.TensorBoardLogger`).

Everything random in a step is a pure function of (seed, step, micro-batch), and a checkpoint holds the
adapter, the optimiser state (with the step counter the learning-rate schedule reads) and the data order:
N straight steps and N/2 + resume + N/2 give byte-identical tensors.

Under `mlx.launch` (see distributed.py) every rank walks the same global batches and takes its slice;
the objective draws its randomness for the whole global batch and slices it too, so W ranks × B/W items
train exactly what one process with B items trains (up to float rounding), and gradients are summed
across ranks inside the compiled step. Rank 0 writes every file.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn

from zrecipe.backend import resolve_dtype
from zrecipe.errors import RecipeError
from zrecipe.training import distributed as dist
from zrecipe.training.callbacks import (
    Callbacks,
    StepReport,
    TensorBoardLogger,
    TrainingCallback,
    TrainState,
    default_callbacks,
)
from zrecipe.training.checkpointer import Checkpointer, RunInfo
from zrecipe.training.data import BatchIterator, Example
from zrecipe.training.ema import ExponentialMovingAverage
from zrecipe.training.lora import apply_lora, trainable_parameter_count
from zrecipe.training.objective import Objective
from zrecipe.training.optim import make_optimizer
from zrecipe.training.settings import TrainSettings, total_steps
from zrecipe.training.step import make_step

__all__ = ["RunInfo", "TrainResult", "TrainSettings", "enable_gradient_checkpointing", "train"]


@dataclass
class TrainResult:
    step: int
    total_steps: int
    final_path: Path | None  # the final adapter / transformer (None when stopped early)
    checkpoint: Path | None  # the last checkpoint written
    stopped: str | None  # why training stopped early, None when it ran to the end
    peak_memory_bytes: int
    trainable_parameters: int
    lora_paths: list[str]
    history: list[dict[str, Any]]
    world_size: int = 1


def train(
    model: nn.Module,
    examples: Sequence[Example],
    objective: Objective,
    settings: TrainSettings,
    output_path: str | Path,
    *,
    run: RunInfo | None = None,
    resume_from: str | Path | None = None,
    force: bool = False,
    callbacks: Sequence[TrainingCallback] | None = None,
    start=None,
) -> TrainResult:
    """Train `model` (base weights) on pre-computed `examples` with a model family's `objective`.

    LoRA mode swaps in adapters at `settings.lora_targets`; full mode trains every parameter. Files go to
    `output_path` (checkpoint zips, loss.json / loss.png, the final adapter or transformer; see
    Checkpointer); `run` says what they record and guards resumes. `resume_from` continues a checkpoint
    bit-exactly (`force`: even over a changed dataset); without it, a `start` (training.start.StartFrom)
    seeds the adapter, optimiser, step and history. `callbacks` watch the run (default: stop on
    SIGINT / SIGTERM with a checkpoint, and a progress bar); when one asks to stop, training checkpoints
    and returns with `stopped` set. What the settings ask for is added to them: the EMA of the weights
    (`settings.ema`) and TensorBoard event files in `output_path/tensorboard` (`settings.tensorboard`). Under a distributed launcher every rank calls train() with the same
    arguments (checked) and trains its slice of each global batch; only rank 0 writes files, and all
    ranks return after they exist.
    """
    w = dist.world()
    with dist.phase("preparing training", w):  # a failure on one rank stops every rank
        _check_batch(settings, w)
        ema = ExponentialMovingAverage(settings.ema) if settings.ema is not None else None
        logger = (
            TensorBoardLogger(Path(output_path).expanduser() / "tensorboard")
            if settings.tensorboard
            else None
        )
        saver = Checkpointer(output_path, settings, run or RunInfo(), examples, w, ema)
        checkpoint = saver.read(resume_from, force)  # verified before the model is touched
        lora_paths = prepare_model(model, settings, objective)
        iterator = BatchIterator(examples, settings.batch_size, settings.seed)
        steps_total = total_steps(settings, iterator.batches_per_epoch)
        optimizer = make_optimizer(settings.optimizer, steps_total)
        optimizer.init(model.trainable_parameters())
        step = saver.restore(checkpoint, model, optimizer, iterator, start)
    _agree_on_run(settings, saver, step, steps_total, w)
    trainable = trainable_parameter_count(model)
    saver.start(steps_total, trainable)
    train_step = make_step(model, optimizer, objective, examples, settings, w, grad_norm=logger is not None)
    state = TrainState(model, optimizer, w, step, steps_total, saver.history)
    chosen = default_callbacks() if callbacks is None else list(callbacks)
    watchers = Callbacks([*chosen, *(cb for cb in (ema, logger) if cb is not None)])

    mx.reset_peak_memory()
    stopped: str | None = None
    with watchers.running(state):
        while state.step < steps_total and stopped is None:
            t0 = time.perf_counter()
            losses, items, grad_norm = train_step(iterator, state.step)
            state.step += 1
            stopped, rates = watchers.stop_reason(state), []
            if w.distributed:  # every rank learns every loss, speed and stop request
                rate = items / (time.perf_counter() - t0)
                losses, rates, stopped = dist.step_stats(losses, rate, stopped, w)
            lr = optimizer.learning_rate
            lr = float(lr.item() if hasattr(lr, "item") else lr)
            seconds = time.perf_counter() - t0
            report = StepReport(state.step, sum(losses) / len(losses), lr, seconds, rates, grad_norm)
            saver.history.append(report.record())
            watchers.on_step(state, report)
            if settings.low_ram:
                mx.clear_cache()
            if saver.due(state.step, steps_total) or stopped:
                saver.save(state.step, model, optimizer, iterator)
    final_path = None if stopped else saver.finish(state.step, model, optimizer, iterator)
    dist.barrier(w)  # ranks > 0 return once rank 0's checkpoint and final files exist
    return TrainResult(
        step=state.step,
        total_steps=steps_total,
        final_path=final_path,
        checkpoint=saver.last,
        stopped=stopped,
        peak_memory_bytes=int(mx.get_peak_memory()),
        trainable_parameters=trainable,
        lora_paths=lora_paths,
        history=saver.history,
        world_size=w.size,
    )


def _check_batch(settings: TrainSettings, w: dist.World) -> None:
    if int(settings.gradient_accumulation_steps) < 1:
        raise RecipeError("training_loop.gradient_accumulation_steps must be at least 1.")
    if settings.batch_size % w.size:
        raise RecipeError(
            f"training_loop.batch_size: the global batch of {settings.batch_size} does not split evenly "
            f"over {w.size} ranks; use a multiple of {w.size} (each rank trains batch_size / ranks "
            "items of every batch)."
        )


def _agree_on_run(settings: TrainSettings, saver: Checkpointer, step: int, steps_total: int, w) -> None:
    """Every rank must train the same run (the first collective after preparing); say when a checkpoint
    of another world size resumes."""
    if w.distributed:
        identity = saver.run.model_identity
        summary = dist.run_summary(settings, saver.fingerprint, identity, step, steps_total)
        hint = "Every rank needs the same recipe, data, model and checkpoints (and an explicit batch_size: "
        dist.agree("the training run", summary, w, hint + "`auto` follows each machine's memory).")
    if saver.resumed is not None and w.main:
        dist.note_world_change(int(saver.resumed.meta.get("world_size", 1)), w.size)


def prepare_model(model: nn.Module, settings: TrainSettings, objective: Objective) -> list[str]:
    """Compute dtype, LoRA swap (or unfreeze for full fine-tuning), gradient checkpointing; returns the
    LoRA module paths."""
    dtype = resolve_dtype(settings.compute_dtype)  # `auto`: fp32 on the CPU, bf16 on a GPU
    if dtype != mx.float32:
        model.set_dtype(dtype)  # before the LoRA swap: adapters stay float32 (their master copy)
    # The seed makes the LoRA A initialisation (the only random draw outside the step) reproducible.
    mx.random.seed(settings.seed)
    if settings.mode == "lora":
        if not settings.lora_targets:
            raise RecipeError("mode lora needs LoRA targets (lora_layers or lora:).")
        paths = apply_lora(model, settings.lora_targets)
    elif settings.mode == "full":
        model.unfreeze()
        paths = []
    else:
        raise RecipeError(f"mode: {settings.mode!r} is not one of lora, full.")
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(objective.checkpoint_blocks(model))
    return paths


def enable_gradient_checkpointing(blocks: Iterable[nn.Module]) -> int:
    """Recompute each block's activations in the backward pass (`mx.checkpoint`): memory per block
    instead of per network, for ~1/3 more compute. Patches each block instance's class only."""
    count = 0
    for block in blocks:
        cls = type(block)
        if getattr(cls, "_zrecipe_checkpointed", False):
            continue
        call = cls.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            def inner(params, *args, **kwargs):
                self.update(params)
                return _call(self, *args, **kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(
            cls.__name__, (cls,), {"__call__": checkpointed, "_zrecipe_checkpointed": True}
        )
        count += 1
    return count
