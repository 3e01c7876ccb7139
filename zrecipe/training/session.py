"""What the build's train step needs around the loop: the transformer and settings for its parameters, the
recipe inside a checkpoint (for `zrecipe train --train-checkpoint`), and the peak memory to report.

`zrecipe train` is the build graph up to `train` (zrecipe.pipeline.train_recipe): there is no second path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from zrecipe.errors import DatasetError, ModelError


def load_for_training(
    params: dict[str, Any],
    model_path: str | Path,
    examples: list,
    log: Callable[[str], None] = print,
    assistant: tuple[str | Path, str] | None = None,
):
    """(transformer, TrainSettings) for the train node's `params`: the transformer loaded as they say
    (with `assistant` = (LoRA file, its identity) fused into it: see training/assistant.py), the batch
    (`auto`, or micro-batches when the requested batch does not fit) resolved by the memory optimiser for
    the largest bucket and longest caption of `examples`."""
    import mlx.core as mx

    from zrecipe.models.z_image.sampler import read_scheduler_shift
    from zrecipe.models.z_image.transformer import load_transformer, quantize_transformer, stored_bits
    from zrecipe.training.memory import resolve_batch_size
    from zrecipe.training.settings import TrainSettings, lora_targets

    if not examples:
        raise DatasetError("training has no examples: every dataset is empty or all its items were skipped.")
    loop = params["training_loop"]
    dtype = None if loop["compute_dtype"] == "auto" else loop["compute_dtype"]
    if assistant is None:
        transformer = load_transformer(model_path, dtype=dtype, quantize=loop["quantize"])
    else:
        from zrecipe.training.assistant import fuse_assistant

        # Fused before quantising, so the quantised base is quantise(W + ΔW), one rounding; weights stored
        # quantised are dequantised, updated and re-quantised per layer.
        transformer = load_transformer(model_path, dtype=dtype)
        stored = stored_bits(transformer)
        if stored and loop["quantize"] and {loop["quantize"]} != stored:
            raise ModelError(
                f"{model_path}: the transformer is stored quantised to {sorted(stored)} bits; quantize: "
                f"{loop['quantize']} cannot requantise it. Remove `quantize` or set it to the stored bits."
            )
        paths = fuse_assistant(transformer, *assistant)
        if loop["quantize"] and not stored:
            quantize_transformer(transformer, loop["quantize"])
            mx.eval(transformer.parameters())
        log(f"train: assistant LoRA {Path(assistant[0]).name} fused into {len(paths)} layers of the base")
    largest = max(examples, key=lambda e: e.bucket[0] * e.bucket[1])
    settings = TrainSettings.from_params(params, read_scheduler_shift(model_path), 1, 1)  # batch: below
    micro, accum, note = resolve_batch_size(
        loop["batch_size"],
        loop["gradient_accumulation_steps"],
        transformer.config,
        params["mode"],
        width=largest.bucket[1] * 8,
        height=largest.bucket[0] * 8,
        caption_tokens=max(e.caption.shape[0] for e in examples),
        dtype="bfloat16" if transformer.dtype == mx.bfloat16 else "float32",
        quantize=loop["quantize"],
        lora_targets=lora_targets(params) or None,
        gradient_checkpointing=loop["gradient_checkpointing"],
        optimizer=settings.optimizer,
        ema=settings.ema is not None,
    )
    if note:
        log(note)
    return transformer, replace(settings, batch_size=micro, gradient_accumulation_steps=accum)


def recipe_from_checkpoint(path: str | Path) -> tuple[Any, Any]:
    """(Recipe, verified Checkpoint) for `--train-checkpoint`: the zip's config.json is the resolved recipe."""
    from zrecipe.recipe import Recipe
    from zrecipe.training.checkpoint import read_checkpoint
    from zrecipe.training.optim import check_rule

    checkpoint = read_checkpoint(path)
    source = checkpoint.meta.get("recipe_source")
    recipe = Recipe.from_dict(checkpoint.config, source=source)
    # Refused now rather than after encoding the datasets (train() checks it again).
    check_rule(checkpoint.optimizer_metadata, recipe.optimizer, f"{checkpoint.path}: optimizer.safetensors")
    return recipe, checkpoint


def peak_memory(result: Any) -> str:
    """The run's peak memory in words: MLX's device peak on a GPU (Metal, CUDA); on the CPU backend the
    process's peak resident set size, since MLX counts only its own buffers there, not the whole process."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return f"{result.peak_memory_bytes / 2**30:.2f} GB"
    import resource
    import sys

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return f"{rss / 2**30:.2f} GB (peak RSS)"
