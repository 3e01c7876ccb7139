"""Standalone encoding for `zrecipe train`: recipe datasets → pre-computed training `Example`s.

The build (`zrecipe build`) caches these per image and caption in the store; `zrecipe train` without a
store encodes them here, once per run: resize each image to its bucket, VAE-encode (posterior mean, then
the model-space scale/shift), and encode each distinct caption and the empty prompt with the text encoder.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zrecipe.errors import DatasetError
from zrecipe.training.data import Example

VAE_TILE = 512  # pixels; low-RAM mode encodes images in overlapping tiles of this size


def dataset_items(dataset: Any) -> list[tuple[str, str, str]]:
    """(rel path, absolute path, caption) for every usable image of a recipe dataset."""
    from zrecipe.data.captions import resolve_captions
    from zrecipe.data.scan import scan_images

    files = scan_images(dataset.path, recursive=dataset.recursive)
    c = dataset.captions
    result = resolve_captions(
        files, dataset.path, c.kind, manifest=c.file, inline=c.items, template=c.template,
        trigger=dataset.trigger, extension=c.extension,
    )  # fmt: skip
    if result.problems and dataset.on_error == "fail":
        result.raise_for_problems(dataset.name)
    return [(f.rel_path, f.path, result.captions[f.rel_path]) for f in files if f.rel_path in result.captions]


def encode_recipe_datasets(
    recipe: Any, model_path: str | Path, low_ram: bool = False, log: Callable[[str], None] = print
) -> tuple[list[Example], Any]:
    """Encode every dataset of `recipe` with the model's VAE and text encoder.

    Returns (examples, empty-prompt embedding). With `low_ram` each encoder is dropped (and MLX's cache
    cleared) as soon as its part is done, and the VAE encodes in tiles.
    """
    import mlx.core as mx
    import numpy as np

    from zrecipe.data.images import resize_image
    from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
    from zrecipe.models.z_image.tokenizer import load_tokenizer
    from zrecipe.models.z_image.vae import load_vae, to_model_latents

    per_dataset = [(d, dataset_items(d)) for d in recipe.datasets]
    if not any(items for _, items in per_dataset):
        raise DatasetError("no trainable images: every dataset is empty or all its items were skipped.")

    vae = load_vae(model_path, dtype=mx.float32)
    latents: dict[tuple[str, str], Any] = {}
    for dataset, items in per_dataset:
        for i, (rel, path, _) in enumerate(items):
            img = resize_image(
                path,
                dataset.resolution,
                dataset.bucketing.max_aspect,
                dataset.bucketing.enabled,
                dataset.upscale,
                step=dataset.bucketing.step,
            )
            pixels = mx.array(np.asarray(img, dtype=np.float32) / 127.5 - 1.0)[None]
            mean = vae.encode(pixels, tile=VAE_TILE if low_ram else None)  # (1, h, w, 16)
            model_latents = to_model_latents(mean, vae)[0].transpose(2, 0, 1)
            latents[(dataset.name, rel)] = np.array(model_latents.astype(mx.float32))
            if (i + 1) % 50 == 0:
                log(f"encoded {i + 1}/{len(items)} images of {dataset.name}")
    del vae
    if low_ram:
        gc.collect()
        mx.clear_cache()

    tokenizer = load_tokenizer(model_path)
    text_encoder = load_text_encoder(model_path, dtype=mx.float32)
    texts = sorted({caption for _, items in per_dataset for _, _, caption in items} | {""})
    embeddings: dict[str, Any] = {}
    for start in range(0, len(texts), 8):  # small batches: padding to the longest prompt costs memory
        chunk = texts[start : start + 8]
        for text, emb in zip(chunk, encode_prompts(text_encoder, tokenizer, chunk), strict=True):
            embeddings[text] = np.array(emb.astype(mx.float32))
    del text_encoder
    if low_ram:
        gc.collect()
        mx.clear_cache()

    examples = [
        Example(
            latents=latents[(d.name, rel)],
            caption=embeddings[caption],
            bucket=tuple(latents[(d.name, rel)].shape[1:]),
            dataset=d.name,
            repeats=d.repeats,
            caption_dropout=d.caption_dropout,
        )
        for d, items in per_dataset
        for rel, _, caption in items
    ]
    return examples, embeddings[""]
