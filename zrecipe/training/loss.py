"""The flow-matching objective (DESIGN §5), σ sampling and caption dropout.

x_σ = (1−σ)·x0 + σ·ε; the model sees time t = 1−σ and outputs ≈ x0 − ε; the pipeline negates it to get the
velocity ε − x0, so the loss is mean((x0 + (−out) − ε)²) — the seed's ||clean + predicted − noise||².
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx
import numpy as np

SIGMA_SAMPLING = ("shifted", "uniform", "logit_normal")


def sample_sigmas(
    key: mx.array,
    batch: int,
    method: str = "shifted",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> mx.array:
    """σ ∈ (0, 1) per item. `shifted` maps a uniform u through s·u/(1+(s−1)u), the sampler's own shift,
    so training spends its steps where inference spends them (high noise for s > 1)."""
    if method == "uniform":
        return mx.random.uniform(shape=(batch,), key=key)
    if method == "logit_normal":
        return mx.sigmoid(logit_mean + logit_std * mx.random.normal(shape=(batch,), key=key))
    if method == "shifted":
        u = mx.random.uniform(shape=(batch,), key=key)
        return shift * u / (1.0 + (shift - 1.0) * u)
    raise ValueError(f"unknown sigma sampling {method!r}; use one of {', '.join(SIGMA_SAMPLING)}")


def noisy_latents(x0: mx.array, noise: mx.array, sigma: mx.array) -> mx.array:
    """x_σ = (1−σ)·x0 + σ·ε with σ broadcast over (B, C, H, W)."""
    s = sigma.reshape(-1, 1, 1, 1).astype(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def flow_matching_loss(
    model: Callable, x0: mx.array, cap_feats: Sequence[mx.array], sigma: mx.array, noise: mx.array
) -> mx.array:
    """Mean squared error between the negated model output and ε − x0 (in float32)."""
    x_sigma = noisy_latents(x0, noise, sigma)
    out = model(x_sigma, (1.0 - sigma).astype(x0.dtype), list(cap_feats))
    residual = x0.astype(mx.float32) - out.astype(mx.float32) - noise.astype(mx.float32)
    return mx.mean(mx.square(residual))


def step_rng(seed: int, step: int, micro: int, purpose: int) -> np.random.Generator:
    """A NumPy generator that is a pure function of (seed, step, micro-batch, purpose): resuming at any
    step reproduces the same draws without carrying hidden RNG state."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(step), int(micro), int(purpose)])


def step_key(seed: int, step: int, micro: int) -> mx.array:
    """The MLX PRNG key for the noise and σ of one micro-batch (pure function of its position)."""
    words = step_rng(seed, step, micro, 1).integers(0, 2**32, size=2, dtype=np.uint64)
    return mx.array(words.astype(np.uint32))


def caption_dropout_mask(seed: int, step: int, micro: int, probabilities: Sequence[float]) -> list[bool]:
    """Which items of a micro-batch get the empty-prompt embedding (item i dropped with probability p_i).

    Training on empty captions some of the time keeps the unconditional prediction good, which CFG needs."""
    draws = step_rng(seed, step, micro, 2).random(len(probabilities))
    return [bool(d < p) for d, p in zip(draws, probabilities, strict=True)]
