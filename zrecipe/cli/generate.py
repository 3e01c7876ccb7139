"""`zrecipe generate` (also installed as the seed's `mflux-generate-z-image-base`): text → PNG.

Width and height must be multiples of 16 (the VAE's 8× times the transformer's 2× patch); other sizes are
refused with the nearest valid ones rather than silently cropped. Without `--seed` the seed is 0, so a
command always reproduces the same image; several `--seed`s write `<output>_<seed>.png` each.
"""

from __future__ import annotations

from pathlib import Path

import typer

from zrecipe.cli.download import OfflineOpt


def generate(
    prompt: str = typer.Option(..., "--prompt", help="Text prompt."),
    negative_prompt: str = typer.Option(
        "", "--negative-prompt", help="Negative prompt (used when guidance > 0)."
    ),
    guidance: float = typer.Option(
        3.5, "--guidance", help="CFG scale in the Z-Image convention; 0 disables CFG."
    ),
    steps: int = typer.Option(50, "--steps", help="Denoising steps."),
    width: int = typer.Option(1024, "--width", help="Image width in pixels (a multiple of 16)."),
    height: int = typer.Option(1024, "--height", help="Image height in pixels (a multiple of 16)."),
    seeds: list[int] | None = typer.Option(
        None, "--seed", help="Seed; repeat for several images (default 0)."
    ),
    model: str = typer.Option(
        "z-image",
        "--model",
        help="Model folder, preset (z-image, z-image-turbo, tiny), Hugging Face repo id, or a base with "
        "component files: BASE,transformer=FILE[,text_encoder=FILE][,vae=FILE] or BASE,mflux_save=FOLDER.",
    ),
    offline: bool = OfflineOpt,
    lora_paths: list[Path] | None = typer.Option(
        None,
        "--lora-paths",
        help="LoRA file (any common convention). Several: --lora-paths A B, or repeat the flag; mflux's "
        "--lora PATH SCALE (repeatable) works too.",
    ),
    lora_scales: list[float] | None = typer.Option(
        None,
        "--lora-scales",
        help="Strength per LoRA, in --lora-paths order (default 1.0 each): --lora-scales 1 0.5, or repeat.",
    ),
    quantize: int | None = typer.Option(
        None, "--quantize", "-q", help="Quantise the transformer to 4 or 8 bits."
    ),
    cfg_normalization: bool = typer.Option(
        False, "--cfg-normalization", help="Clip the guided prediction's norm to the positive one's."
    ),
    cfg_truncation: float = typer.Option(
        1.0, "--cfg-truncation", help="Drop guidance once 1 − σ exceeds this (1.0: never)."
    ),
    output: Path = typer.Option(Path("image.png"), "--output", "-o", help="PNG file to write."),
    low_ram: bool = typer.Option(False, "--low-ram", help="Free each model after use; tiled VAE decoding."),
    fuse_loras: bool = typer.Option(
        False, "--fuse-loras", help="Merge LoRAs into the weights (faster steps)."
    ),
    allow_unmatched: bool = typer.Option(
        False,
        "--allow-unmatched",
        help="Apply a LoRA even if some of its keys match no layer (they are listed).",
    ),
) -> None:
    """Generate images with Z-Image (CFG, negative prompt, LoRAs)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from zrecipe.generation.generate import GenerationSettings, output_paths, save_png
    from zrecipe.generation.generate import generate as run
    from zrecipe.models.z_image.resolve import resolve_model

    seed_list = tuple(seeds) if seeds else (0,)
    paths = output_paths(output, seed_list)  # validate before any model loads
    settings = GenerationSettings(
        prompt, negative_prompt, guidance, steps, width, height, seed_list, cfg_normalization, cfg_truncation
    )
    folder = resolve_model(model)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        tasks = {}

        def on_step(index: int, step: int, total: int) -> None:
            if index not in tasks:
                tasks[index] = progress.add_task(f"seed {seed_list[index]}", total=total)
            progress.update(tasks[index], completed=step)

        images = run(
            folder,
            settings,
            list(lora_paths or []),
            list(lora_scales) if lora_scales else None,
            quantize,
            low_ram,
            fuse_loras,
            allow_unmatched,
            model_name=model,
            on_step=on_step,
        )
    for item, path in zip(images, paths, strict=True):
        save_png(item.image, path, item.metadata)
        typer.echo(f"wrote {path}")


def expand_generate_args(argv: list[str]) -> list[str]:
    """mflux's flag forms for `generate`, rewritten into the repeated options typer parses (click has no
    "one or more values" options): `--lora-paths A B` → `--lora-paths A --lora-paths B`, likewise
    `--lora-scales 1 0.5`, and `--lora PATH SCALE` (repeatable) → a path and its scale. Other commands'
    arguments, and anything after `--`, pass unchanged, so help and errors still come from typer."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is None or argv[command] != "generate":
        return argv
    head, rest = argv[: command + 1], argv[command + 1 :]
    out: list[str] = []
    paths: list[tuple[str, float | None]] = []  # in order; scale None: from --lora-scales
    scales: list[str] = []
    pairs = False
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            out += rest[i:]
            break
        if arg in ("--lora-paths", "--lora-scales", "--lora"):
            values = []
            j = i + 1
            while j < len(rest) and (
                not rest[j].startswith("-") or (arg == "--lora-scales" and _number(rest[j]))
            ):
                values.append(rest[j])
                j += 1
                if arg == "--lora" and len(values) == 2:
                    break
            if not values:
                out.append(arg)  # no value: let typer say so
                i += 1
                continue
            if arg == "--lora-paths":
                paths += [(v, None) for v in values]
            elif arg == "--lora-scales":
                scales += values
            else:
                if len(values) == 2 and not _number(values[1]):
                    raise typer.BadParameter(f"--lora {values[0]} {values[1]}: the scale must be a number")
                pairs = True
                paths.append((values[0], float(values[1]) if len(values) == 2 else 1.0))
            i = j
            continue
        out.append(arg)
        i += 1
    plain = [p for p, scale in paths if scale is None]
    if pairs:
        if scales and len(scales) != len(plain):
            raise typer.BadParameter(
                f"--lora-scales gives {len(scales)} scale(s) for {len(plain)} --lora-paths file(s); give one "
                "per file, or use --lora PATH SCALE for each LoRA"
            )
        given = iter(scales)
        scales = [str(next(given, "1.0")) if scale is None else str(scale) for _, scale in paths]
    expanded = [x for p, _ in paths for x in ("--lora-paths", p)] + [
        x for s in scales for x in ("--lora-scales", s)
    ]
    return head + expanded + out


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
