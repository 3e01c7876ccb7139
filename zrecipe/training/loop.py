"""The training loop: one compiled step with captured state (mlx-lm), checkpoints, bit-exact resume.

Everything random in a step is a pure function of (seed, step, micro-batch): the σ/noise PRNG key, caption
dropout and the data order (per epoch). Together with the optimiser state (which holds the step counter the
learning-rate schedule reads) and the adapter, a checkpoint therefore pins the rest of the run exactly:
N straight steps and N/2 + resume + N/2 give byte-identical tensors.

Under `mlx.launch` (see distributed.py) every rank walks the same global batches and takes its slice;
σ, noise and caption dropout are drawn for the whole global batch and sliced too, so W ranks × B/W items
train exactly what one process with B items trains (up to float rounding), and gradients are summed
across ranks inside the compiled step. Rank 0 writes every file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map

from zrecipe.backend import resolve_dtype
from zrecipe.errors import CheckpointError, RecipeError
from zrecipe.lora.layers import adapter_dropout
from zrecipe.training import checkpoint as ckpt
from zrecipe.training import distributed as dist
from zrecipe.training.data import BatchIterator, Example, collate, dataset_fingerprint
from zrecipe.training.lora import (
    adapter_metadata,
    adapter_tensors,
    apply_lora,
    load_adapter_tensors,
    save_adapter,
    trainable_parameter_count,
)
from zrecipe.training.loss import caption_dropout_mask, flow_matching_loss, sample_sigmas, step_key
from zrecipe.training.optim import flatten_state, make_optimizer, restore_state
from zrecipe.training.progress import plot_loss, write_loss_log
from zrecipe.training.settings import TrainSettings, total_steps
from zrecipe.training.stop import StopMonitor

BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")


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


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass (`mx.checkpoint`): memory per
    block instead of per network, for ~1/3 more compute. Patches each block instance's class only."""
    count = 0
    for group in BLOCK_GROUPS:
        for block in getattr(model, group, []) or []:
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


def _prepare(model, settings: TrainSettings) -> tuple[list[str], mx.Dtype]:
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
        enable_gradient_checkpointing(model)
    return paths, dtype


def _weights_for_save(model, settings: TrainSettings, meta: dict[str, Any]):
    if settings.mode == "lora":
        return adapter_tensors(model), adapter_metadata(model, meta)
    from zrecipe import __version__

    tensors = dict(tree_flatten(model.parameters()))
    return tensors, {
        "format": "zrecipe-full",
        "zrecipe_version": __version__,
        **{k: str(v) for k, v in meta.items()},
    }


def _apply_checkpoint(model, optimizer, iterator, settings, checkpoint, same_data: bool) -> None:
    """Everything was verified by read_checkpoint; now apply it (model, optimiser, data order)."""
    where = str(checkpoint.path)
    if settings.mode == "lora":
        load_adapter_tensors(model, checkpoint.adapter, where)
    else:
        try:
            model.load_weights(list(checkpoint.adapter.items()), strict=True)
        except ValueError as exc:
            raise CheckpointError(f"{where}: transformer weights do not fit this model ({exc}).") from exc
    restore_state(optimizer, checkpoint.optimizer, where)
    if same_data:
        iterator.restore(checkpoint.iterator, where)
    else:  # --force over a changed dataset: keep the epoch count, start that epoch's (new) order afresh
        iterator.epoch = int(checkpoint.iterator.get("epoch", 0))
        iterator.position, iterator.batches = 0, iterator.epoch_batches(iterator.epoch)


def train(
    model: nn.Module,
    examples: Sequence[Example],
    empty_embedding: Any,
    settings: TrainSettings,
    output_path: str | Path,
    *,
    config: dict[str, Any] | None = None,
    model_identity: str = "",
    train_step_key: str = "",
    resume_from: str | Path | None = None,
    force: bool = False,
    battery_limit: int | None = None,
    progress: bool = True,
    stop_monitor: StopMonitor | None = None,
    adapter_metadata_extra: dict[str, Any] | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` (the Z-Image transformer, base weights) on pre-computed `examples`.

    LoRA mode swaps in adapters at `settings.lora_targets`; full mode trains every transformer parameter.
    Writes `<output_path>/checkpoints/<step:07d>_checkpoint.zip` every `checkpoint_frequency` steps and at
    the end, `loss.json` / `loss.png`, and the final `adapter.safetensors` (LoRA) or
    `transformer.safetensors` (full) in `output_path`. `resume_from` continues a checkpoint bit-exactly.
    On SIGINT/SIGTERM or the battery limit it writes a checkpoint and returns with `stopped` set.
    `model_identity` / the examples' fingerprint guard resumes (`force` skips the dataset check);
    `checkpoint_meta` adds fields to checkpoint.json, `adapter_metadata_extra` to the adapter metadata.
    Under a distributed launcher every rank calls train() with the same arguments (checked) and trains
    its slice of each global batch; only rank 0 writes files, and all ranks return after they exist.
    """
    output_path = Path(output_path).expanduser()
    w = dist.world()
    accum = int(settings.gradient_accumulation_steps)
    with dist.phase("preparing training", w):  # a failure on one rank stops every rank
        if accum < 1:
            raise RecipeError("training_loop.gradient_accumulation_steps must be at least 1.")
        if settings.batch_size % w.size:
            raise RecipeError(
                f"training_loop.batch_size: the global batch of {settings.batch_size} does not split evenly "
                f"over {w.size} ranks; use a multiple of {w.size} (each rank trains batch_size / ranks "
                "items of every batch)."
            )
        if w.main:
            output_path.mkdir(parents=True, exist_ok=True)
        checkpoint_data = ckpt.read_checkpoint(resume_from) if resume_from is not None else None
        fingerprint = dataset_fingerprint(examples)
        if checkpoint_data is not None:
            ckpt.check_compatible(checkpoint_data, model_identity, fingerprint, settings.mode, force=force)

        paths, dtype = _prepare(model, settings)
        iterator = BatchIterator(examples, settings.batch_size, settings.seed)
        steps_total = total_steps(settings, iterator.batches_per_epoch)
        optimizer = make_optimizer(settings.optimizer, steps_total)
        optimizer.init(model.trainable_parameters())
        history: list[dict[str, Any]] = []
        step = 0
        if checkpoint_data is not None:
            same = checkpoint_data.meta.get("dataset_fingerprint") == fingerprint
            _apply_checkpoint(model, optimizer, iterator, settings, checkpoint_data, same)
            step, history = checkpoint_data.step, list(checkpoint_data.loss)
    if w.distributed:
        summary = dist.run_summary(settings, fingerprint, model_identity, step, steps_total)
        hint = "Every rank needs the same recipe, data, model and checkpoints (and an explicit batch_size: "
        dist.agree("the training run", summary, w, hint + "`auto` follows each machine's memory).")
    if checkpoint_data is not None and w.main:
        dist.note_world_change(int(checkpoint_data.meta.get("world_size", 1)), w.size)
    trainable = trainable_parameter_count(model)
    empty = mx.array(empty_embedding)

    def loss_fn(model, x0, caps, key, layout=None):
        # layout (start, n_global, weight): σ and noise are drawn for the whole global batch and this
        # rank's rows taken, so they are the same numbers a single process draws; the loss is weighted by
        # this rank's share so the summed gradients are the global batch mean's gradient.
        sigma_key, noise_key = mx.random.split(key)
        n = x0.shape[0] if layout is None else layout[1]
        sigma = sample_sigmas(
            sigma_key,
            n,
            settings.sigma_sampling,
            settings.shift,
            settings.logit_mean,
            settings.logit_std,
        )
        noise = mx.random.normal((n, *x0.shape[1:]), key=noise_key).astype(x0.dtype)
        if layout is None:
            return flow_matching_loss(model, x0, caps, sigma, noise)
        start, stop = layout[0], layout[0] + x0.shape[0]
        return flow_matching_loss(model, x0, caps, sigma[start:stop], noise[start:stop]) * layout[2]

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(x0, caps, key, prev_grad, do_update, layout=None):
        with adapter_dropout(key):  # LoRA dropout masks from the step's key (recomputed blocks included)
            loss, grad = loss_and_grad(model, x0, caps, key, layout)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = dist.sum_gradients(grad, w)  # one bucketed all_sum per optimiser step (W > 1 only)
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            if settings.max_grad_norm is not None:
                grad, _ = optim.clip_grad_norm(grad, settings.max_grad_norm)
            optimizer.update(model, grad)
            grad = None
        return loss, grad

    run_meta = {
        **(checkpoint_meta or {}),
        "mode": settings.mode,
        "model_identity": model_identity,
        "dataset_fingerprint": fingerprint,
        "train_step_key": train_step_key,
        "total_steps": steps_total,
        "trainable_parameters": trainable,
        "world_size": w.size,
        "started": (checkpoint_data.meta.get("started") if checkpoint_data else None)
        or time.strftime("%FT%T%z"),
    }
    last_checkpoint: Path | None = None

    def save_checkpoint() -> Path:
        weights = _weights_for_save(model, settings, {**(adapter_metadata_extra or {}), "step": str(step)})
        iterator_state = {
            **iterator.state(),
            "rng": {"seed": settings.seed, "scheme": "pure(seed, step, micro)"},
        }
        path = ckpt.write_checkpoint(
            output_path, step, weights, flatten_state(optimizer), iterator_state, history,
            config or {}, run_meta, keep_last=settings.keep_last,
        )  # fmt: skip
        write_loss_log(output_path / "loss.json", history)
        plot_loss(output_path / "loss.png", history)
        return path

    mx.reset_peak_memory()
    bar = dist.RankProgress(steps_total, start=step, enabled=progress and w.main)
    monitor = stop_monitor or StopMonitor(battery_limit)
    stopped: str | None = None
    with monitor:
        while step < steps_total:
            t0 = time.perf_counter()
            grad, losses, items = None, [], 0
            for micro in range(accum):
                indices, _ = iterator.next()
                # Dropout is drawn per global example (then sliced), like σ and the noise in loss_fn.
                drop = caption_dropout_mask(
                    settings.seed, step, micro, [examples[i].caption_dropout for i in indices]
                )
                layout = None
                if w.distributed:
                    indices, drop, layout = dist.rank_part(indices, drop, w)
                    items += round(layout[2] * layout[1])
                x0, caps = collate(examples, indices, drop, empty)
                x0, caps = x0.astype(dtype), [c.astype(dtype) for c in caps]
                key = step_key(settings.seed, step, micro)
                loss, grad = train_step(x0, caps, key, grad, micro == accum - 1, layout)
                mx.eval(loss, grad, state)  # one evaluation per micro-batch (mlx-lm)
                losses.append(loss.item())
            reason = monitor.reason()
            rates: list[float] = []
            if w.distributed:
                rate = items / (time.perf_counter() - t0)
                losses, rates, reason = dist.step_stats(losses, rate, reason, w)
            step += 1
            lr = optimizer.learning_rate
            history.append({
                "step": step, "loss": sum(losses) / len(losses), "lr": float(lr.item() if hasattr(lr, "item") else lr),
                "time": time.perf_counter() - t0,
            })  # fmt: skip
            bar.update_ranks(step, history[-1]["loss"], rates)
            if settings.low_ram:
                mx.clear_cache()
            stopped = reason  # agreed by every rank (_step_stats): all ranks stop after the same step
            if step % settings.checkpoint_frequency == 0 or step == steps_total or stopped:
                last_checkpoint = save_checkpoint() if w.main else ckpt.checkpoint_path(output_path, step)
            if stopped:
                break
    bar.close()
    final_path = None
    if stopped is None:
        if w.main and (last_checkpoint is None or last_checkpoint != ckpt.checkpoint_path(output_path, step)):
            last_checkpoint = save_checkpoint()
        meta = {**(adapter_metadata_extra or {}), "step": str(step)}
        final_path = output_path / _final(settings)
        if w.main:
            final_path = _write_final(model, settings, output_path, meta)
    dist.barrier(w)  # ranks > 0 return once rank 0's checkpoint and final files exist
    return TrainResult(
        step=step,
        total_steps=steps_total,
        final_path=final_path,
        checkpoint=last_checkpoint,
        stopped=stopped,
        peak_memory_bytes=int(mx.get_peak_memory()),
        trainable_parameters=trainable,
        lora_paths=paths,
        history=history,
        world_size=w.size,
    )


def _final(settings: TrainSettings) -> str:
    return "adapter.safetensors" if settings.mode == "lora" else "transformer.safetensors"


def _write_final(model, settings: TrainSettings, output_path: Path, meta: dict[str, Any]) -> Path:
    """The trained result as one plain safetensors file with self-describing metadata."""
    if settings.mode == "lora":
        return save_adapter(model, output_path / _final(settings), meta)
    tensors, metadata = _weights_for_save(model, settings, meta)
    path = output_path / _final(settings)
    mx.eval(tensors)
    with ckpt.atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), tensors, metadata=metadata)
    return path
