"""One optimiser step: `gradient_accumulation_steps` micro-batches through one compiled function (mlx-lm).

`make_step` builds `nn.value_and_grad` once and compiles one step with the captured state
`[model.state, optimizer.state, mx.random.state]`. Each micro-batch adds its gradient to the previous
ones (`prev_grad`); the last one (`do_update`) sums the gradients over the ranks (one bucketed all_sum),
averages over the micro-batches, clips the global norm and updates the model. Everything random comes
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
from mlx.utils import tree_map

from zrecipe.lora.layers import adapter_dropout
from zrecipe.training import distributed as dist
from zrecipe.training.data import BatchIterator
from zrecipe.training.objective import Objective
from zrecipe.training.rng import step_key

# (iterator, step number) -> (the micro-batches' losses, items this rank trained on)
StepFunction = Callable[[BatchIterator, int], tuple[list[float], int]]


def make_step(
    model: nn.Module,
    optimizer: optim.Optimizer,
    objective: Objective,
    examples: Sequence[Any],
    settings: Any,
    w: dist.World,
) -> StepFunction:
    """The run's step function: `step(iterator, n)` trains optimiser step n on the iterator's next
    micro-batches and returns their losses (this rank's, weighted by its share) and its item count."""
    accum = int(settings.gradient_accumulation_steps)

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

    def step(iterator: BatchIterator, n: int) -> tuple[list[float], int]:
        grad, losses, items = None, [], 0
        for micro in range(accum):
            indices, _ = iterator.next()
            share = dist.batch_share(len(indices), w)  # None on a single process
            batch = objective.batch(examples, indices, n, micro, share)
            loss, grad = compiled(batch, step_key(settings.seed, n, micro), grad, micro == accum - 1, share)
            mx.eval(loss, grad, state)  # one evaluation per micro-batch (mlx-lm)
            losses.append(loss.item())
            items += len(indices) if share is None else share.items
        return losses, items

    return step
