"""One standalone training run from a recipe (what `zrecipe train` does): resolve the model, encode the
datasets, load the transformer, size the batch, train. The build's train step calls `train()` directly
with examples from its store instead."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zrecipe.errors import RecipeError
from zrecipe.training.checkpointer import RunInfo
from zrecipe.training.loop import TrainResult, train


def model_identity(folder: str | Path, cache_dir: str | Path | None = None) -> str:
    """xxh128 over the model's weight and config files (relative path + content hash, stat-cached)."""
    import xxhash

    from zrecipe.engine.statcache import StatCache
    from zrecipe.models.z_image.resolve import default_cache_dir, model_weight_files

    folder = Path(folder)
    files = model_weight_files(folder)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with StatCache(cache / "stat.sqlite") as stat_cache:  # the same stat cache as the build
        hashes = stat_cache.hash_files(files)
    h = xxhash.xxh3_128()
    for f in files:
        h.update(f"{f.relative_to(folder).as_posix()}\0{hashes[str(f)]}\n".encode())
    return h.hexdigest()


def prepare_training(recipe: Any, model_path: str | Path, examples: list, log: Callable[[str], None] = print):
    """Load the transformer for `recipe` and resolve its TrainSettings (batch size `auto` and micro-batching
    from the memory optimiser, sized for the largest bucket and longest caption of `examples`)."""
    import mlx.core as mx

    from zrecipe.models.z_image.sampler import read_scheduler_shift
    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.training.memory import resolve_batch_size
    from zrecipe.training.settings import TrainSettings

    loop = recipe.training_loop
    dtype = None if loop.compute_dtype == "auto" else loop.compute_dtype
    transformer = load_transformer(model_path, dtype=dtype, quantize=loop.quantize)
    largest = max(examples, key=lambda e: e.bucket[0] * e.bucket[1])
    micro, accum, note = resolve_batch_size(
        loop.batch_size,
        loop.gradient_accumulation_steps,
        transformer.config,
        recipe.mode,
        width=largest.bucket[1] * 8,
        height=largest.bucket[0] * 8,
        caption_tokens=max(e.caption.shape[0] for e in examples),
        dtype="bfloat16" if transformer.dtype == mx.bfloat16 else "float32",
        quantize=loop.quantize,
        lora_targets=recipe.lora.targets if recipe.lora else None,
        gradient_checkpointing=loop.gradient_checkpointing,
    )
    if note:
        log(note)
    settings = TrainSettings.from_recipe(recipe, read_scheduler_shift(model_path), batch_size=micro)
    return transformer, dataclasses.replace(settings, gradient_accumulation_steps=accum)


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


def run_recipe(
    recipe: Any,
    *,
    resume_from: str | Path | None = None,
    low_ram: bool = False,
    battery_limit: int | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `recipe` end to end, resuming from `resume_from` when given."""

    from zrecipe.models.z_image.resolve import resolve_model
    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.recipe import recipe_hash
    from zrecipe.training.callbacks import default_callbacks
    from zrecipe.training.encode import encode_recipe_datasets

    loop = recipe.training_loop
    if recipe.mode == "full" and loop.quantize:
        raise RecipeError(
            f"{recipe.source}: training_loop.quantize applies to LoRA only; full fine-tuning needs unquantised "
            "weights. Remove `quantize` or use mode: lora."
        )
    cache_dir = cache_dir or recipe.cache
    folder = resolve_model(recipe.model, cache_dir)
    identity = model_identity(folder, cache_dir)
    low_ram = low_ram or loop.low_ram
    log(f"encoding {len(recipe.datasets)} dataset(s) with {folder.name}")
    examples, empty = encode_recipe_datasets(recipe, folder, low_ram=low_ram, log=log)
    transformer, settings = prepare_training(recipe, folder, examples, log)
    settings = dataclasses.replace(settings, low_ram=low_ram)
    meta = {"base_model": recipe.model, "recipe_hash": recipe_hash(recipe)}
    run = RunInfo(
        model_identity=identity,
        train_step_key=meta["recipe_hash"],
        config=recipe.to_dict(),
        adapter_metadata=meta,
        checkpoint_meta={"recipe_source": str(recipe.source)},
    )
    objective = FlowMatchingObjective.from_settings(settings, empty)
    result = train(
        transformer,
        examples,
        objective,
        settings,
        recipe.save.output_path,
        run=run,
        resume_from=resume_from,
        force=force,
        callbacks=default_callbacks(battery_limit=battery_limit),
    )
    return result
