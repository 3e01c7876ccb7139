"""Z-Image's training objective: flow matching (DESIGN §5), σ sampling, loss weighting, noise offset,
caption dropout and batch collation.

x_σ = (1−σ)·x0 + σ·ε; the model sees time t = 1−σ and outputs ≈ x0 − ε; the pipeline negates it to get the
velocity ε − x0, so the loss is mean((x0 + (−out) − ε)²) — the seed's ||clean + predicted − noise||².

Loss weighting (`training_loop.loss_weighting`, SD3's family as diffusers' `compute_loss_weighting_for_sd3`
writes it) multiplies each item's mean squared error by w(σ) before the batch mean; `logit_normal` weights
by the logit-normal density of σ (what `sigma_sampling: logit_normal` samples from, diffusers'
`compute_density_for_timestep_sampling`), so uniform σ with that weight has logit-normal sampling's
expected loss. The noise offset (`training_loop.noise_offset`, diffusers' training scripts) adds
offset·n to ε with n ~ N(0, 1) per item and channel, constant over the image; n is drawn per global item
from the step's position (`rng.step_rng` purpose 3), so a resumed run draws the same numbers.

`FlowMatchingObjective` is what `zrecipe.training.train` calls (the `Objective` protocol): the loop never
touches latents, captions or σ itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from zrecipe.training.rng import step_rng

SIGMA_SAMPLING = ("shifted", "uniform", "logit_normal")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap", "logit_normal")
NOISE_OFFSET_PURPOSE = 3  # rng.step_rng purpose of the noise offset draws (2 is caption dropout)
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


def loss_weights(
    sigma: mx.array, method: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0
) -> mx.array | None:
    """Per-item loss weight w(σ) in float32, None for `none`: `sigma_sqrt` σ⁻², `cosmap`
    2 / (π(1 − 2σ + 2σ²)), `logit_normal` the density 1/(s√(2π)) · 1/(σ(1−σ)) · exp(−(logit σ − m)²/(2s²))."""
    sigma = sigma.astype(mx.float32)
    if method == "none":
        return None
    if method == "sigma_sqrt":
        return 1.0 / mx.square(sigma)
    if method == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * mx.square(sigma)))
    if method == "logit_normal":
        z = (mx.log(sigma) - mx.log1p(-sigma) - logit_mean) / logit_std
        return mx.exp(-0.5 * mx.square(z)) / (logit_std * math.sqrt(2 * math.pi) * sigma * (1.0 - sigma))
    raise ValueError(f"unknown loss weighting {method!r}; use one of {', '.join(LOSS_WEIGHTING)}")


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
    """Mean squared error between the negated model output and ε − x0 (in float32). `weights` multiplies
    each element's squared error first: (B,) per item (σ weighting) or (B, 1, h, w) per latent pixel
    (`element_weights`: dataset loss weights, masks), broadcast over the rest."""
    x_sigma = noisy_latents(x0, noise, sigma)
    out = model(x_sigma, (1.0 - sigma).astype(x0.dtype), list(cap_feats))
    residual = x0.astype(mx.float32) - out.astype(mx.float32) - noise.astype(mx.float32)
    squared = mx.square(residual)
    if weights is not None:
        if weights.ndim == 1:
            weights = weights.reshape(-1, 1, 1, 1)
        squared = squared * weights
    return mx.mean(squared)


def noise_offsets(seed: int, step: int, micro: int, items: int, channels: int, offset: float) -> mx.array:
    """offset · n, n ~ N(0, 1) of shape (items, channels, 1, 1): the noise offset of one micro-batch."""
    draws = step_rng(seed, step, micro, NOISE_OFFSET_PURPOSE).standard_normal((items, channels, 1, 1))
    return mx.array((offset * draws).astype(np.float32))


def element_weights(examples: Sequence[Any], indices: Sequence[int], dataset_weight: bool = True) -> mx.array:
    """(B, 1, h, w) float32 weights of the squared errors: item i's dataset `loss_weight` w_i times its
    mask m_i over the mask's mean, so the batch loss is (1/B)·Σ_i w_i·Σ_chw m_i·r_i² / (C·Σ_hw m_i): each
    item's masked mean (normalised by its mask's sum, as OneTrainer's `normalize_masked_area_loss`; kohya
    multiplies without normalising, which makes a small subject's gradient small), weighted by its dataset
    and averaged over the batch (not normalised by Σ w_i, so a weight counts with any batch size). Items with
    neither weigh 1.0 everywhere, which leaves their squared errors bit-for-bit unchanged."""
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
    loss_weighting: str = "none"
    noise_offset: float = 0.0

    @classmethod
    def from_settings(cls, settings: Any, empty_embedding: Any) -> FlowMatchingObjective:
        """The objective a `TrainSettings` describes (seed, σ sampling, shift, compute dtype, loss weighting,
        noise offset)."""
        from zrecipe.backend import resolve_dtype

        return cls(
            mx.array(empty_embedding),
            int(settings.seed),
            settings.sigma_sampling,
            settings.shift,
            settings.logit_mean,
            settings.logit_std,
            resolve_dtype(settings.compute_dtype),  # `auto`: fp32 on the CPU, bf16 on a GPU
            settings.loss_weighting,
            float(settings.noise_offset),
        )

    def batch(self, examples: Sequence[Any], indices: list[int], step: int, micro: int, share=None):
        """(latents, captions, element weights) of this rank's rows, plus their noise offsets (B, C, 1, 1)
        when the offset is on; dropout and offsets are drawn per global item, then sliced."""
        drop = caption_dropout_mask(self.seed, step, micro, [examples[i].caption_dropout for i in indices])
        n_global = len(indices)
        if share is not None:
            indices, drop = indices[share.start : share.stop], drop[share.start : share.stop]
        x0, caps = collate(examples, indices, drop, self.empty_caption)
        batch = (
            x0.astype(self.dtype),
            [c.astype(self.dtype) for c in caps],
            element_weights(examples, indices),
        )
        if not self.noise_offset:
            return batch
        offsets = noise_offsets(self.seed, step, micro, n_global, x0.shape[1], self.noise_offset)
        if share is not None:
            offsets = offsets[share.start : share.stop]
        return (*batch, offsets.astype(self.dtype))

    def loss(self, model: Callable, batch, key: mx.array, share=None) -> mx.array:
        """Flow-matching loss with σ and noise drawn from `key` for the global batch (then sliced)."""
        x0, caps, weights = batch[:3]
        sigma_key, noise_key = mx.random.split(key)
        n = x0.shape[0] if share is None else share.n_global
        sigma = sample_sigmas(sigma_key, n, self.sigma_sampling, self.shift, self.logit_mean, self.logit_std)
        noise = mx.random.normal((n, *x0.shape[1:]), key=noise_key).astype(x0.dtype)
        if share is not None:
            start, stop = share.start, share.start + x0.shape[0]
            sigma, noise = sigma[start:stop], noise[start:stop]
        if len(batch) > 3:  # the noise offset, already this rank's rows
            noise = noise + batch[3]
        per_sigma = loss_weights(sigma, self.loss_weighting, self.logit_mean, self.logit_std)
        if per_sigma is not None:
            weights = weights * per_sigma.reshape(-1, 1, 1, 1)
        return flow_matching_loss(model, x0, caps, sigma, noise, weights)

    def validation_loss(self, model: Callable, example: Any, sigma: float, noise: Any) -> mx.array:
        """The loss of `example` alone at noise level `sigma` with the given `noise` (its latents' shape):
        the caption is never dropped and the mask applies, the dataset's loss weight does not (validation
        measures the model, not the training mix)."""
        x0 = mx.array(example.latents, dtype=mx.float32)[None].astype(self.dtype)
        caps = [mx.array(example.caption).astype(self.dtype)]
        eps = mx.array(noise, dtype=mx.float32)[None].astype(self.dtype)
        weights = element_weights([example], [0], dataset_weight=False)
        return flow_matching_loss(model, x0, caps, mx.array([sigma], dtype=mx.float32), eps, weights)

    def checkpoint_blocks(self, model: Any) -> Iterable[Any]:
        """Every transformer block (noise refiner, context refiner, main layers)."""
        for group in BLOCK_GROUPS:
            yield from getattr(model, group, None) or []
