"""Adapter kinds through the whole build on the tiny model: a LoKr + LoHa recipe (no `lora_*` key in its
files, which sampling and export must still take for an adapter) trains, samples and
exports; its files load in `zrecipe generate --lora-paths`; `zrecipe explain` names a changed kind option;
and recipes/lokr.yaml validates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from zrecipe.cli.main import app, run_app
from zrecipe.errors import RecipeError
from zrecipe.export.lora_formats import read_lora
from zrecipe.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent

RECIPE = """\
model: {model}
mode: lora
seed: 3
cache: {cache}
datasets:
  - name: shapes
    path: data
    resolution: 64
training_loop:
  max_steps: 2
  batch_size: 2
optimizer:
  learning_rate: 1.0e-3
lora:
  rank: 2
  dropout: 0.1
  targets:
    - blocks: layers
      layer_types: [attention.to_q, attention.to_v]
      kind: lokr
      factor: {factor}
    - blocks: layers
      layer_types: [feed_forward.w1]
      kind: loha
    - blocks: noise_refiner
      layer_types: [attention.to_k]
      kind: loha
save:
  checkpoint_frequency: 2
  output_path: out
sample:
  prompts: ["a red circle"]
  steps: 2
  width: 32
  height: 32
  seeds: [1]
export:
  formats: [comfyui, musubi]
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def zrecipe(*args) -> int:
    return run_app(app, [str(a) for a in args])


def test_kinds_build_sample_export_generate_and_explain(tmp_path, tiny_model, capsys):
    (tmp_path / "data").mkdir()
    for f in sorted((REPO / "recipes" / "data" / "tiny").iterdir())[:8]:
        shutil.copy2(f, tmp_path / "data" / f.name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model, cache=tmp_path / "cache", factor=4))
    assert zrecipe("build", recipe) == 0
    out = tmp_path / "out"
    adapter = read_lora(out / "adapter.safetensors")
    kinds = {path: d.KIND for path, d in adapter.deltas.items()}
    assert kinds["layers.0.attention.to_q"] == "lokr" and kinds["layers.1.feed_forward.w1"] == "loha"
    assert kinds["noise_refiner.0.attention.to_k"] == "loha"
    assert (out / "samples" / "contact_sheet.png").exists()  # sampling read the adapter as an adapter
    report = json.loads((out / "build-report.json").read_text())
    assert report["kinds"]["sample"]["ran"] == 1 and report["kinds"]["export"]["ran"] == 2

    for fmt in ("comfyui", "musubi"):
        exported = out / "exports" / f"recipe_{fmt}.safetensors"
        image = tmp_path / f"{fmt}.png"
        assert zrecipe("generate", "--prompt", "a red circle", "--model", tiny_model, "--steps", "2",
                       "--width", "32", "--height", "32", "--lora-paths", exported, "-o", image) == 0  # fmt: skip
        assert Image.open(image).size == (32, 32)

    recipe.write_text(RECIPE.format(model=tiny_model, cache=tmp_path / "cache", factor=8))
    capsys.readouterr()
    assert zrecipe("explain", recipe, "train") == 0
    assert "changed parameter: lora.targets" in capsys.readouterr().out


def test_recipe_lokr_example_validates():
    recipe = load_recipe(REPO / "recipes" / "lokr.yaml")
    (target,) = recipe.lora.targets
    assert (target.kind, target.factor, target.full_matrix, target.dropout) == ("lokr", 16, True, 0.05)
    assert set(recipe.export.formats) == {"comfyui", "diffusers"}


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"kind": "lorax"}, "did you mean `lora`"),
        ({"dropout": 1.0}, "must be less than 1"),
        ({"targets": [{"factor": 4}]}, "only LoKr reads `factor`"),
        ({"targets": [{"kind": "lokr", "factor": 0}]}, "must be -1"),
        ({"targets": [{"kind": "loha", "full_matrix": True}]}, "only LoKr reads `full_matrix`"),
        ({"factor": 4}, "it belongs in `targets`"),
    ],
)
def test_bad_kind_keys_are_recipe_errors_with_their_line(tmp_path, lora, message):
    (tmp_path / "data").mkdir()
    body = {"model": "tiny", "datasets": [{"path": "data"}], "training_loop": {"max_steps": 1}, "lora": lora}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(body))
    with pytest.raises(RecipeError, match=message) as err:
        load_recipe(recipe)
    assert f"{recipe}:1: lora." in str(err.value)
