"""Randomness of a training step as a pure function of its position (seed, step, micro-batch).

Nothing random in a step depends on hidden RNG state, so resuming at any step draws the same numbers an
uninterrupted run draws. `purpose` keeps independent draws of one micro-batch apart: 1 is the MLX key the
loop hands to the objective's loss (σ and noise for Z-Image); 2 and above are the model family's own
(Z-Image's caption dropout uses 2, its noise offset 3).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np


def step_rng(seed: int, step: int, micro: int, purpose: int) -> np.random.Generator:
    """A NumPy generator that is a pure function of (seed, step, micro-batch, purpose)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(micro), int(purpose)])


def step_key(seed: int, step: int, micro: int) -> mx.array:
    """The MLX PRNG key of one micro-batch (purpose 1)."""
    words = step_rng(seed, step, micro, 1).integers(0, 2**32, size=2, dtype=np.uint64)
    return mx.array(words.astype(np.uint32))
