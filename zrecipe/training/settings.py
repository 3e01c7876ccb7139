"""Training settings: the train step's parameters (what its key hashes) and the settings built from them.

`train_params(recipe)` is the train node's parameters, the one description of a training run;
`TrainSettings.from_params` builds what the loop needs from exactly those parameters, the model's
scheduler shift and the batch the memory optimiser resolved — so nothing the loop uses can escape the
key. Defaults live in `zrecipe.recipe.schema` (the field defaults below point at them); the recipe loader
is the one place values are checked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from zrecipe.errors import RecipeError
from zrecipe.recipe.schema import DEFAULT_MODE, DEFAULT_SEED, Ema, Optimizer, Save, TrainingLoop, Validation

_LOOP = TrainingLoop()  # the schema's defaults, read once


# `training_loop` fields that change when memory is released or what is logged, never a trained value:
# runtime options of the train step, not train parameters (toggling them does not retrain).
RUNTIME_LOOP_FIELDS = ("low_ram", "tensorboard")
# `training_loop` fields the train node covers otherwise: the assistant LoRA and the start weights by their
# files' content hashes (inputs of the node), not by their paths.
NOT_PARAMS_LOOP_FIELDS = (*RUNTIME_LOOP_FIELDS, "assistant_lora", "start_from")


def train_params(recipe: Any) -> dict[str, Any]:
    """The train node's parameters: mode, seed, training_loop, optimizer, the checkpoint schedule, the
    LoRA targets (LoRA) or full_finetune (full), and the validation settings when there are any, in the
    resolved recipe's form. (The examples digest is added by the graph builder; an assistant LoRA enters
    as the content hash of its file, an input of the node, not as its path.)"""
    d = recipe.to_dict()
    loop = {k: v for k, v in (d.get("training_loop") or {}).items() if k not in NOT_PARAMS_LOOP_FIELDS}
    params = {
        "mode": recipe.mode,
        "seed": recipe.seed,
        "training_loop": loop,
        "optimizer": d.get("optimizer"),
        "save": {
            k: v for k, v in (d.get("save") or {}).items() if k in ("checkpoint_frequency", "keep_last")
        },
    }
    if recipe.mode == "lora":
        params["lora"] = d.get("lora")
    else:
        params["full_finetune"] = d.get("full_finetune")
    if d.get("validation") is not None:
        params["validation"] = d["validation"]
    return params


def params_hash(params: dict[str, Any]) -> str:
    """A stable hash of train parameters (the adapter metadata's `recipe_hash`: what was trained, not where
    the recipe file lives or what it samples)."""
    import xxhash

    from zrecipe.recipe.serialize import canonical_json

    return xxhash.xxh3_128_hexdigest(canonical_json(params).encode("utf-8"))


def lora_targets(params: dict[str, Any]) -> tuple:
    """The LoRA targets of train parameters (empty in full mode)."""
    from zrecipe.recipe.serialize import lora_target_from_dict

    return tuple(lora_target_from_dict(t) for t in (params.get("lora") or {}).get("targets", ()))


@dataclass(frozen=True)
class TrainSettings:
    """Everything the loop needs (see `from_params`); `shift` is already resolved (1.0 when built by hand)
    and `batch_size` is the micro-batch one process trains per step."""

    mode: str = DEFAULT_MODE
    seed: int = DEFAULT_SEED
    lora_targets: tuple = ()
    batch_size: int = _LOOP.batch_size  # type: ignore[assignment]  # the schema's default is an int
    gradient_accumulation_steps: int = _LOOP.gradient_accumulation_steps
    num_epochs: int | None = _LOOP.num_epochs
    max_steps: int | None = _LOOP.max_steps
    sigma_sampling: str = _LOOP.sigma_sampling
    shift: float = 1.0
    logit_mean: float = _LOOP.logit_mean
    logit_std: float = _LOOP.logit_std
    gradient_checkpointing: bool = _LOOP.gradient_checkpointing
    compute_dtype: str = _LOOP.compute_dtype
    max_grad_norm: float | None = _LOOP.max_grad_norm
    optimizer: Any = field(default_factory=Optimizer)
    checkpoint_frequency: int = Save.checkpoint_frequency
    keep_last: int | None = Save.keep_last
    low_ram: bool = _LOOP.low_ram  # a runtime option: not in the train params (memory only)
    loss_weighting: str = _LOOP.loss_weighting
    noise_offset: float = _LOOP.noise_offset
    ema: Any = _LOOP.ema  # a zrecipe.recipe.Ema (decay, start_step, every) or None
    tensorboard: bool = _LOOP.tensorboard  # a runtime option: not in the train params (logging only)
    validation: Validation | None = None

    @classmethod
    def from_params(
        cls, params: dict[str, Any], scheduler_shift: float, batch_size: int, gradient_accumulation_steps: int
    ) -> TrainSettings:
        """Settings from the train node's `params` (`train_params` plus the examples digest), the model's
        scheduler shift (used when `training_loop.shift` is null) and the resolved micro-batch size and
        accumulation (`memory.resolve_batch_size` of the params' batch_size / accumulation)."""
        loop, opt, save = params["training_loop"], dict(params["optimizer"]), params["save"]
        opt["betas"] = tuple(opt["betas"])
        return cls(
            mode=params["mode"],
            seed=int(params["seed"]),
            lora_targets=lora_targets(params),
            batch_size=int(batch_size),
            gradient_accumulation_steps=int(gradient_accumulation_steps),
            num_epochs=loop["num_epochs"],
            max_steps=loop["max_steps"],
            sigma_sampling=loop["sigma_sampling"],
            shift=float(loop["shift"] if loop["shift"] is not None else scheduler_shift),
            logit_mean=float(loop["logit_mean"]),
            logit_std=float(loop["logit_std"]),
            gradient_checkpointing=bool(loop["gradient_checkpointing"]),
            compute_dtype=loop["compute_dtype"],
            max_grad_norm=loop["max_grad_norm"],
            optimizer=Optimizer(**opt),
            checkpoint_frequency=int(save["checkpoint_frequency"]),
            keep_last=save["keep_last"],
            loss_weighting=loop["loss_weighting"],
            noise_offset=float(loop["noise_offset"]),
            ema=None if loop["ema"] is None else Ema(**loop["ema"]),
            validation=validation_from_params(params.get("validation")),
        )


def validation_from_params(value: dict[str, Any] | None) -> Validation | None:
    """The `Validation` of the train params' resolved `validation` entry (None when absent)."""
    if value is None:
        return None
    return Validation(**{**value, "sigmas": tuple(value["sigmas"])})


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
