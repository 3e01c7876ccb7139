"""Optimisers by name (one table), the learning-rate schedule, and the state's (de)serialisation.

AdamW follows `torch.optim.AdamW` step for step (decoupled weight decay, bias-corrected moments), so a
learning rate brought from a PyTorch trainer (ai-toolkit, musubi-tuner, OneTrainer, kohya) means the same
here. MLX's own `optim.AdamW` defaults to `bias_correction=False`, whose first steps are 3-6x larger.

The schedule is a pure function of the optimiser's own `step` counter, which lives in the optimiser state:
restoring the flattened state from a checkpoint therefore restores the learning rate exactly. Every
optimiser has a `rule` written into optimizer.safetensors; a checkpoint whose state follows another rule
(another optimiser, or the uncorrected AdamW of older zrecipe versions) is refused instead of continued.

A new optimiser is one entry in OPTIMIZERS (a build function and a rule name) plus its name in the
recipe schema's `Optimizer.name`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError, RecipeError

STATE_FORMAT = "zrecipe-optimizer"

Schedule = float | Callable[[mx.array], mx.array]


def learning_rate_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_learning_rate: float = 0.0,
) -> Schedule:
    """A schedule callable step → lr (or a float for a plain constant rate).

    With the optimiser's step counter s (0 for the first update): warm-up lr·(s+1)/(W+1) for s < W, then
    constant lr, or a cosine from lr towards `min_learning_rate` over the remaining steps — PyTorch's
    `LinearLR(start_factor=1/(W+1), total_iters=W)` followed (`SequentialLR`, milestone W) by
    `CosineAnnealingLR(T_max=total_steps - W, eta_min=min_learning_rate)`."""
    if schedule not in ("constant", "cosine"):
        raise RecipeError(f"optimizer.schedule: unknown schedule {schedule!r} (use constant or cosine).")
    warmup_steps = max(0, int(warmup_steps))
    if schedule == "constant":
        if warmup_steps == 0:
            return float(learning_rate)

        def body(step: mx.array) -> mx.array:
            return mx.array(learning_rate, dtype=mx.float32)

    else:
        body = _cosine(learning_rate, min_learning_rate, max(1, int(total_steps) - warmup_steps))
    if warmup_steps == 0:
        return body
    warmup = optim.linear_schedule(learning_rate / (warmup_steps + 1), learning_rate, warmup_steps)
    return optim.join_schedules([warmup, body], [warmup_steps])


def _cosine(
    learning_rate: float, min_learning_rate: float, decay_steps: int
) -> Callable[[mx.array], mx.array]:
    """min + (lr − min)·½(1 + cos(π·s/T)), written as sin²(π/2·(T − s)/T): the same value without the
    float32 cancellation of 1 + cos near the end of the run, where it would lose most of its digits."""

    def schedule(step: mx.array) -> mx.array:
        remaining = decay_steps - mx.minimum(step, decay_steps).astype(mx.float32)
        decay = mx.square(mx.sin((math.pi / 2 / decay_steps) * remaining))
        return min_learning_rate + decay * (learning_rate - min_learning_rate)

    return schedule


class PyTorchAdamW(optim.AdamW):
    """AdamW computed as `torch.optim.AdamW` computes it, operation for operation:

        p ← p·(1 − lr·λ);  m ← m + (1−β1)(g − m);  v ← β2·v + (1−β2)·g²
        p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)

    The bias corrections 1 − β^t are computed as −expm1(t·ln β): in float32 `1 − 0.999**t` loses five
    digits at small t, which PyTorch (in float64) does not. The moments m, v and the step t are the same
    quantities PyTorch keeps (`exp_avg`, `exp_avg_sq`, `step`)."""

    def __init__(self, learning_rate: Schedule, betas: list[float], eps: float, weight_decay: float):
        super().__init__(learning_rate, betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=True)
        self._log_betas = [math.log(b) for b in betas]  # in float64, like PyTorch's β**t

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        dtype = gradient.dtype
        lr = self.learning_rate.astype(mx.float32)
        b1, b2 = self.betas
        log_b1, log_b2 = self._log_betas
        t = self.step.astype(mx.float32)
        parameter = parameter * (1 - lr * self.weight_decay).astype(dtype)
        m = state["m"] + (1 - b1) * (gradient - state["m"])
        v = state["v"] * b2 + (1 - b2) * gradient * gradient
        state["m"], state["v"] = m, v
        step_size = (lr / -mx.expm1(t * log_b1)).astype(dtype)
        correction2 = mx.sqrt(-mx.expm1(t * log_b2)).astype(dtype)
        return parameter - step_size * m / (mx.sqrt(v) / correction2 + self.eps)


def _adamw(spec: Any, learning_rate: Schedule) -> optim.Optimizer:
    return PyTorchAdamW(
        learning_rate,
        betas=[float(b) for b in spec.betas],
        eps=float(spec.eps),
        weight_decay=float(spec.weight_decay),
    )


@dataclass(frozen=True)
class OptimizerKind:
    """One optimiser: how to build it from the recipe's `optimizer:` block and a schedule, and the name of
    its update rule (recorded with its state; change it whenever the update changes, so that no checkpoint
    continues under a rule it was not trained with)."""

    build: Callable[[Any, Schedule], optim.Optimizer]
    rule: str


# Keyed by the lower-cased recipe name (`optimizer.name`).
OPTIMIZERS: dict[str, OptimizerKind] = {
    "adamw": OptimizerKind(_adamw, rule="adamw-pytorch"),
}


def optimizer_kind(spec: Any) -> OptimizerKind:
    """The table entry for a `zrecipe.recipe.Optimizer`; RecipeError for an unknown name."""
    kind = OPTIMIZERS.get(str(spec.name).lower())
    if kind is None:
        names = ", ".join(sorted(OPTIMIZERS))
        raise RecipeError(f"optimizer.name: {spec.name!r} is not supported; use one of: {names}.")
    return kind


def make_optimizer(spec: Any, total_steps: int) -> optim.Optimizer:
    """The optimiser a `zrecipe.recipe.Optimizer` describes (name, learning_rate, betas, weight_decay, eps,
    warmup_steps, schedule, min_learning_rate), for a run of `total_steps` optimiser steps."""
    schedule = learning_rate_schedule(
        float(spec.learning_rate),
        total_steps,
        spec.warmup_steps,
        spec.schedule,
        float(spec.min_learning_rate),
    )
    return optimizer_kind(spec).build(spec, schedule)


def state_metadata(spec: Any) -> dict[str, str]:
    """The safetensors metadata of optimizer.safetensors: the format and the update rule of the state."""
    return {"format": STATE_FORMAT, "rule": optimizer_kind(spec).rule}


def flatten_state(optimizer: optim.Optimizer) -> dict[str, mx.array]:
    """The optimiser state as a flat {key: array} dict for optimizer.safetensors."""
    flat = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
    return flat


def check_rule(metadata: dict[str, str], spec: Any, where: str) -> None:
    """Refuse optimiser state written under another update rule than the recipe's optimiser uses."""
    rule, saved = optimizer_kind(spec).rule, metadata.get("rule")
    if saved == rule:
        return
    if saved is None and rule == "adamw-pytorch":
        raise CheckpointError(
            f"{where}: the optimiser state comes from an older zrecipe whose AdamW did not correct its "
            "moments' bias (steps 3-6x larger early on); the current AdamW follows PyTorch, so this run "
            "cannot continue exactly. Start the training again (drop --train-checkpoint), or finish it "
            "with the zrecipe version that wrote the checkpoint."
        )
    raise CheckpointError(
        f"{where}: the optimiser state follows update rule {saved!r}, but this recipe's optimizer "
        f"{spec.name} uses {rule!r}; resume with the optimizer the checkpoint was trained with."
    )


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
