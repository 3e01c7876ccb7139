"""`zrecipe memory --mode lora|full --available-memory-gb N [--quantize 4|8]`: the memory optimiser."""

from __future__ import annotations

from pathlib import Path

import typer


def memory(
    mode: str = typer.Option("lora", "--mode", help="lora or full."),
    available_memory_gb: float | None = typer.Option(
        None, "--available-memory-gb", help="Memory to plan for (default: this machine's)."
    ),
    quantize: int | None = typer.Option(None, "--quantize", help="4 or 8: quantised base weights (LoRA)."),
    model: Path | None = typer.Option(
        None, "--model", help="Model folder whose transformer config to use (default: the real Z-Image)."
    ),
    resolution: int = typer.Option(1024, "--resolution", help="Training image side in pixels."),
    dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 or float32 weights/compute."),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Plan with per-block gradient checkpointing."
    ),
) -> None:
    """Estimate training memory and recommend a batch size."""
    from zrecipe.errors import UserError

    if mode not in ("lora", "full"):
        raise UserError(f"--mode {mode!r}: use lora or full.")
    if quantize not in (None, 4, 8):
        raise UserError(f"--quantize {quantize}: use 4 or 8.")
    if quantize and mode == "full":
        raise UserError(
            "--quantize applies to LoRA training only (full fine-tuning needs unquantised weights)."
        )
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"--dtype {dtype!r}: use bfloat16 or float32.")
    from zrecipe.training.memory import MemoryOptimizer

    config = None
    if model is not None:
        from zrecipe.models.z_image.transformer import TransformerConfig
        from zrecipe.models.z_image.weights import read_config

        folder = model / "transformer" if (model / "transformer").is_dir() else model
        config = TransformerConfig.from_dict(read_config(folder), source=folder / "config.json")
    MemoryOptimizer.print_recommendations(
        mode=mode, available_memory_gb=available_memory_gb, quantize=quantize, config=config,
        width=resolution, height=resolution, dtype=dtype, gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("memory")(memory)
