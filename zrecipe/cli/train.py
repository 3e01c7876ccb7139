"""`zrecipe train --train-config CONFIG | --train-checkpoint ZIP` (also the seed's `mflux-train-z-image`).

Standalone training: encodes the recipe's images and captions itself, trains, writes checkpoint zips and
the final adapter. A stop by Ctrl-C / SIGTERM / the battery limit writes a checkpoint first and exits with
EXIT_STOPPED and the command that resumes it.
"""

from __future__ import annotations

from pathlib import Path

import typer

from zrecipe.cli.download import OfflineOpt

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable


def train(
    train_config: Path | None = typer.Option(
        None, "--train-config", help="Recipe or the seed's training config (YAML or JSON)."
    ),
    train_checkpoint: Path | None = typer.Option(
        None, "--train-checkpoint", help="Checkpoint zip to resume from (its recipe is inside)."
    ),
    low_ram: bool = typer.Option(
        False, "--low-ram", help="Drop the VAE and text encoder before training, tile the VAE, clear caches."
    ),
    battery_limit: int | None = typer.Option(
        None,
        "--battery-percentage-stop-limit",
        "-B",
        min=1,
        max=100,
        help="Checkpoint and stop when the battery (discharging) reaches this percentage.",
    ),
    cache: Path | None = typer.Option(None, "--cache", help="Cache folder (tiny model, stat cache)."),
    force: bool = typer.Option(
        False, "--force", help="Resume even though the dataset changed since the checkpoint."
    ),
    offline: bool = OfflineOpt,
) -> None:
    """Train a LoRA or full fine-tune of Z-Image from a recipe, or resume a checkpoint."""
    from zrecipe.errors import UserError
    from zrecipe.recipe import load_recipe
    from zrecipe.training.session import recipe_from_checkpoint, run_recipe

    if (train_config is None) == (train_checkpoint is None):
        raise UserError("pass exactly one of --train-config CONFIG or --train-checkpoint ZIP.")
    if train_checkpoint is not None:
        recipe, checkpoint = recipe_from_checkpoint(train_checkpoint)
        resume = checkpoint.path
        typer.echo(f"resuming {resume} at step {checkpoint.step}", err=True)
    else:
        recipe, resume = load_recipe(train_config), None

    def log(message: str) -> None:
        typer.echo(message, err=True)

    result = run_recipe(
        recipe, resume_from=resume, low_ram=low_ram, battery_limit=battery_limit, cache_dir=cache, force=force,
        log=log,
    )  # fmt: skip
    typer.echo(
        f"trainable parameters: {result.trainable_parameters:,}; peak memory "
        f"{result.peak_memory_bytes / 2**30:.2f} GB",
        err=True,
    )
    if result.stopped:
        typer.echo(
            f"stopped at step {result.step}/{result.total_steps}: {result.stopped}. Checkpoint: "
            f"{result.checkpoint}\nresume with: zrecipe train --train-checkpoint {result.checkpoint}",
            err=True,
        )
        raise typer.Exit(EXIT_STOPPED)
    typer.echo(f"wrote {result.final_path}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
