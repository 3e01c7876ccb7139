"""Sample images for a build: the recipe's `sample` prompts rendered per checkpoint, plus a contact sheet.

Models load once: the prompts arrive encoded (the build's encode-text entries), the base transformer is
loaded once and each adapter is swapped in and out (LoRA wrappers restored to the base layers; full
fine-tune weights reloaded from the model folder afterwards), then the VAE once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_unflatten

from zrecipe.generation.generate import (
    GenerationSettings,
    check_size,
    decode_latents,
    free_memory,
    png_metadata,
    sample_latents,
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


@dataclass(frozen=True)
class SampleRequest:
    """One image to render per adapter: `settings` (its prompt, size, steps, guidance; `seed` is the one
    rendered) with the prompt's and, for guidance > 0, the negative prompt's embeddings."""

    settings: GenerationSettings
    seed: int
    prompt_embedding: Any
    negative_embedding: Any = None


def render_samples(
    model_path: str | Path,
    adapters: Sequence[tuple[str, str | Path | None]],
    requests: Sequence[SampleRequest],
    model_name: str,
) -> list[list[tuple[str, Any, dict[str, str]]]]:
    """Render every request once per (label, adapter) — adapter None is the base model.

    The transformer loads once and each adapter is swapped in and out again; once every latent is
    denoised the transformer is freed and the VAE loads and decodes them. Returns, per request in order,
    [(label, PIL image, PNG metadata)] in adapter order; `model_name` goes into the metadata."""
    from zrecipe.models.z_image.sampler import read_scheduler_config
    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.models.z_image.vae import load_vae

    model_path = Path(model_path)
    multiple = size_multiple(model_path)
    for request in requests:
        check_size(request.settings.width, request.settings.height, multiple)
    scheduler = read_scheduler_config(model_path)
    transformer = load_transformer(model_path)
    latents: list[list[tuple[str, mx.array]]] = [[] for _ in requests]
    for label, adapter in adapters:
        restore = swap_in(transformer, Path(adapter) if adapter else None, model_path)
        for out, r in zip(latents, requests, strict=True):
            x = sample_latents(transformer, scheduler, r.settings, r.seed, r.prompt_embedding,
                               r.negative_embedding, multiple // 2)  # fmt: skip
            mx.eval(x)
            out.append((label, x))
        restore()
    del transformer
    free_memory()
    vae = load_vae(model_path)
    rendered = []
    for row, r in zip(latents, requests, strict=True):
        meta = png_metadata(r.settings, model_name)
        rendered.append(
            [
                (label, decode_latents(vae, x)[0], {**meta, "seed": str(r.seed), "adapter": label})
                for label, x in row
            ]
        )
    del vae
    free_memory()
    return rendered


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
