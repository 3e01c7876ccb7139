"""An exponential moving average (EMA) of the trained weights, kept beside the run.

`ExponentialMovingAverage` is a training callback: after each optimiser step s (1-based) it keeps

    shadow = weights                                  for s ≤ start_step (a copy: the average starts there)
    shadow ← decay·shadow + (1 − decay)·weights      every `every` steps after start_step

in float32 (`torch.optim.swa_utils.AveragedModel` with `get_ema_avg_fn(decay)`, updated at start_step and
every `every` steps after it). It only observes: the trained weights are the same bytes with or without it.

Checkpoints keep the shadow in optimizer.safetensors under `ema/` in the layout of adapter.safetensors (the
LoRA tensors, or the transformer's for full fine-tuning), so the zip keeps its six members, a resume
continues the average bit for bit, and a checkpoint's EMA weights are a LoRA file without the model
(`ema_weights`). The run's final weights file holds the trained weights; the EMA weights go beside it
(`adapter_ema.safetensors` / `transformer_ema.safetensors`), for samples and exports that ask for them.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from zrecipe.training.callbacks import StepReport, TrainingCallback, TrainState

PREFIX = "ema/"  # the shadow's keys in optimizer.safetensors
METADATA_KEY = "ema"  # optimizer.safetensors metadata: the EMA settings (json), absent without EMA
SHADOW_BYTES_PER_PARAMETER = 4  # the shadow is float32 whatever the parameters' dtype (memory model)


def ema_name(final_name: str) -> str:
    """`adapter.safetensors` → `adapter_ema.safetensors` (the EMA weights beside the final weights)."""
    stem, _, suffix = final_name.rpartition(".")
    return f"{stem}_ema.{suffix}"


def settings_metadata(spec: Any) -> str:
    """The EMA settings as recorded with the checkpoint state."""
    return json.dumps({"decay": spec.decay, "start_step": spec.start_step, "every": spec.every})


class ExponentialMovingAverage(TrainingCallback):
    """The EMA of the trainable parameters (see the module docstring); `spec` has decay, start_step and
    every (`zrecipe.recipe.Ema`). Rank 0 keeps it (the only rank that writes checkpoints)."""

    def __init__(self, spec: Any):
        self.spec = spec
        self.shadow: dict[str, mx.array] | None = None

    def on_train_begin(self, state: TrainState) -> None:
        if self.shadow is None and state.world.main:  # a fresh run (a resumed one was given its shadow)
            self.shadow = _copy(state.model)

    def on_step(self, state: TrainState, report: StepReport) -> None:
        if not state.world.main:
            return
        if report.step <= self.spec.start_step:
            self.shadow = _copy(state.model)
        elif (report.step - self.spec.start_step) % self.spec.every == 0:
            decay = self.spec.decay
            weights = dict(tree_flatten(state.model.trainable_parameters()))
            self.shadow = {
                k: decay * v + (1 - decay) * weights[k].astype(mx.float32) for k, v in self.shadow.items()
            }
        mx.eval(self.shadow)

    @contextlib.contextmanager
    def swapped_in(self, model: Any) -> Iterator[Any]:
        """The model with the EMA weights in place of the trained ones, restored on the way out."""
        trained = tree_flatten(model.trainable_parameters())
        model.update(tree_unflatten(list(self.shadow.items())))
        try:
            yield model
        finally:
            model.update(tree_unflatten(trained))

    def take_from(self, model: Any) -> None:
        """Make the model's current trainable parameters the shadow (restoring a checkpoint's EMA)."""
        self.shadow = _copy(model)


def _copy(model: Any) -> dict[str, mx.array]:
    shadow = {k: v.astype(mx.float32) for k, v in tree_flatten(model.trainable_parameters())}
    mx.eval(shadow)
    return shadow


def split_state(flat: dict[str, mx.array]) -> tuple[dict[str, mx.array], dict[str, mx.array]]:
    """(optimiser state, EMA weights in the weights-file layout) of an optimizer.safetensors."""
    ema = {k[len(PREFIX) :]: v for k, v in flat.items() if k.startswith(PREFIX)}
    return {k: v for k, v in flat.items() if not k.startswith(PREFIX)}, ema


def ema_weights(checkpoint: Any) -> tuple[dict[str, mx.array], dict[str, str]] | None:
    """(tensors, metadata) of a checkpoint's EMA weights as a weights file (the layout and metadata of its
    adapter.safetensors, marked `ema`), or None when the run kept no EMA."""
    _, tensors = split_state(checkpoint.optimizer)
    if not tensors:
        return None
    settings = checkpoint.optimizer_metadata.get(METADATA_KEY, "{}")
    return tensors, {**checkpoint.adapter_metadata, "ema": settings}
