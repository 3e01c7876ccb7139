"""Validation: the hold-out split (stable by content, in the train key), the validation loss against a
direct NumPy computation and against diffusers' Z-Image transformer with the loss written in PyTorch,
training bit-identical with and without it, a bit-exact resume with it on, and the build's loss.json /
loss.png / explain."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.models.z_image.training import FlowMatchingObjective
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.pipeline.graph import holdout
from zrecipe.recipe.schema import Validation
from zrecipe.training.validation import ValidationLoss, validation_noise

REPO = Path(__file__).resolve().parent.parent


def test_the_split_depends_on_each_image_alone():
    hashes = [f"{i:032x}" for i in range(4000)]
    held = [h for h in hashes if holdout(h, 0.1)]
    assert 330 < len(held) < 470  # ≈ 10 %
    assert all(holdout(h, 0.1) for h in held)  # a pure function of the hash
    assert set(held) <= {h for h in hashes if holdout(h, 0.2)}  # a larger fraction only adds images


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("validation") / "tiny")


def examples_for(cap: int, n: int = 5, masked: bool = True):
    from test_training import make_examples

    examples = make_examples(cap, n=n, seed=4)
    if masked:  # one masked example: validation applies masks
        mask = np.zeros((8, 8), np.float32)
        mask[:, :5] = 1.0
        examples[1] = type(examples[1])(**{**examples[1].__dict__, "mask": mask, "key": "k1"})
    return examples


def objective_for(settings):
    from zrecipe.models.z_image.tiny import TEXT_HIDDEN

    return FlowMatchingObjective.from_settings(settings, np.zeros((2, TEXT_HIDDEN), np.float32))


def test_the_validation_loss_is_the_flow_matching_mse_at_fixed_sigma_and_noise(tiny_path):
    from test_training import settings

    model = load_transformer(tiny_path, dtype="float32")
    examples = examples_for(model.config.cap_feat_dim)
    validation = Validation(fraction=0.5, sigmas=(0.2, 0.6, 0.9), seed=7)
    callback = ValidationLoss(examples, objective_for(settings("lora", 1)), validation, 10)
    got = callback.measure(model)
    expected = []
    for sigma in validation.sigmas:
        losses = []
        for index, e in enumerate(examples):
            noise = validation_noise(7, e, index, sigma)
            x0 = e.latents.astype(np.float64)
            x = ((1 - sigma) * x0 + sigma * noise).astype(np.float32)
            out = np.array(
                model(mx.array(x[None]), mx.array([1 - sigma], dtype=mx.float32), [mx.array(e.caption)])
            )[0]
            sq = (x0 - out - noise) ** 2
            m = np.ones((8, 8)) if e.mask is None else e.mask
            losses.append((sq * m).sum() / (sq.shape[0] * m.sum()))
        expected.append(np.mean(losses))
    assert np.allclose(got, expected, rtol=5e-6, atol=0)  # measured 4.5e-7
    # the noise is fixed per (seed, item, σ): another σ or item or seed draws other noise; the set does not matter
    a = validation_noise(7, examples[1], 1, 0.2)
    assert np.array_equal(a, validation_noise(7, examples[1], 5, 0.2))  # keyed items: not by position
    for other in (validation_noise(7, examples[1], 1, 0.6), validation_noise(8, examples[1], 1, 0.2),
                  validation_noise(7, examples[2], 2, 0.2)):  # fmt: skip
        assert not np.array_equal(a, other)


def test_the_validation_loss_matches_diffusers_and_the_loss_in_torch(tiny_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from test_training import settings

    reference = diffusers.ZImageTransformer2DModel.from_pretrained(tiny_path / "transformer").eval()
    model = load_transformer(tiny_path, dtype="float32")
    objective = objective_for(settings("lora", 1))
    examples = examples_for(model.config.cap_feat_dim, n=3)
    for index, e in enumerate(examples):
        for sigma in (0.15, 0.5, 0.85):
            noise = validation_noise(3, e, index, sigma)
            ours = objective.validation_loss(model, e, sigma, noise).item()
            x0, eps = torch.from_numpy(np.asarray(e.latents)), torch.from_numpy(noise)
            x = (1 - sigma) * x0 + sigma * eps
            with torch.no_grad():
                out = reference([x[:, None]], torch.tensor([1 - sigma]), [torch.from_numpy(e.caption)],
                                return_dict=False)[0][0][:, 0]  # fmt: skip
            m = torch.ones(8, 8) if e.mask is None else torch.from_numpy(e.mask)
            expected = ((m[None] * (x0 - out - eps) ** 2).sum() / (x0.shape[0] * m.sum())).item()
            assert abs(ours - expected) <= 2e-5 * expected, (index, sigma, ours, expected)  # measured 1.4e-6


def _train(tiny_path, out, validation=None, resume_from=None, steps=6):
    from test_training import quiet_train, settings

    model = load_transformer(tiny_path, dtype="float32")
    cap = model.config.cap_feat_dim
    cfg = settings(
        "lora", steps, gradient_accumulation_steps=2, checkpoint_frequency=3, validation=validation
    )
    train_set, held = examples_for(cap, n=6)[:4], examples_for(cap, n=6)[4:]
    callbacks = [] if validation is None else [ValidationLoss(held, objective_for(cfg), validation, 3)]
    return quiet_train(model, train_set, np.zeros((3, cap), np.float32), cfg, out, "tiny", callbacks=callbacks,
                       **({} if resume_from is None else {"resume_from": resume_from}))  # fmt: skip


def test_training_is_bit_identical_with_and_without_validation_and_resumes_exactly(tiny_path, tmp_path):
    from test_training import _assert_identical

    validation = Validation(fraction=0.3, sigmas=(0.3, 0.7), seed=1)
    plain = _train(tiny_path, tmp_path / "plain")
    validated = _train(tiny_path, tmp_path / "validated", validation)
    _assert_identical(mx.load(str(plain.final_path)), mx.load(str(validated.final_path)))
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in validated.history]
    measured = [h["step"] for h in validated.history if "val_loss" in h]
    assert measured == [3, 6] and all(
        len(h["val_loss_by_sigma"]) == 2 for h in validated.history if "val_loss" in h
    )
    # resumed from step 3 with validation on: the same adapter, losses and validation losses
    half = tmp_path / "validated" / "checkpoints" / "0000003_checkpoint.zip"
    resumed = _train(tiny_path, tmp_path / "resumed", validation, resume_from=half)
    _assert_identical(mx.load(str(validated.final_path)), mx.load(str(resumed.final_path)))
    untimed = [
        [{k: v for k, v in h.items() if k != "time"} for h in run.history] for run in (resumed, validated)
    ]
    assert untimed[0] == untimed[1]
    saved = json.loads((tmp_path / "resumed" / "loss.json").read_text())
    assert [h.get("val_loss") for h in saved] == [h.get("val_loss") for h in validated.history]


# --- in the build ------------------------------------------------------------------------------------

RECIPE = """\
model: {model}
seed: 3
cache: cache
datasets:
  - name: shapes
    path: data
    resolution: 64
training_loop: {{max_steps: 4, batch_size: 2}}
lora: {{rank: 4, targets: [{{blocks: layers, layer_types: [attention.to_q]}}]}}
save: {{checkpoint_frequency: 2, output_path: out}}
validation: {{fraction: {fraction}, sigmas: [0.4, 0.8]}}
"""


def project(tmp_path: Path, model, fraction=0.3, images: int = 8) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    for f in sorted((REPO / "recipes" / "data" / "tiny").iterdir())[: images * 2]:
        shutil.copy2(f, tmp_path / "data" / f.name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=model, fraction=fraction))
    return recipe


def train_items(recipe: Path):
    from zrecipe.pipeline import build_graph
    from zrecipe.recipe import load_recipe

    _, data = build_graph(load_recipe(recipe), recipe.parent / "cache")
    return {e.image: e.holdout for e in data.examples}


def test_the_build_writes_validation_into_loss_json_and_png_and_explain_names_the_split(
    tmp_path, tiny_path, capsys
):
    from zrecipe.cli.main import app, run_app

    recipe = project(tmp_path, tiny_path)
    split = train_items(recipe)
    assert 0 < sum(split.values()) < len(split)
    assert run_app(app, ["build", str(recipe), "--quiet"]) == 0
    history = json.loads((tmp_path / "out" / "loss.json").read_text())
    assert [h["step"] for h in history if "val_loss" in h] == [2, 4]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # adding images moves none of the others across the split
    for f in sorted((REPO / "recipes" / "data" / "tiny").iterdir())[16:]:
        shutil.copy2(f, tmp_path / "data" / f.name)
    grown = train_items(recipe)
    assert len(grown) > len(split) and all(grown[k] == v for k, v in split.items())
    # the split is in the train key: explain says which setting changed
    recipe.write_text(recipe.read_text().replace("fraction: 0.3", "fraction: 0.5"))
    capsys.readouterr()
    assert run_app(app, ["explain", str(recipe), "train"]) == 0
    assert "validation.fraction 0.3 → 0.5" in capsys.readouterr().out


def test_a_split_that_leaves_a_side_empty_is_refused(tmp_path, tiny_path):
    from zrecipe.errors import DatasetError

    recipe = project(tmp_path, tiny_path, fraction=0.001, images=3)
    with pytest.raises(DatasetError, match=r"`validation.fraction: 0.001` holds out none of the 3 images"):
        train_items(recipe)


def test_loss_png_draws_the_validation_loss_beside_the_training_loss(tmp_path):
    from PIL import Image

    from zrecipe.training.progress import plot_loss

    history = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)]
    plot_loss(tmp_path / "plain.png", history)
    for s in (5, 10):
        history[s - 1].update(val_loss=0.8 / s)
    plot_loss(tmp_path / "validated.png", history)

    def orange(path):
        pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3).astype(int)
        return int(((pixels[:, 0] > 200) & (abs(pixels[:, 1] - 120) < 30) & (pixels[:, 2] < 60)).sum())

    assert orange(tmp_path / "plain.png") == 0 and orange(tmp_path / "validated.png") > 50
