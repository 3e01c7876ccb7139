"""One optimiser step: `gradient_accumulation_steps` micro-batches through one compiled function (mlx-lm).

`make_step` builds `nn.value_and_grad` once and compiles one step with the captured state
`[model.state, optimizer.state, mx.random.state]`. Each micro-batch adds its gradient to the previous
ones (`prev_grad`); the last one (`do_update`) sums the gradients over the ranks (one bucketed all_sum),
averages over the micro-batches, clips the global norm and updates the model; the norm clipping measures
is returned (and computed only for it when clipping is off but `grad_norm` asks). Everything random comes
from the micro-batch's position (`rng.step_key`, the objective's own draws), so the step is a pure
function of (state, step number): resuming reproduces it bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx import nn
from mlx.utils import tree_flatten, tree_map

from zrecipe.lora.layers import adapter_dropout
from zrecipe.training import distributed as dist
from zrecipe.training.data import BatchIterator
from zrecipe.training.objective import Objective
from zrecipe.training.rng import step_key

# (iterator, step number) -> (the micro-batches' losses, items this rank trained on, the global gradient
# norm before clipping or None when neither clipping nor the caller measures it)
StepFunction = Callable[[BatchIterator, int], tuple[list[float], int, float | None]]


def make_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    objective: Objective,
    examples: Sequence[Any],
    settings: Any,
    w: dist.World,
    grad_norm: bool = False,
) -> StepFunction:
    """The run's step function: `step(iterator, n)` trains optimiser step n on the iterator's next
    micro-batches and returns their losses (this rank's, weighted by its share), its item count and the
    gradient norm (with clipping, or when `grad_norm` asks for it; else None)."""
    accum = int(settings.gradient_accumulation_steps)
    clip = settings.max_grad_norm

    def loss_fn(model, batch, key, share):
        # Each rank's loss is weighted by its share of the global batch, so the summed gradients are the
        # global batch mean's gradient.
        loss = objective.loss(model, batch, key, share)
        return loss if share is None else loss * share.weight

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def compiled(batch, key, prev_grad, do_update, share=None):
        with adapter_dropout(key):  # LoRA dropout masks from the step's key (recomputed blocks included)
            loss, grad = loss_and_grad(model, batch, key, share)
        norm = None
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = dist.sum_gradients(grad, w)  # one bucketed all_sum per optimiser step (W > 1 only)
            if accum > 1:
                grad = tree_map(lambda g: g / accum, grad)
            if clip is not None:
                grad, norm = optim.clip_grad_norm(grad, clip)
            elif grad_norm:
                norm = mx.sqrt(sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grad)))
            optimizer.update(model, grad)
            grad = None
        return loss, grad, norm

    def step(iterator: BatchIterator, n: int) -> tuple[list[float], int, float | None]:
        grad, losses, items, norm = None, [], 0, None
        for micro in range(accum):
            indices, _ = iterator.next()
            share = dist.batch_share(len(indices), w)  # None on a single process
            batch = objective.batch(examples, indices, n, micro, share)
            key = step_key(settings.seed, n, micro)
            loss, grad, norm = compiled(batch, key, grad, micro == accum - 1, share)
            mx.eval(loss, grad, norm, state)  # one evaluation per micro-batch (mlx-lm)
            losses.append(loss.item())
            items += len(indices) if share is None else share.items
        return losses, items, None if norm is None else norm.item()

    return step
