"""`zrecipe export RECIPE|CHECKPOINT|ADAPTER --format mflux|comfyui|diffusers|kohya|musubi [-o FILE]`."""

from __future__ import annotations

from pathlib import Path

import typer

FORMAT_HELP = (
    "Output format: mflux (= comfyui), diffusers, kohya (ComfyUI's kohya names, q/k/v fused) or musubi "
    "(musubi-tuner's split names). Repeatable; default: the recipe's export formats."
)


def export(
    source: Path = typer.Argument(
        ...,
        help="A recipe (.yaml/.json), a checkpoint .zip (zrecipe's or mflux's) or an adapter .safetensors.",
    ),
    formats: list[str] | None = typer.Option(None, "--format", "-f", help=FORMAT_HELP),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Output file (one format) or folder (several formats, or a full fine-tune's model folder).",
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="bfloat16 (default) or float32."),
    model: str | None = typer.Option(
        None, "--model", help="Base model for a full fine-tune when the input does not name it."
    ),
) -> None:
    """Export a trained LoRA for mflux / ComfyUI / diffusers / kohya / musubi, or a full fine-tune as a folder."""
    from zrecipe.export.sources import run_export

    files, notes = run_export(source, formats, output, dtype, model)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    for file in files:
        typer.echo(f"wrote {file}")


def register(app: typer.Typer) -> None:
    app.command("export")(export)
