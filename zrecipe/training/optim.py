"""AdamW with an optional linear warm-up and a constant or cosine schedule, and its (de)serialisation.

The schedule is a pure function of the optimiser's own `step` counter, which lives in the optimiser state:
restoring the flattened state from a checkpoint therefore restores the learning rate exactly.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError, RecipeError


def learning_rate_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_learning_rate: float = 0.0,
):
    """A schedule callable step → lr (or a float for a plain constant rate)."""
    if schedule not in ("constant", "cosine"):
        raise RecipeError(f"optimizer.schedule: unknown schedule {schedule!r} (use constant or cosine).")
    warmup_steps = max(0, int(warmup_steps))
    if schedule == "constant":
        if warmup_steps == 0:
            return float(learning_rate)

        def body(step: mx.array) -> mx.array:
            return mx.array(learning_rate, dtype=mx.float32)

    else:
        decay_steps = max(1, int(total_steps) - warmup_steps)
        body = optim.cosine_decay(learning_rate, decay_steps, end=min_learning_rate)
    if warmup_steps == 0:
        return body
    warmup = optim.linear_schedule(learning_rate / (warmup_steps + 1), learning_rate, warmup_steps)
    return optim.join_schedules([warmup, body], [warmup_steps])


def make_optimizer(spec: Any, total_steps: int) -> optim.Optimizer:
    """AdamW from a `zrecipe.recipe.Optimizer` (name, learning_rate, betas, weight_decay, eps, warmup_steps,
    schedule, min_learning_rate)."""
    if str(spec.name).lower() != "adamw":
        raise RecipeError(f"optimizer.name: {spec.name!r} is not supported; use AdamW.")
    lr = learning_rate_schedule(
        float(spec.learning_rate),
        total_steps,
        spec.warmup_steps,
        spec.schedule,
        float(spec.min_learning_rate),
    )
    betas = [float(b) for b in spec.betas]
    return optim.AdamW(
        learning_rate=lr, betas=betas, eps=float(spec.eps), weight_decay=float(spec.weight_decay)
    )


def flatten_state(optimizer: optim.Optimizer) -> dict[str, mx.array]:
    """The optimiser state as a flat {key: array} dict for optimizer.safetensors."""
    flat = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    return flat


def restore_state(optimizer: optim.Optimizer, flat: dict[str, mx.array], where: str) -> None:
    """Put a flattened state back; every key and shape must match the freshly initialised optimiser."""
    current = flatten_state(optimizer)
    missing = sorted(set(current) - set(flat))
    unexpected = sorted(set(flat) - set(current))
    misshaped = sorted(k for k in set(current) & set(flat) if current[k].shape != flat[k].shape)
    if missing or unexpected or misshaped:
        detail = "; ".join(
            f"{title}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
            for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
            if items
        )
        raise CheckpointError(f"{where}: optimizer state does not match this model/recipe ({detail}).")
    # Set leaves in place: the state tree keeps empty sub-trees for frozen modules that a flat dict loses,
    # and `optimizer.update` walks the state alongside the gradient tree.
    for key in current:
        node: Any = optimizer.state
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        value = flat[key].astype(current[key].dtype)
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
