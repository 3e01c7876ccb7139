"""Sample images for a build: the recipe's `sample` prompts rendered per checkpoint, plus a contact sheet.

Models load once: prompts are encoded first (text encoder then freed), the base transformer is loaded once
and each adapter is swapped in and out (LoRA wrappers restored to the base layers; full fine-tune weights
reloaded from the model folder afterwards), the VAE once. Images are named `p<prompt>_s<seed>.png`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_unflatten

from zrecipe.generation.generate import (
    GenerationSettings,
    check_size,
    decode_latents,
    encode_text,
    png_metadata,
    sample_latents,
    save_png,
    size_multiple,
)

SHEET_PAD = 8
LABEL_HEIGHT = 28


def _is_full_weights(tensors: dict, metadata: dict) -> bool:
    from zrecipe.export.lora_formats import holds_adapter

    return metadata.get("format") == "zrecipe-full" or not holds_adapter(tensors)


def swap_in(transformer, adapter: Path | None, model_path: Path) -> Callable[[], None]:
    """Apply `adapter` to `transformer`; returns the function that puts the base model back."""
    from zrecipe.errors import CheckpointError
    from zrecipe.export.apply import apply_loras, linear_shapes
    from zrecipe.export.lora_formats import lora_from_tensors

    if adapter is None:
        return lambda: None
    try:
        tensors, metadata = mx.load(str(adapter), return_metadata=True)
    except Exception as exc:
        raise CheckpointError(f"{adapter}: cannot read the adapter ({exc}).") from exc
    if _is_full_weights(tensors, metadata or {}):
        from zrecipe.models.z_image.weights import load_strict, read_weights

        load_strict(transformer, tensors, adapter, dtype=transformer.dtype)
        folder = model_path / "transformer"
        return lambda: load_strict(
            transformer, transformer.sanitize(read_weights(folder)), folder, dtype=transformer.dtype
        )
    modules = dict(transformer.named_modules())
    lora = lora_from_tensors(tensors, dict(metadata or {}), str(adapter), linear_shapes(transformer))
    changed = apply_loras(transformer, [lora])
    originals = [(p, modules[p]) for p in changed]
    return lambda: transformer.update_modules(tree_unflatten(originals))


def render_sample_grid(
    model_path: str | Path,
    adapters: Sequence[tuple[str, str | Path | None]],
    prompts: Sequence[str],
    out_dir: str | Path,
    negative_prompt: str = "",
    guidance: float = 3.5,
    steps: int = 50,
    width: int = 1024,
    height: int = 1024,
    seeds: Sequence[int] = (0,),
    cfg_normalization: bool = False,
    cfg_truncation: float = 1.0,
    quantize: int | None = None,
    sheet_name: str | None = "contact_sheet.png",
    on_image: Callable[[Path], None] | None = None,
) -> dict[str, list[Path]]:
    """Render every prompt × seed for each (label, adapter) — adapter None is the base model — into
    `out_dir/<label>/`, and a contact sheet (rows: prompt × seed, columns: labels). Returns {label: PNGs}."""
    from zrecipe.models.z_image.sampler import read_scheduler_config
    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.models.z_image.vae import load_vae

    model_path, out_dir = Path(model_path), Path(out_dir)
    multiple = size_multiple(model_path)
    check_size(width, height, multiple)
    cfg = guidance > 0
    embeds = encode_text(model_path, list(prompts) + ([negative_prompt] if cfg else []))
    neg = embeds[-1] if cfg else None
    scheduler = read_scheduler_config(model_path)
    transformer = load_transformer(model_path, quantize=quantize)
    vae = load_vae(model_path)
    results: dict[str, list[Path]] = {}
    grid: list[list] = [[None] * len(adapters) for _ in range(len(prompts) * len(seeds))]
    for col, (label, adapter) in enumerate(adapters):
        restore = swap_in(transformer, Path(adapter) if adapter else None, model_path)
        folder = out_dir / label
        paths = []
        for p_index, prompt in enumerate(prompts):
            settings = GenerationSettings(
                prompt,
                negative_prompt,
                guidance,
                steps,
                width,
                height,
                tuple(seeds),
                cfg_normalization,
                cfg_truncation,
            )
            meta = png_metadata(settings, str(model_path), [adapter] if adapter else [])
            for s_index, seed in enumerate(seeds):
                latents = sample_latents(
                    transformer, scheduler, settings, seed, embeds[p_index], neg, multiple // 2
                )
                image = decode_latents(vae, latents)[0]
                path = save_png(image, folder / f"p{p_index:02d}_s{seed}.png", {**meta, "seed": str(seed)})
                paths.append(path)
                grid[p_index * len(seeds) + s_index][col] = image
                if on_image:
                    on_image(path)
        restore()
        results[label] = paths
    if sheet_name:
        rows = [f"{_short(p)} · seed {s}" for p in prompts for s in seeds]
        contact_sheet(grid, rows, [label for label, _ in adapters], out_dir / sheet_name)
    return results


def render_samples(
    model_path: str | Path,
    adapter: str | Path | None,
    prompts: Sequence[str],
    negative_prompt: str,
    guidance: float,
    steps: int,
    width: int,
    height: int,
    seeds: Sequence[int],
    out_dir: str | Path,
    cfg_normalization: bool = False,
    cfg_truncation: float = 1.0,
    quantize: int | None = None,
) -> list[Path]:
    """Render `prompts` × `seeds` for one adapter (None: the base model) into `out_dir`; returns the PNGs."""
    out_dir = Path(out_dir)
    out = render_sample_grid(
        model_path,
        [(out_dir.name, adapter)],
        prompts,
        out_dir.parent,
        negative_prompt,
        guidance,
        steps,
        width,
        height,
        seeds,
        cfg_normalization,
        cfg_truncation,
        quantize,
        sheet_name=None,
    )
    return out[out_dir.name]


def _short(text: str, limit: int = 48) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def contact_sheet(
    images_grid: list[list], row_labels: Sequence[str], col_labels: Sequence[str], out_path: str | Path
) -> Path:
    """A labelled grid PNG: `images_grid[row][col]` (PIL images or None), row and column captions."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    cells = [im for row in images_grid for im in row if im is not None]
    if not cells:
        raise ValueError("contact_sheet needs at least one image")
    cw, ch = max(im.width for im in cells), max(im.height for im in cells)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max((measure.textlength(t, font=font) for t in row_labels), default=0)
    left = int(label_w) + 2 * SHEET_PAD
    width = left + len(col_labels) * (cw + SHEET_PAD) + SHEET_PAD
    height = LABEL_HEIGHT + len(row_labels) * (ch + SHEET_PAD) + SHEET_PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(col_labels):
        draw.text((left + c * (cw + SHEET_PAD), SHEET_PAD), str(label), fill="black", font=font)
    for r, label in enumerate(row_labels):
        top = LABEL_HEIGHT + r * (ch + SHEET_PAD)
        draw.text((SHEET_PAD, top + ch // 2), str(label), fill="black", font=font)
        for c, image in enumerate(images_grid[r]):
            if image is not None:
                sheet.paste(image, (left + c * (cw + SHEET_PAD), top))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_path, format="PNG")
    return out_path
