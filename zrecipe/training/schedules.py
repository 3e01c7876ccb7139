"""Learning-rate schedules: a pure function of the optimiser's own step counter s (0 for the first update).

The counter lives in the optimiser state, so restoring the flattened state from a checkpoint restores the
learning rate exactly. Two families, each matching a PyTorch reference step for step:

- `constant`, `cosine` (zrecipe's own since v1): warm-up lr·(s+1)/(W+1) for s < W — PyTorch's
  `LinearLR(start_factor=1/(W+1), total_iters=W)` — then constant lr, or `CosineAnnealingLR(T_max=T−W,
  eta_min=min_learning_rate)` (joined by `SequentialLR` at milestone W).
- `constant_with_warmup`, `linear`, `cosine_with_restarts`: transformers' / diffusers' `get_scheduler` of
  the same name: warm-up lr·s/W (the first update at lr 0), then constant, a linear decay to 0 at T, or
  `num_cycles` cosine decays to 0 with hard restarts (`get_cosine_with_hard_restarts_schedule_with_warmup`).

Everything is computed in float32 from integers where it can be: the decays are written so that they do
not cancel near 0 (sin² of the remaining fraction instead of 1 + cos of the elapsed one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.optimizers as optim

from zrecipe.errors import RecipeError

Schedule = float | Callable[[mx.array], mx.array]

# zrecipe's schedules (warm-up (s+1)/(W+1), cosine to min_learning_rate) and the transformers ones.
ZRECIPE_SCHEDULES = ("constant", "cosine")
TRANSFORMERS_SCHEDULES = ("constant_with_warmup", "linear", "cosine_with_restarts")


def learning_rate_schedule(
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "constant",
    min_learning_rate: float = 0.0,
    num_cycles: int = 1,
) -> Schedule:
    """A schedule callable step → lr (or a float for a plain constant rate); see the module docstring."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))
    if schedule in ZRECIPE_SCHEDULES:
        return _zrecipe_schedule(learning_rate, total_steps, warmup_steps, schedule, min_learning_rate)
    if schedule in TRANSFORMERS_SCHEDULES:
        factor = _transformers_factor(schedule, total_steps, warmup_steps, int(num_cycles))
        return lambda step: learning_rate * factor(step)
    names = ", ".join(ZRECIPE_SCHEDULES + TRANSFORMERS_SCHEDULES)
    raise RecipeError(f"optimizer.schedule: unknown schedule {schedule!r} (use one of {names}).")


def _zrecipe_schedule(
    learning_rate: float, total_steps: int, warmup_steps: int, schedule: str, min_learning_rate: float
) -> Schedule:
    if schedule == "constant":
        if warmup_steps == 0:
            return float(learning_rate)

        def body(step: mx.array) -> mx.array:
            return mx.array(learning_rate, dtype=mx.float32)

    else:
        body = _cosine(learning_rate, min_learning_rate, max(1, total_steps - warmup_steps))
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


def _transformers_factor(
    schedule: str, total_steps: int, warmup_steps: int, num_cycles: int
) -> Callable[[mx.array], mx.array]:
    """The multiplier λ(s) of transformers' `get_scheduler(schedule, ...)` (a LambdaLR)."""
    decay_steps = float(max(1, total_steps - warmup_steps))

    def factor(step: mx.array) -> mx.array:
        s = step.astype(mx.float32)
        warm = s / max(1, warmup_steps)
        since = mx.maximum(s - warmup_steps, 0.0)  # steps after the warm-up (integers: exact in float32)
        if schedule == "constant_with_warmup":
            body = mx.ones_like(s)
        elif schedule == "linear":
            body = mx.maximum(decay_steps - since, 0.0) / decay_steps
        else:
            # ½(1 + cos(π·frac(c·p))) with p = since / D, as cos²(π/2·f) = sin²(π/2·(1 − f)); the fraction
            # of the current cycle left, (D − (c·since mod D)) / D, is a ratio of integers.
            left = (decay_steps - mx.remainder(num_cycles * since, decay_steps)) / decay_steps
            body = mx.where(since >= decay_steps, 0.0, mx.square(mx.sin((math.pi / 2) * left)))
        return mx.where(s < warmup_steps, warm, body)

    return factor
