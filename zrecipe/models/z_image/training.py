"""Z-Image's training objective: flow matching (DESIGN §5), σ sampling, caption dropout and batch collation.

x_σ = (1−σ)·x0 + σ·ε; the model sees time t = 1−σ and outputs ≈ x0 − ε; the pipeline negates it to get the
velocity ε − x0, so the loss is mean((x0 + (−out) − ε)²) — the seed's ||clean + predicted − noise||².

`FlowMatchingObjective` is what `zrecipe.training.train` calls (the `Objective` protocol): the loop never
touches latents, captions or σ itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from zrecipe.training.rng import step_rng

SIGMA_SAMPLING = ("shifted", "uniform", "logit_normal")
# The transformer's block groups, in call order; gradient checkpointing recomputes each of their blocks.
BLOCK_GROUPS = ("noise_refiner", "context_refiner", "layers")


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
    model: Callable,
    x0: mx.array,
    cap_feats: Sequence[mx.array],
    sigma: mx.array,
    noise: mx.array,
    weights: mx.array | None = None,
) -> mx.array:
    """Mean squared error between the negated model output and ε − x0 (in float32). `weights` (B, 1, h, w)
    multiplies each element's squared error first (see `loss_weights`: per-item weights, masks)."""
    x_sigma = noisy_latents(x0, noise, sigma)
    out = model(x_sigma, (1.0 - sigma).astype(x0.dtype), list(cap_feats))
    residual = x0.astype(mx.float32) - out.astype(mx.float32) - noise.astype(mx.float32)
    squared = mx.square(residual)
    if weights is not None:
        squared = squared * weights
    return mx.mean(squared)


def loss_weights(examples: Sequence[Any], indices: Sequence[int], dataset_weight: bool = True) -> mx.array:
    """(B, 1, h, w) float32 weights of the squared errors: item i's dataset `loss_weight` w_i times its
    mask m_i over the mask's mean, so the batch loss is (1/B)·Σ_i w_i·Σ_chw m_i·r_i² / (C·Σ_hw m_i): each
    item's masked mean (normalised by its mask's sum, as OneTrainer's `normalize_masked_area_loss`; kohya
    multiplies without normalising, which makes a small subject's gradient small), weighted by its dataset
    and averaged over the batch (not normalised by Σ w_i, so a weight counts with any batch size). Items with neither weigh 1.0 everywhere, which leaves
    their squared errors bit-for-bit unchanged."""
    import numpy as np

    rows = []
    for i in indices:
        e = examples[i]
        h, w = np.shape(e.latents)[-2:]
        weight = float(e.loss_weight) if dataset_weight else 1.0
        if e.mask is None:
            rows.append(np.full((1, h, w), weight, np.float32))
        else:
            mask = np.asarray(e.mask, dtype=np.float32)
            rows.append((weight * mask / mask.mean(dtype=np.float64)).astype(np.float32)[None])
    return mx.array(np.stack(rows))


def caption_dropout_mask(seed: int, step: int, micro: int, probabilities: Sequence[float]) -> list[bool]:
    """Which items of a micro-batch get the empty-prompt embedding (item i dropped with probability p_i).

    Training on empty captions some of the time keeps the unconditional prediction good, which CFG needs."""
    draws = step_rng(seed, step, micro, 2).random(len(probabilities))
    return [bool(d < p) for d, p in zip(draws, probabilities, strict=True)]


def collate(examples: Sequence[Any], indices: Sequence[int], drop: Sequence[bool], empty: Any):
    """(latents (B,16,h,w) mx.array, [caption (L_i, D)]) with dropped captions replaced by `empty`."""
    latents = mx.stack([mx.array(examples[i].latents, dtype=mx.float32) for i in indices])
    captions = [mx.array(empty if d else examples[i].caption) for i, d in zip(indices, drop, strict=True)]
    return latents, captions


@dataclass(frozen=True, eq=False)
class FlowMatchingObjective:
    """Z-Image's batch preparation and loss for `zrecipe.training.train` (see `Objective`).

    Examples are `zrecipe.training.data.Example`s: latents (16, h, w) in model space, a caption embedding
    (L, D) and the item's caption-dropout probability. `empty_caption` replaces dropped captions."""

    empty_caption: mx.array
    seed: int
    sigma_sampling: str
    shift: float
    logit_mean: float
    logit_std: float
    dtype: Any  # the compute dtype the batch is cast to (the transformer's)

    @classmethod
    def from_settings(cls, settings: Any, empty_embedding: Any) -> FlowMatchingObjective:
        """The objective a `TrainSettings` describes (seed, σ sampling, shift, compute dtype)."""
        from zrecipe.backend import resolve_dtype

        return cls(
            mx.array(empty_embedding),
            int(settings.seed),
            settings.sigma_sampling,
            settings.shift,
            settings.logit_mean,
            settings.logit_std,
            resolve_dtype(settings.compute_dtype),  # `auto`: fp32 on the CPU, bf16 on a GPU
        )

    def batch(self, examples: Sequence[Any], indices: list[int], step: int, micro: int, share=None):
        """(latents, captions, loss weights) of this rank's rows; dropout is drawn per global item, then
        sliced."""
        drop = caption_dropout_mask(self.seed, step, micro, [examples[i].caption_dropout for i in indices])
        if share is not None:
            indices, drop = indices[share.start : share.stop], drop[share.start : share.stop]
        x0, caps = collate(examples, indices, drop, self.empty_caption)
        return x0.astype(self.dtype), [c.astype(self.dtype) for c in caps], loss_weights(examples, indices)

    def loss(self, model: Callable, batch, key: mx.array, share=None) -> mx.array:
        """Flow-matching loss with σ and noise drawn from `key` for the global batch (then sliced)."""
        x0, caps, weights = batch
        sigma_key, noise_key = mx.random.split(key)
        n = x0.shape[0] if share is None else share.n_global
        sigma = sample_sigmas(sigma_key, n, self.sigma_sampling, self.shift, self.logit_mean, self.logit_std)
        noise = mx.random.normal((n, *x0.shape[1:]), key=noise_key).astype(x0.dtype)
        if share is None:
            return flow_matching_loss(model, x0, caps, sigma, noise, weights)
        start, stop = share.start, share.start + x0.shape[0]
        return flow_matching_loss(model, x0, caps, sigma[start:stop], noise[start:stop], weights)

    def validation_loss(self, model: Callable, example: Any, sigma: float, noise: Any) -> mx.array:
        """The loss of `example` alone at noise level `sigma` with the given `noise` (its latents' shape):
        the caption is never dropped and the mask applies, the dataset's loss weight does not (validation
        measures the model, not the training mix)."""
        x0 = mx.array(example.latents, dtype=mx.float32)[None].astype(self.dtype)
        caps = [mx.array(example.caption).astype(self.dtype)]
        eps = mx.array(noise, dtype=mx.float32)[None].astype(self.dtype)
        weights = loss_weights([example], [0], dataset_weight=False)
        return flow_matching_loss(model, x0, caps, mx.array([sigma], dtype=mx.float32), eps, weights)

    def checkpoint_blocks(self, model: Any) -> Iterable[Any]:
        """Every transformer block (noise refiner, context refiner, main layers)."""
        for group in BLOCK_GROUPS:
            yield from getattr(model, group, None) or []
