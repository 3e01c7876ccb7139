"""`training_loop.start_from` and `zrecipe train --train-checkpoint MFLUX.zip --train-config R`: a run that
continues another tool's training (its adapter, AdamW moments and step) or starts from any LoRA file.

The mflux zip is the fixture of tests/test_mflux_checkpoint.py (written as mflux 0.24 writes one), over
the tiny model's block layers so that a recipe can name the same targets.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image
from test_mflux_checkpoint import STEP, _mflux_zip

from zrecipe.cli.main import app, run_app
from zrecipe.lora.mflux_checkpoint import read_mflux_checkpoint
from zrecipe.training.checkpoint import list_checkpoints, read_checkpoint

SHAPES = {f"layers.{i}.attention.{t}": (64, 64, 4, 8.0) for i in (0, 1) for t in ("to_q", "to_out.0")}
TARGETS = [
    {
        "module_path": f"layers.{{block}}.attention.{t}",
        "blocks": {"start": 0, "end": 2},
        "rank": 4,
        "alpha": 8.0,
    }
    for t in ("to_q", "to_out.0")
]


def _recipe(tmp_path, tiny_model, rank: int = 4, steps: int = STEP + 2, extra: str = "") -> str:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (64, 64), colour).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a {colour} square")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"""model: {tiny_model}
seed: 3
datasets: [{{path: images, resolution: 64}}]
training_loop: {{max_steps: {steps}, batch_size: 1{extra}}}
optimizer: {{learning_rate: 0.001}}
lora:
  rank: {rank}
  alpha: 8
  targets: [{{blocks: layers, layer_types: [attention.to_q, attention.to_out.0]}}]
save: {{checkpoint_frequency: 1, output_path: out}}
"""
    )
    return str(recipe)


@pytest.fixture(scope="module")
def mflux_zip(tmp_path_factory):
    return _mflux_zip(tmp_path_factory.mktemp("start_zip"), shapes=SHAPES, targets=TARGETS)


def test_train_continues_an_mflux_run(tmp_path, tiny_model, mflux_zip, capsys):
    zip_path, _, _ = mflux_zip
    recipe = _recipe(tmp_path, tiny_model)
    cache = str(tmp_path / "cache")
    args = ["train", "--train-checkpoint", str(zip_path), "--train-config", recipe, "--cache", cache]
    assert run_app(app, args) == 0
    err = capsys.readouterr().err
    assert "mflux 0.24.0 training checkpoint (step 6)" in err and "AdamW's moments carry over" in err
    # The run went on from mflux's step: zrecipe's first checkpoint is step 7, its history starts with
    # mflux's losses, and its first checkpoint's adapter moved on from mflux's (trained further).
    out = tmp_path / "out"
    steps = [int(p.name[:7]) for p in list_checkpoints(out)]
    assert steps == [STEP + 1, STEP + 2]
    first = read_checkpoint(out / "checkpoints" / f"{STEP + 1:07d}_checkpoint.zip")
    assert [h["step"] for h in first.loss] == list(range(1, STEP + 2))
    mflux = read_mflux_checkpoint(zip_path)
    assert [h["loss"] for h in first.loss[:STEP]] == [h["loss"] for h in mflux.loss]
    assert int(first.optimizer["step"].item()) == STEP + 1
    assert first.iterator["epoch"] == STEP // 3 and first.iterator["position"] == (STEP % 3) + 1
    key = "layers.0.attention.to_q.lora_B.weight"
    assert not np.array_equal(np.array(first.adapter[key]), np.array(mflux.adapter[key]))
    # A plain build of the same recipe is another run (the start file is part of the train key).
    capsys.readouterr()
    assert run_app(app, ["plan", recipe, "--cache", cache, "--until", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"]["train"]["stale"] == 1


def test_the_start_state_is_the_mflux_runs_state(tmp_path, tiny_model, mflux_zip):
    """Applied to a fresh run: the adapter is mflux's, the moments are mflux's, the step is mflux's."""
    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.recipe import LoraTarget, Optimizer
    from zrecipe.training.data import BatchIterator, Example
    from zrecipe.training.lora import adapter_tensors, apply_lora
    from zrecipe.training.optim import flatten_state, make_optimizer
    from zrecipe.training.start import apply_start, read_start

    zip_path, _, state = mflux_zip
    model = load_transformer(tiny_model, dtype="float32")
    apply_lora(model, [LoraTarget("layers", 0, None, ("attention.to_q", "attention.to_out.0"), 4, 8.0)])
    optimizer = make_optimizer(Optimizer(learning_rate=1e-3), 10)
    optimizer.init(model.trainable_parameters())
    examples = [
        Example(np.zeros((16, 8, 8), np.float32), np.zeros((3, 8), np.float32), (8, 8)) for _ in range(3)
    ]
    iterator = BatchIterator(examples, 1, 0)
    start = read_start(zip_path)
    assert apply_start(start, model, optimizer, iterator, accumulation=1) == STEP
    mflux = read_mflux_checkpoint(zip_path)
    ours = adapter_tensors(model)
    for k, v in mflux.adapter.items():
        assert np.allclose(np.array(ours[k]), np.array(v)), k
    flat = flatten_state(optimizer)
    for path in SHAPES:
        for ab in "AB":
            for mv in "mv":
                assert mx.array_equal(
                    flat[f"{path}.lora_{ab.lower()}.{mv}"], state[f"transformer.{path}.lora_{ab}.{mv}"]
                )
    assert int(flat["step"].item()) == STEP
    # Six micro-batches of three per epoch drawn: the second epoch, finished.
    assert (iterator.epoch, iterator.position) == (1, 3)


def test_an_mflux_zip_needs_a_recipe(tmp_path, mflux_zip, capsys):
    zip_path, _, _ = mflux_zip
    assert run_app(app, ["train", "--train-checkpoint", str(zip_path)]) == 2
    assert "pass --train-config RECIPE as well" in capsys.readouterr().err


def test_targets_that_do_not_match_the_run_are_refused(tmp_path, tiny_model, mflux_zip, capsys):
    zip_path, _, _ = mflux_zip
    recipe = _recipe(tmp_path, tiny_model, rank=8)
    args = [
        "train",
        "--train-checkpoint",
        str(zip_path),
        "--train-config",
        recipe,
        "--cache",
        str(tmp_path / "c"),
    ]
    assert run_app(app, args) == 2
    err = capsys.readouterr().err
    assert "do not match the file's" in err and "rank 4 / alpha 8 in the file, 8 / 8 in the recipe" in err


def test_start_from_a_lora_file(tmp_path, tiny_model, mflux_zip, capsys):
    """Any LoRA file: the first step trains from its weights (step 0, fresh optimiser); its content is in
    the train key, its path is not."""
    from zrecipe.export.lora_formats import lora_from_tensors, write_lora

    zip_path, _, _ = mflux_zip
    lora = tmp_path / "start.safetensors"
    run = read_mflux_checkpoint(zip_path)
    write_lora(lora_from_tensors(run.adapter, {}), lora, "comfyui", "float32")
    recipe = _recipe(tmp_path, tiny_model, steps=2, extra=f", start_from: {lora}")
    cache = str(tmp_path / "cache")
    assert run_app(app, ["build", recipe, "--cache", cache, "--until", "train"]) == 0
    first = read_checkpoint(tmp_path / "out" / "checkpoints" / "0000001_checkpoint.zip")
    assert int(first.optimizer["step"].item()) == 1 and [h["step"] for h in first.loss] == [1]
    key = "layers.0.attention.to_q.lora_B.weight"
    moved = np.abs(np.array(first.adapter[key]) - np.array(run.adapter[key])).max()
    assert 0 < moved < 0.01  # one AdamW step at lr 1e-3 from the file's weights, not from B = 0
    # The same bytes elsewhere: the same key (cached); other bytes: another key.
    moved_file = tmp_path / "elsewhere.safetensors"
    moved_file.write_bytes(lora.read_bytes())
    (tmp_path / "r.yaml").write_text((tmp_path / "r.yaml").read_text().replace(str(lora), str(moved_file)))
    capsys.readouterr()
    assert run_app(app, ["plan", recipe, "--cache", cache, "--until", "train", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"]["train"]["stale"] == 0
