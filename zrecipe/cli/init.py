"""`zrecipe init DIR [--tiny]`: scaffold a project with a commented recipe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import typer

REAL = dict(model="z-image", resolution=1024, trigger="mystyle", max_steps=2000, batch_size=4,
            learning_rate="1.0e-4", blocks=30, rank=32, checkpoint_frequency=500,
            sample_prompt="a portrait of a woman in a garden", sample_steps=50, sample_size=1024)  # fmt: skip
TINY = dict(model="tiny", resolution=64, trigger="zshapes", max_steps=40, batch_size=2,
            learning_rate="1.0e-3", blocks=2, rank=8, checkpoint_frequency=20,
            sample_prompt="a red circle on a orange background", sample_steps=8, sample_size=64)  # fmt: skip


def init_cmd(
    directory: Path = typer.Argument(..., help="Project folder to create (must not hold a recipe.yaml)."),
    tiny: bool = typer.Option(False, "--tiny", help="Use the tiny test model and write 12 sample images."),
) -> None:
    """Create a project folder with a commented recipe.yaml and a data/ folder."""
    from zrecipe.errors import UserError, os_problem

    recipe = directory / "recipe.yaml"
    template = resources.files("zrecipe").joinpath("templates/recipe.yaml").read_text(encoding="utf-8")
    try:
        if recipe.exists():
            raise UserError(f"{recipe} already exists; choose another folder or edit that recipe.")
        (directory / "data").mkdir(parents=True, exist_ok=True)
        recipe.write_text(template.format(**(TINY if tiny else REAL)), encoding="utf-8")
        if tiny:
            from zrecipe.data.synthetic import write_shapes_dataset

            write_shapes_dataset(directory / "data")
    except OSError as exc:
        raise os_problem(exc, "init: cannot create the project in", "choose another folder") from exc
    if tiny:
        typer.echo(f"wrote {recipe} and 12 images in {directory / 'data'}; run: zrecipe build {recipe}")
    else:
        typer.echo(
            f"wrote {recipe}; put images (+ .txt captions) in {directory / 'data'}, then: zrecipe build {recipe}"
        )


def register(app: typer.Typer) -> None:
    app.command("init")(init_cmd)
