"""Validation loss: the training objective on held-out examples at fixed σ values with fixed noise.

`ValidationLoss` is a `TrainingCallback`. At every scheduled checkpoint (or every `validation.every`
steps) and at the last step it measures, for each held-out example and each σ of `validation.sigmas`,
the objective's `validation_loss(model, example, σ, noise)` (Z-Image: the flow-matching loss of that one
example, caption kept, mask applied) and writes into that step's record of the loss history:

    "val_loss": mean over examples and σ,  "val_loss_by_sigma": [mean over examples, per σ]

The history is what checkpoints, loss.json and loss.png hold, so a resumed run carries the earlier values
and the train entry's loss.json has them all. The noise of (example, σ) is drawn from a NumPy generator
seeded by (`validation.seed`, the example's content key, σ): independent of the training randomness (which
is a pure function of (seed, step, micro), see rng.py) and of the other examples, so a run trains the same
bytes with or without validation, and an example's noise stays the same as others join or leave the set.
Only the main rank measures (the forward passes need no collective); the others train on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from zrecipe.errors import DatasetError, RecipeError
from zrecipe.training.callbacks import StepReport, TrainingCallback, TrainState

_SIGMA_RESOLUTION = 2**24  # σ enters the noise seed as an integer (float32 has 24 significant bits)


def validation_noise(seed: int, example: Any, index: int, sigma: float) -> np.ndarray:
    """The fixed noise of `example` (the `index`-th held-out example, used when it has no content key)
    at `sigma`: standard normal float32 in the shape of its latents."""
    import xxhash

    item = example.key if example.key is not None else f"index:{index}"
    digest = xxhash.xxh3_64_intdigest(item.encode())
    words = [int(seed) & 0xFFFFFFFF, int(seed) >> 32, digest & 0xFFFFFFFF, digest >> 32,
             round(float(sigma) * _SIGMA_RESOLUTION), 11]  # fmt: skip
    return np.random.default_rng(words).standard_normal(np.shape(example.latents), dtype=np.float32)


class ValidationLoss(TrainingCallback):
    """Measures the validation loss on `examples` with `objective` (see the module docstring).
    `validation`: a `zrecipe.recipe.Validation` (sigmas, seed, every); `checkpoint_frequency`: the run's
    checkpoint schedule, which `every=None` follows; `log`: where one line per measurement goes."""

    def __init__(
        self,
        examples: Sequence[Any],
        objective: Any,
        validation: Any,
        checkpoint_frequency: int,
        log: Callable[[str], None] | None = None,
    ):
        if not examples:
            raise DatasetError("validation: no held-out example is left (every one was skipped upstream).")
        if not hasattr(objective, "validation_loss"):
            raise RecipeError("validation: this model family's objective has no validation_loss().")
        self.examples, self.objective = list(examples), objective
        self.sigmas = tuple(float(s) for s in validation.sigmas)
        self.seed = int(validation.seed)
        self.every = int(validation.every or checkpoint_frequency)
        self.log = log

    def due(self, step: int, total_steps: int) -> bool:
        """Whether validation runs after `step` (a fixed schedule: a stop or resume never moves it)."""
        return step % self.every == 0 or step == total_steps

    def measure(self, model: Any) -> list[float]:
        """The mean validation loss over the examples, per σ (float64 sums of the per-example losses)."""
        import mlx.core as mx

        totals = [0.0] * len(self.sigmas)
        for index, example in enumerate(self.examples):
            for j, sigma in enumerate(self.sigmas):
                noise = validation_noise(self.seed, example, index, sigma)
                loss = self.objective.validation_loss(model, example, sigma, noise)
                mx.eval(loss)
                totals[j] += float(loss.item())
        return [t / len(self.examples) for t in totals]

    def on_step(self, state: TrainState, report: StepReport) -> None:
        if not state.world.main or not self.due(report.step, state.total_steps):
            return
        by_sigma = self.measure(state.model)
        record = state.history[-1]
        record["val_loss"] = sum(by_sigma) / len(by_sigma)
        record["val_loss_by_sigma"] = by_sigma
        if self.log is not None:
            parts = ", ".join(f"σ {s:g}: {v:.4f}" for s, v in zip(self.sigmas, by_sigma, strict=True))
            self.log(f"validation at step {report.step}: loss {record['val_loss']:.4f} ({parts})")
