"""Z-Image's loss options against diffusers: SD3's σ weightings (`compute_loss_weighting_for_sd3`), the
logit-normal density (`compute_density_for_timestep_sampling`), the SD3 scripts' weighted loss, and the
noise offset of diffusers' training scripts; deterministic per step, so a resumed run is bit-exact."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.models.z_image.training import (
    FlowMatchingObjective,
    flow_matching_loss,
    loss_weights,
    noise_offsets,
    sample_sigmas,
)
from zrecipe.training.data import Example
from zrecipe.training.distributed import Share

torch = pytest.importorskip("torch")
training_utils = pytest.importorskip("diffusers.training_utils")

SIGMAS = np.linspace(0.001, 0.999, 999).astype(np.float32)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none"])
def test_weights_are_diffusers_sd3_weightings(scheme):
    ours = loss_weights(mx.array(SIGMAS), scheme)
    theirs = training_utils.compute_loss_weighting_for_sd3(scheme, torch.tensor(SIGMAS)).numpy()
    if scheme == "none":
        assert ours is None and np.all(theirs == 1)  # unweighted: the loss of before, bit for bit
        return
    np.testing.assert_allclose(np.array(ours), theirs, rtol=1e-6)  # measured ≤ 1.2e-7


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_weight_is_the_density_diffusers_samples_from(mean, std):
    """w(σ) is the density of diffusers' logit-normal timestep sampling: it integrates to 1 and matches
    the histogram of 2e6 of its samples within 2% on every bin holding ≥ 1% of them."""
    generator = torch.Generator().manual_seed(0)
    samples = training_utils.compute_density_for_timestep_sampling(
        "logit_normal", 2_000_000, logit_mean=mean, logit_std=std, generator=generator
    ).numpy()
    edges = np.linspace(0, 1, 51)
    counts, _ = np.histogram(samples, bins=edges)
    histogram = counts / len(samples) / np.diff(edges)
    fine = np.linspace(1e-6, 1 - 1e-6, 200_001)
    density = np.array(loss_weights(mx.array(fine.astype(np.float32)), "logit_normal", mean, std))
    assert abs(np.trapezoid(density, fine) - 1) < 1e-4
    for i in np.nonzero(counts >= 0.01 * len(samples))[0]:
        inside = (fine >= edges[i]) & (fine < edges[i + 1])
        assert density[inside].mean() == pytest.approx(histogram[i], rel=0.02), i


def test_logit_normal_sampling_is_diffusers_density_sampling():
    """sigma_sampling: logit_normal draws from the distribution diffusers draws from (quantiles of 2e5
    samples agree within 0.005)."""
    ours = np.array(sample_sigmas(mx.random.key(1), 200_000, "logit_normal", logit_mean=0.3, logit_std=0.8))
    theirs = training_utils.compute_density_for_timestep_sampling(
        "logit_normal", 200_000, logit_mean=0.3, logit_std=0.8, generator=torch.Generator().manual_seed(1)
    ).numpy()
    q = np.linspace(0.01, 0.99, 99)
    assert np.abs(np.quantile(ours, q) - np.quantile(theirs, q)).max() < 0.005


class Recorder:
    """A stand-in transformer that returns a fixed output and remembers what it was given."""

    def __init__(self, out: np.ndarray):
        self.out, self.inputs = mx.array(out), None

    def __call__(self, x, t, caps):
        self.inputs = (np.array(x), np.array(t))
        return self.out


def examples(n: int = 4, c: int = 16, h: int = 4, w: int = 4) -> list[Example]:
    rng = np.random.default_rng(0)
    return [
        Example(
            rng.standard_normal((c, h, w)).astype(np.float32),
            rng.standard_normal((3, 8)).astype(np.float32),
            (h, w),
        )  # fmt: skip
        for _ in range(n)
    ]


def objective(**options) -> FlowMatchingObjective:
    base = dict(empty_caption=mx.zeros((1, 8)), seed=5, sigma_sampling="uniform", shift=1.0, logit_mean=0.0,
                logit_std=1.0, dtype=mx.float32)  # fmt: skip
    return FlowMatchingObjective(**{**base, **options})


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "logit_normal"])
def test_weighted_loss_is_the_sd3_scripts_loss(scheme):
    """The objective's loss equals the SD3 training scripts' expression
    mean_b(mean((w·(pred − target))²)) with pred = −out (the velocity) and target = ε − x0."""
    items = examples()
    goal = objective(loss_weighting=scheme)
    batch = goal.batch(items, [0, 1, 2, 3], step=2, micro=0)
    rng = np.random.default_rng(1)
    out = rng.standard_normal((4, 16, 4, 4)).astype(np.float32)
    key = mx.random.key(9)
    loss = goal.loss(Recorder(out), batch, key).item()
    sigma_key, noise_key = mx.random.split(key)
    sigma = sample_sigmas(sigma_key, 4, "uniform")
    noise = np.array(mx.random.normal((4, 16, 4, 4), key=noise_key))
    x0 = np.array(batch[0])
    s = torch.tensor(np.array(sigma)).reshape(-1, 1, 1, 1)
    weighting = (
        torch.tensor(np.array(loss_weights(sigma, "logit_normal"))).reshape(-1, 1, 1, 1)
        if scheme == "logit_normal"
        else training_utils.compute_loss_weighting_for_sd3(scheme, s)
    )
    pred, target = -torch.tensor(out), torch.tensor(noise - x0)
    reference = torch.mean((weighting.float() * (pred - target) ** 2).reshape(4, -1), 1).mean().item()
    assert loss == pytest.approx(reference, rel=1e-6)
    unweighted = objective().loss(Recorder(out), batch, key).item()
    assert (
        unweighted == pytest.approx(torch.mean((pred - target) ** 2).item(), rel=1e-6) and unweighted != loss
    )


def test_noise_offset_is_diffusers_offset_noise_drawn_per_step():
    """ε + offset·n with n ~ N(0, 1) of shape (B, C, 1, 1) (diffusers' train_text_to_image and friends),
    drawn from the step's position: the same numbers on every call, other numbers on other steps."""
    items = examples()
    goal = objective(noise_offset=0.1)
    batch = goal.batch(items, [0, 1, 2, 3], step=7, micro=1)
    assert len(batch) == 4 and batch[3].shape == (4, 16, 1, 1)
    expected = noise_offsets(5, 7, 1, 4, 16, 0.1)
    assert np.array_equal(np.array(batch[3]), np.array(expected))
    assert np.array_equal(np.array(goal.batch(items, [0, 1, 2, 3], 7, 1)[3]), np.array(expected))
    assert not np.array_equal(np.array(goal.batch(items, [0, 1, 2, 3], 8, 1)[3]), np.array(expected))
    many = np.array(noise_offsets(5, 0, 0, 4000, 16, 0.1))
    assert abs(many.std() - 0.1) < 0.005 and abs(many.mean()) < 0.005

    model, key = Recorder(np.zeros((4, 16, 4, 4), np.float32)), mx.random.key(3)
    goal.loss(model, batch, key)
    sigma_key, noise_key = mx.random.split(key)
    sigma = np.array(sample_sigmas(sigma_key, 4, "uniform")).reshape(-1, 1, 1, 1)
    noise = np.array(mx.random.normal((4, 16, 4, 4), key=noise_key)) + np.array(expected)
    np.testing.assert_allclose(
        model.inputs[0], (1 - sigma) * np.array(batch[0]) + sigma * noise, rtol=1e-6, atol=1e-6
    )
    # no offset: (latents, captions, element weights), the loss of before
    assert len(objective().batch(items, [0, 1, 2, 3], 7, 1)) == 3


def test_ranks_draw_the_offsets_and_weights_of_the_global_batch():
    """Two ranks' slices of the offsets and weighted loss are the single process's rows."""
    items = examples()
    goal = objective(noise_offset=0.2, loss_weighting="cosmap")
    whole = goal.batch(items, [0, 1, 2, 3], 3, 0)
    out = np.random.default_rng(2).standard_normal((4, 16, 4, 4)).astype(np.float32)
    key = mx.random.key(4)
    total = goal.loss(Recorder(out), whole, key).item()
    parts = 0.0
    for start, stop in ((0, 2), (2, 4)):
        share = Share(start, stop, 4, 0.5)
        part = goal.batch(items, [0, 1, 2, 3], 3, 0, share)
        assert np.array_equal(np.array(part[2]), np.array(whole[2])[start:stop])
        parts += 0.5 * goal.loss(Recorder(out[start:stop]), part, key, share).item()
    assert parts == pytest.approx(total, rel=1e-6)


def test_weighted_unweighted_losses_share_the_flow_matching_residual():
    x0 = mx.array(np.random.default_rng(3).standard_normal((2, 16, 2, 2)).astype(np.float32))
    noise = mx.zeros_like(x0)
    sigma = mx.array([0.3, 0.6])
    model = Recorder(np.zeros((2, 16, 2, 2), np.float32))
    plain = flow_matching_loss(model, x0, [], sigma, noise).item()
    ones = flow_matching_loss(model, x0, [], sigma, noise, mx.ones((2,))).item()
    assert plain == pytest.approx(ones, rel=1e-7)


def test_weighted_offset_training_resumes_bit_exactly(tmp_path):
    """On the tiny Z-Image (LoRA): N straight steps == N/2, resume, N/2 with loss weighting and the noise
    offset on."""
    from test_training import make_examples, quiet_train, settings

    from zrecipe.models.z_image.tiny import create_tiny_model
    from zrecipe.models.z_image.transformer import load_transformer

    tiny = create_tiny_model(tmp_path / "tiny")
    cfg = settings("lora", 4, checkpoint_frequency=2, loss_weighting="cosmap", noise_offset=0.1)
    transformer = load_transformer(tiny, dtype="float32")
    items = make_examples(transformer.config.cap_feat_dim, wide=2)
    empty = np.zeros((2, transformer.config.cap_feat_dim), np.float32)
    straight = quiet_train(transformer, items, empty, cfg, tmp_path / "a", "tiny")
    half = tmp_path / "a" / "checkpoints" / "0000002_checkpoint.zip"
    resumed = quiet_train(load_transformer(tiny, dtype="float32"), items, empty, cfg, tmp_path / "b", "tiny",
                          resume_from=half)  # fmt: skip
    assert straight.final_path.read_bytes() == resumed.final_path.read_bytes()
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
