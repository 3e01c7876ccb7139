"""Where a fresh LoRA run starts when it is not resuming one of its own checkpoints (`training_loop.start_from`).

- a LoRA file of any common convention (zrecipe, mflux/ComfyUI, diffusers/PEFT, kohya/musubi): the trained
  adapter starts from its weights instead of B = 0; step, optimiser and data order start afresh;
- another tool's training checkpoint, an mflux 0.24 training zip (`zrecipe.lora.mflux_checkpoint`): the
  run continues it — its adapter, its AdamW moments and its step (so the learning-rate schedule and the
  remaining steps continue from there); the data order continues zrecipe's own order at that step (mflux's
  does not map), and what else did not carry over is said (`StartFrom.notes`).

The start file's content hash is an input of the train key (`START_PREFIX` + hash), so a run that starts
from other weights is another run. Once the run has written a checkpoint of its own, a rebuild resumes
from that one, exactly as any run does. Only plain LoRA targets can start from a file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from zrecipe.errors import CheckpointError

START_PREFIX = "start:"


@dataclass
class StartFrom:
    """The state a run starts from: adapter tensors in zrecipe's adapter layout, the step, the flattened
    optimiser state (MLX AdamW's m / v; empty: a fresh optimiser), the loss history, and notes."""

    source: Path
    what: str  # for messages: "LoRA file" / "mflux 0.24 training checkpoint (step N)"
    adapter: dict[str, mx.array]
    step: int = 0
    optimizer: dict[str, mx.array] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    log: Callable[[str], None] | None = None  # told each note as it is made

    def note(self, text: str) -> None:
        self.notes.append(text)
        if self.log is not None:
            self.log(f"train: start_from: {text}")


def read_start(path: str | Path) -> StartFrom:
    """The start state in `path`: an mflux training checkpoint zip or a LoRA .safetensors file."""
    from zrecipe.lora.mflux_checkpoint import is_mflux_checkpoint, read_mflux_checkpoint

    path = Path(path)
    if path.suffix == ".zip":
        if not is_mflux_checkpoint(path):
            raise CheckpointError(
                f"training_loop.start_from: {path} is not an mflux training checkpoint; a zrecipe checkpoint "
                "is resumed with `zrecipe train --train-checkpoint ZIP`, not started from."
            )
        run = read_mflux_checkpoint(path)
        notes = list(run.unmapped)
        if not run.optimizer:
            notes.append("the optimiser starts afresh (its state did not map onto AdamW)")
        return StartFrom(
            path,
            f"mflux {run.mflux_version} training checkpoint (step {run.step})",
            run.adapter,
            run.step,
            run.optimizer,
            [{"step": int(h["step"]), "loss": float(h["loss"])} for h in run.loss],
            notes,
        )
    from zrecipe.export.lora_formats import export_tensors, read_lora

    lora = read_lora(path)
    unsupported = sorted(p for p, d in lora.deltas.items() if getattr(d, "KIND", "lora") != "lora")
    if unsupported:
        raise CheckpointError(
            f"training_loop.start_from: {path}: only plain LoRA weights can be trained on; "
            f"{', '.join(unsupported[:5])} hold another adapter kind."
        )
    return StartFrom(path, "LoRA file", export_tensors(lora.deltas, "zrecipe", "float32"))


def _layers(adapter: dict[str, mx.array]) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} of adapter tensors in zrecipe's layout."""
    out = {}
    for key, value in adapter.items():
        if key.endswith(".lora_A.weight"):
            path = key.removesuffix(".lora_A.weight")
            alpha = adapter.get(f"{path}.alpha")
            out[path] = (
                int(value.shape[0]),
                float(alpha.item()) if alpha is not None else float(value.shape[0]),
            )
    return out


def apply_start(start: StartFrom, model, optimizer, iterator, accumulation: int) -> int:
    """Put `start` into a freshly prepared LoRA run (its layers already wrapped by the recipe's targets, the
    optimiser initialised); returns the step the run continues from. Layers of the file the recipe does not
    train are left out and said; a layer whose rank or alpha differs from the recipe's is refused."""
    from zrecipe.lora.layers import LoRALinear, adapter_layers
    from zrecipe.training.lora import load_adapter_tensors
    from zrecipe.training.optim import flatten_state, restore_state

    where = f"training_loop.start_from: {start.source} ({start.what})"
    layers = adapter_layers(model)
    if not layers or any(not isinstance(layer, LoRALinear) for layer in layers.values()):
        raise CheckpointError(f"{where}: only plain LoRA targets (`kind: lora`) can start from a file.")
    ours = {path: (layer.rank, float(layer.alpha)) for path, layer in layers.items()}
    theirs = _layers(start.adapter)
    differ = [
        f"{p}: rank {theirs[p][0]} / alpha {theirs[p][1]:g} in the file, {ours[p][0]} / {ours[p][1]:g} in the "
        "recipe"
        for p in sorted(set(ours) & set(theirs))
        if theirs[p][0] != ours[p][0] or abs(theirs[p][1] - ours[p][1]) > 1e-6 * max(1.0, ours[p][1])
    ]
    if differ:
        raise CheckpointError(
            f"{where}: the recipe's LoRA targets do not match the file's: {'; '.join(differ[:8])}. Give the "
            "targets the same rank and alpha."
        )
    if not set(ours) & set(theirs):
        raise CheckpointError(
            f"{where}: none of its {len(theirs)} LoRA layers is one the recipe trains "
            f"(e.g. {', '.join(sorted(theirs)[:3])}); give the recipe the file's targets."
        )
    skipped = sorted(set(theirs) - set(ours))
    if skipped:
        start.note(
            f"{len(skipped)} layer(s) of the file are not trained by the recipe and were left out: "
            + ", ".join(skipped[:5])
            + (" ..." if len(skipped) > 5 else "")
        )
    fresh = sorted(set(ours) - set(theirs))
    if fresh:
        start.note(f"{len(fresh)} layer(s) the recipe trains start at B = 0 (not in the file)")
    kept = {
        k: v for k, v in start.adapter.items() if k.rsplit(".", 2)[0] in ours or k.rsplit(".", 1)[0] in ours
    }
    load_adapter_tensors(model, kept, where)
    if start.optimizer and start.step:
        # zrecipe's optimiser state for every trained tensor, with the file's moments where it has them and
        # the step set to where the run continues (one optimiser update per step).
        flat = flatten_state(optimizer)
        flat.update({k: v for k, v in start.optimizer.items() if k in flat and v.shape == flat[k].shape})
        flat["step"] = mx.array(start.step, dtype=flat["step"].dtype)
        restore_state(optimizer, flat, where)
        beta1 = float(optimizer.betas[0]) if hasattr(optimizer, "betas") else 0.9
        start.note(
            "AdamW's moments carry over; zrecipe's AdamW corrects their bias as PyTorch does (mflux's does not), "
            f"by 1/(1 − β1^t) = {1 / (1 - beta1 ** (start.step + 1)):.3f}× on the next step"
        )
    # The data order continues zrecipe's own at that step: `micro` batches drawn as an uninterrupted run
    # would have drawn them.
    micro = start.step * accumulation
    if micro:
        per_epoch = iterator.batches_per_epoch
        iterator.epoch, iterator.position = (micro - 1) // per_epoch, (micro - 1) % per_epoch + 1
        iterator.batches = iterator.epoch_batches(iterator.epoch)
    return start.step
