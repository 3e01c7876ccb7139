"""`zrecipe merge LORA... [--weights W...] [--rank R] -o OUT` | `--into-base --model M -o OUT`."""

from __future__ import annotations

from pathlib import Path

import typer


def _split_weights(loras: list[str], weights: list[str] | None) -> tuple[list[str], list[float] | None]:
    """Weights as given (`--weights 1 0.5`, `--weights 1,0.5` or `--weights 1 --weights 0.5`): click
    hands the numbers after the first to the LORA list, so numbers there that are not files are weights."""
    if not weights:
        return loras, None
    files = [p for p in loras if Path(p).exists() or not _is_number(p)]
    extra = [p for p in loras if p not in files]
    values = [w for item in [*weights, *extra] for w in item.split(",") if w.strip()]
    bad = [v for v in values if not _is_number(v)]
    if bad:
        from zrecipe.errors import UserError

        raise UserError(f"--weights: {', '.join(bad)} is not a number.")
    return files, [float(v) for v in values]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def merge(
    loras: list[str] = typer.Argument(..., help="LoRA files (any kind and convention) or checkpoint zips."),
    weights: list[str] | None = typer.Option(
        None, "--weights", "-w", help="One weight per LoRA (`--weights 1 0.5` or `1,0.5`; default 1 each)."
    ),
    rank: int | None = typer.Option(
        None, "--rank", "-r", help="Rank of the merged LoRA (default: exact, every singular value kept)."
    ),
    into_base: bool = typer.Option(
        False, "--into-base", help="Fuse into the base model and write a full model instead of a LoRA."
    ),
    model: str | None = typer.Option(
        None, "--model", help="Base model (folder, preset or repo id): for --into-base and DoRA inputs."
    ),
    output: Path = typer.Option(
        ...,
        "--output",
        "-o",
        help="The merged LoRA (.safetensors); with --into-base a model folder, or NAME.safetensors for one "
        "file in the original Z-Image naming.",
    ),
    fmt: str = typer.Option("comfyui", "--format", "-f", help="Format of the merged LoRA (as for export)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="float32 (default for a LoRA) or bfloat16 (default for a full model)."
    ),
) -> None:
    """Merge LoRAs into one LoRA at a chosen rank (SVD, reporting the energy kept), or fuse them into the
    base model."""
    from zrecipe.errors import UserError
    from zrecipe.export.merge import fuse_into_base, merge_files

    paths, values = _split_weights(loras, weights)
    if into_base:
        if model is None:
            raise UserError("--into-base needs --model (the base model folder, preset or repo id).")
        if rank is not None:
            raise UserError("--rank applies to a merged LoRA, not to --into-base.")
        written = fuse_into_base(paths, values, model, output, dtype or "bfloat16")
        typer.echo(f"wrote {written}")
        return
    written, result = merge_files(paths, values, rank, output, fmt, dtype or "float32", model)
    for layer in result.layers:
        typer.echo(f"{layer.path:<40} rank {layer.rank:>4}  energy kept {layer.fraction:.6f}")
    typer.echo(
        f"energy kept overall: {result.kept_energy:.6f} (Σ kept σ² / Σ σ² over {len(result.layers)} layers)"
    )
    typer.echo(f"wrote {written}")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
