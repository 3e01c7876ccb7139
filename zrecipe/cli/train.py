"""`zrecipe train --train-config CONFIG | --train-checkpoint ZIP` (also the seed's `mflux-train-z-image`).

The build graph up to `train` (`zrecipe build CONFIG --until train`): the same steps, keys and store, so it
trains exactly what `zrecipe build` trains, and publishes the adapter, checkpoints and loss files into
`save.output_path`. `--train-checkpoint` takes the recipe from the zip's config.json and resumes that
checkpoint; an mflux training checkpoint goes with `--train-config RECIPE` and is continued from it
(`training_loop.start_from`). A stop by Ctrl-C / SIGTERM / the battery limit writes a checkpoint first and exits with
EXIT_STOPPED and the command that resumes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from zrecipe.cli.download import OfflineOpt

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable


def stopped_line(stop, resume: str) -> str:
    """The one line printed when training stops on request: where, and how to go on."""
    return f"{stop}; resume with: {resume}"


def train(
    train_config: Path | None = typer.Option(
        None, "--train-config", help="Recipe or the seed's training config (YAML or JSON)."
    ),
    train_checkpoint: Path | None = typer.Option(
        None,
        "--train-checkpoint",
        help="Checkpoint zip to resume (its recipe is inside), or an mflux training checkpoint to continue "
        "(with --train-config).",
    ),
    low_ram: bool = typer.Option(
        False, "--low-ram", help="Release MLX's memory cache after every training step (values unchanged)."
    ),
    battery_limit: int | None = typer.Option(
        None,
        "--battery-percentage-stop-limit",
        "-B",
        min=1,
        max=100,
        help="Checkpoint and stop when the battery (discharging) reaches this percentage.",
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Store folder (default: `cache:` in the recipe, $ZRECIPE_CACHE, or cache/)."
    ),
    force: bool = typer.Option(False, "--force", help="Train from scratch (discard this run's checkpoints)."),
    offline: bool = OfflineOpt,
) -> None:
    """Train a LoRA or full fine-tune of Z-Image from a recipe, or resume a checkpoint."""
    from zrecipe.errors import UserError
    from zrecipe.lora.mflux_checkpoint import is_mflux_checkpoint
    from zrecipe.pipeline import TrainingStopped, train_recipe
    from zrecipe.recipe import load_recipe
    from zrecipe.training.session import recipe_from_checkpoint

    foreign = train_checkpoint is not None and is_mflux_checkpoint(train_checkpoint)
    if train_config is None and train_checkpoint is None:
        raise UserError("pass --train-config CONFIG, or --train-checkpoint ZIP to resume a checkpoint.")
    if train_config is not None and train_checkpoint is not None and not foreign:
        raise UserError(
            "--train-checkpoint resumes a zrecipe checkpoint with the recipe inside it: pass it alone "
            "(--train-config goes with another tool's checkpoint, which holds no zrecipe recipe)."
        )
    if force and train_checkpoint is not None:
        raise UserError("--force trains from scratch; it cannot be combined with --train-checkpoint.")
    resume = None
    if foreign:
        if train_config is None:
            raise UserError(
                f"{train_checkpoint}: an mflux training checkpoint; zrecipe continues it from a recipe that "
                "names the data and the same LoRA targets: pass --train-config RECIPE as well (its "
                "training_loop.start_from becomes this zip)."
            )
        recipe = _starting_from(load_recipe(train_config), train_checkpoint)
        typer.echo(f"continuing the mflux run in {train_checkpoint} with {train_config}", err=True)
    elif train_checkpoint is not None:
        recipe, checkpoint = recipe_from_checkpoint(train_checkpoint)
        resume = checkpoint.path
        typer.echo(f"resuming {resume} at step {checkpoint.step}", err=True)
    else:
        recipe = load_recipe(train_config)
    try:
        outcome = train_recipe(
            recipe, cache, checkpoint=resume, force=force, battery_limit=battery_limit, low_ram=low_ram
        )
    except TrainingStopped as stop:
        command = (
            Path(sys.argv[0]).name if Path(sys.argv[0]).name == "mflux-train-z-image" else "zrecipe train"
        )
        typer.echo(stopped_line(stop, f"{command} --train-checkpoint {stop.checkpoint}"), err=True)
        raise typer.Exit(EXIT_STOPPED) from None
    train_kind = outcome.report.kinds.get("train")
    if train_kind is not None and train_kind.ran == 0:
        typer.echo("train: up to date (this training run is already in the store)", err=True)
    for path in (outcome.published or {}).get("final", []):
        typer.echo(f"wrote {path}")


def _starting_from(recipe, checkpoint: Path):
    """`recipe` with `training_loop.start_from` = `checkpoint` (another tool's run to continue)."""
    import dataclasses

    loop = dataclasses.replace(recipe.training_loop, start_from=str(Path(checkpoint).expanduser().resolve()))
    return dataclasses.replace(recipe, training_loop=loop)


def register(app: typer.Typer) -> None:
    app.command("train")(train)
