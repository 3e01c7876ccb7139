"""`zrecipe init`: the scaffolded recipe is written from its template and loads as a recipe."""

from __future__ import annotations

import pytest

from zrecipe.cli.main import app, run_app
from zrecipe.recipe import load_recipe


@pytest.mark.parametrize("tiny", [True, False], ids=["tiny", "real"])
def test_init_writes_a_recipe_that_loads(tmp_path, tiny, capsys):
    project = tmp_path / "proj"
    assert run_app(app, ["init", str(project), *(["--tiny"] if tiny else [])]) == 0
    text = (project / "recipe.yaml").read_text()
    assert "{base: z-image, transformer:" in text  # the ComfyUI-files comment, braces kept literally
    recipe = load_recipe(project / "recipe.yaml")
    assert (recipe.model == "tiny") == tiny
    images = [p for p in (project / "data").iterdir() if p.suffix in (".png", ".jpg")]
    assert len(images) == (12 if tiny else 0)


def test_init_tiny_project_plans(tmp_path, capsys):
    project = tmp_path / "proj"
    assert run_app(app, ["init", str(project), "--tiny"]) == 0
    assert run_app(app, ["plan", str(project / "recipe.yaml")]) == 0
