"""Masked loss and per-dataset loss weights in Z-Image's objective: the formula against a PyTorch
implementation on the same tensors, bit-for-bit unchanged training without them, a bit-exact resume
with them, and the plan's examples digest that carries them into the train key."""

from __future__ import annotations

import dataclasses

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.models.z_image.training import FlowMatchingObjective, element_weights, flow_matching_loss
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.training.data import Example, dataset_fingerprint

torch = pytest.importorskip("torch")


def examples_with(n: int = 4, masks: bool = True, weights=(1.0, 2.5), seed: int = 0, h: int = 8, w: int = 8):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        latents = rng.standard_normal((16, h, w)).astype(np.float32)
        caption = rng.standard_normal((3 + i, 32)).astype(np.float32)
        mask = (
            rng.uniform(0.0, 1.0, (h, w)).astype(np.float32) * (rng.uniform(size=(h, w)) > 0.3)
            if masks
            else None
        )
        out.append(
            Example(latents, caption, (h, w), dataset=f"d{i % 2}", loss_weight=weights[i % 2], mask=mask)
        )
    return out


def test_the_weighted_masked_loss_is_the_documented_formula():
    """(1/B)·Σ_i w_i·Σ_chw m_i·r_i² / (C·Σ_hw m_i), written directly in PyTorch, on the same tensors."""
    examples = examples_with(masks=True)
    examples[3] = dataclasses.replace(examples[3], mask=None)  # an unmasked item among masked ones
    rng = np.random.default_rng(9)
    x0 = np.stack([e.latents for e in examples])
    out, noise = (rng.standard_normal(x0.shape).astype(np.float32) for _ in range(2))
    sigma = np.linspace(0.2, 0.8, len(examples)).astype(np.float32)

    def model(x, t, caps):  # a stand-in network: the formula is what is checked
        return mx.array(out)

    got = flow_matching_loss(model, mx.array(x0), [mx.array(e.caption) for e in examples], mx.array(sigma),
                             mx.array(noise), element_weights(examples, range(len(examples)))).item()  # fmt: skip
    r = torch.from_numpy(x0) - torch.from_numpy(out) - torch.from_numpy(noise)
    per_item = []
    for i, e in enumerate(examples):
        m = torch.ones(8, 8) if e.mask is None else torch.from_numpy(e.mask)
        per_item.append(e.loss_weight * (m[None] * r[i] ** 2).sum() / (r.shape[1] * m.sum()))
    expected = torch.stack(per_item).mean().item()
    assert abs(got - expected) <= 1e-6 * abs(expected)
    unweighted = torch.mean(r**2).item()
    assert abs(got - unweighted) > 0.05 * unweighted  # the weights and masks do change the loss


def test_items_without_weight_or_mask_keep_their_loss_bit_for_bit():
    examples = examples_with(masks=False, weights=(1.0, 1.0))
    x0 = mx.array(np.stack([e.latents for e in examples]))
    out = mx.random.normal(x0.shape, key=mx.random.key(1))
    noise = mx.random.normal(x0.shape, key=mx.random.key(2))
    caps, sigma = [mx.array(e.caption) for e in examples], mx.array([0.3, 0.5, 0.7, 0.9])
    plain = flow_matching_loss(lambda *a: out, x0, caps, sigma, noise)
    weighted = flow_matching_loss(lambda *a: out, x0, caps, sigma, noise, element_weights(examples, range(4)))
    assert np.array(plain).tobytes() == np.array(weighted).tobytes()
    # a dataset weight of 2 doubles its items' loss exactly
    doubled = [dataclasses.replace(e, loss_weight=2.0) for e in examples]
    twice = flow_matching_loss(lambda *a: out, x0, caps, sigma, noise, element_weights(doubled, range(4)))
    assert twice.item() == 2 * plain.item()


def test_the_fingerprint_covers_weights_and_masks_only_when_set():
    plain = examples_with(masks=False, weights=(1.0, 1.0))
    legacy = [Example(e.latents, e.caption, e.bucket, e.dataset) for e in plain]
    assert dataset_fingerprint(plain) == dataset_fingerprint(legacy)
    weighted = examples_with(masks=False)
    masked = examples_with(masks=True, weights=(1.0, 1.0))
    assert len({dataset_fingerprint(x) for x in (plain, weighted, masked)}) == 3


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("weights") / "tiny")


def test_training_with_masks_and_weights_resumes_bit_exactly(tiny_path, tmp_path):
    from test_training import _assert_identical, _tensors, quiet_train, settings

    n = 6
    cfg = settings("lora", n, gradient_accumulation_steps=2, checkpoint_frequency=n // 2)
    model = load_transformer(tiny_path, dtype="float32")
    cap = model.config.cap_feat_dim
    examples = [dataclasses.replace(e, caption=np.ones((3 + i, cap), np.float32) * 0.1, caption_dropout=0.5)
                for i, e in enumerate(examples_with(n=6))]  # fmt: skip
    empty = np.zeros((3, cap), np.float32)
    straight = quiet_train(model, examples, empty, cfg, tmp_path / "straight", "tiny")
    half = tmp_path / "straight" / "checkpoints" / f"{n // 2:07d}_checkpoint.zip"
    resumed = quiet_train(load_transformer(tiny_path, dtype="float32"), examples, empty, cfg,
                          tmp_path / "resumed", "tiny", resume_from=half)  # fmt: skip
    for member in ("adapter", "optimizer"):
        _assert_identical(_tensors(straight.checkpoint, member), _tensors(resumed.checkpoint, member))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    # the masks and weights are what was trained: without them the same run is another run
    bare = [dataclasses.replace(e, mask=None, loss_weight=1.0) for e in examples]
    other = quiet_train(
        load_transformer(tiny_path, dtype="float32"), bare, empty, cfg, tmp_path / "bare", "tiny"
    )
    assert other.history[0]["loss"] != straight.history[0]["loss"]


def test_the_objective_batch_carries_the_weights_of_its_rows():
    examples = examples_with(masks=True)
    objective = FlowMatchingObjective(mx.zeros((1, 32)), 0, "uniform", 1.0, 0.0, 1.0, mx.float32)
    _, _, weights = objective.batch(examples, [2, 1], step=0, micro=0)
    expected = np.stack([e.loss_weight * e.mask / e.mask.mean() for e in (examples[2], examples[1])])[:, None]
    assert weights.shape == (2, 1, 8, 8) and np.abs(np.array(weights) - expected).max() < 1e-5


# --- in the plan: the examples digest ----------------------------------------------------------------


def test_the_examples_digest_is_unchanged_without_the_new_fields_and_names_them_when_set():
    from zrecipe.pipeline.graph import TrainItem

    item = TrainItem("d/a.png", "t:1", "d", 2, 0.1)
    assert item.line() == "d/a.png\tt:1\td\t2\t0.1"  # the digest line of earlier versions
    assert TrainItem("d/a.png", "t:1", "d", 2, 0.1, 2.5, True, True).line() == (
        "d/a.png\tt:1\td\t2\t0.1\tloss_weight=2.5\tmask=True\tholdout=True"
    )
