"""Training settings: what the loop needs from a recipe, in one frozen object, and derived quantities."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from zrecipe.errors import RecipeError
from zrecipe.recipe.schema import Optimizer


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs from a recipe (see `from_recipe`); `shift` is already resolved."""

    mode: str = "lora"
    seed: int = 0
    lora_targets: tuple = ()
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: int | None = None
    max_steps: int | None = None
    sigma_sampling: str = "shifted"
    shift: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    gradient_checkpointing: bool = False
    compute_dtype: str = "float32"
    max_grad_norm: float | None = 1.0
    optimizer: Any = field(default_factory=Optimizer)  # a zrecipe.recipe.Optimizer
    checkpoint_frequency: int = 500
    keep_last: int | None = None
    low_ram: bool = False
    loss_weighting: str = "none"
    noise_offset: float = 0.0
    ema: Any = None  # a zrecipe.recipe.Ema (decay, start_step, every) or None
    tensorboard: bool = False

    @classmethod
    def from_recipe(cls, recipe: Any, scheduler_shift: float, batch_size: int | None = None) -> TrainSettings:
        """Settings from a `zrecipe.recipe.Recipe`; `batch_size` overrides `auto` once it is resolved."""
        loop = recipe.training_loop
        if recipe.mode == "full" and (
            recipe.full_finetune.train_vae or recipe.full_finetune.train_text_encoder
        ):
            raise RecipeError(
                f"{recipe.source}: full_finetune.train_vae / train_text_encoder: only the transformer can be "
                "trained (the VAE and text encoder stay frozen); set them to false."
            )
        if recipe.mode == "full" and not recipe.full_finetune.train_transformer:
            raise RecipeError(
                f"{recipe.source}: full_finetune.train_transformer is false, so nothing would be trained; "
                "set it to true or use mode: lora."
            )
        size = batch_size if batch_size is not None else loop.batch_size
        if size == "auto":
            raise RecipeError(
                "training_loop.batch_size: 'auto' must be resolved first (memory.resolve_batch_size)."
            )
        return cls(
            mode=recipe.mode,
            seed=int(recipe.seed),
            lora_targets=tuple(recipe.lora.targets) if recipe.lora else (),
            batch_size=int(size),
            gradient_accumulation_steps=int(loop.gradient_accumulation_steps),
            num_epochs=loop.num_epochs,
            max_steps=loop.max_steps,
            sigma_sampling=loop.sigma_sampling,
            shift=float(loop.shift if loop.shift is not None else scheduler_shift),
            logit_mean=float(loop.logit_mean),
            logit_std=float(loop.logit_std),
            gradient_checkpointing=bool(loop.gradient_checkpointing),
            compute_dtype=loop.compute_dtype,
            max_grad_norm=loop.max_grad_norm,
            optimizer=recipe.optimizer,
            checkpoint_frequency=int(recipe.save.checkpoint_frequency),
            keep_last=recipe.save.keep_last,
            low_ram=bool(loop.low_ram),
            loss_weighting=loop.loss_weighting,
            noise_offset=float(loop.noise_offset),
            ema=loop.ema,
            tensorboard=bool(loop.tensorboard),
        )


def total_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    """Optimiser steps: `max_steps`, or `num_epochs` worth of micro-batches, whichever comes first."""
    candidates = []
    if settings.max_steps is not None:
        candidates.append(int(settings.max_steps))
    if settings.num_epochs is not None:
        candidates.append(
            math.ceil(settings.num_epochs * batches_per_epoch / settings.gradient_accumulation_steps)
        )
    if not candidates:
        raise RecipeError("training_loop: set num_epochs or max_steps.")
    return max(1, min(candidates))
