"""The model-family seam: what `train()` needs from a model family, and nothing about its tensors.

A family (Z-Image: `zrecipe.models.z_image.training.FlowMatchingObjective`) turns a batch of example
indices into model inputs and those inputs into a scalar loss. The loop owns everything else: the data
order, the PRNG key of each micro-batch (`rng.step_key`), gradient accumulation, the distributed gradient
sum, clipping, the optimiser, checkpoints and callbacks. A second model family supplies its own object
with these three methods and trains through the same loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from zrecipe.training.distributed import Share


class Objective(Protocol):
    """Batch preparation and loss of one model family (duck-typed: any object with these methods)."""

    def batch(self, examples: Sequence[Any], indices: list[int], step: int, micro: int, share: Share | None):
        """The model inputs (a tuple or list of arrays, a tree `mx.compile` accepts) for the examples at
        `indices` (the whole global batch). Per-item random choices are drawn for the global batch, as a
        pure function of (seed, step, micro), and then cut to this rank's rows `share.start:share.stop`;
        `share` is None on a single process (all rows)."""
        ...

    def loss(self, model: Any, batch: Any, key: Any, share: Share | None) -> Any:
        """The scalar loss of `batch` (traced inside the compiled step). Random draws come from `key` and
        are made for the global batch of `share.n_global` items, then cut to this rank's rows, so W ranks
        draw the numbers one process draws. The loop applies `share.weight` itself."""
        ...

    def checkpoint_blocks(self, model: Any) -> Iterable[Any]:
        """The blocks whose activations gradient checkpointing recomputes in the backward pass."""
        ...

    # Optional, for validation (`zrecipe.training.validation.ValidationLoss`):
    #   validation_loss(model, example, sigma: float, noise: ndarray) -> scalar array
    # the loss of one example at a fixed noise level with fixed noise (of its latents' shape), nothing random.
