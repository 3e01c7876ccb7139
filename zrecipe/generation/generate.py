"""Text → image with Z-Image: prompt encoding, the CFG sampler, LoRAs and VAE decoding, plus PNG output.

The order of work keeps peak memory low: all prompts are encoded first and the text encoder is freed
before the transformer loads; with `low_ram` the transformer is also freed before the VAE decodes, in
tiles. Each seed is denoised on its own, so an image depends only on its own inputs (never on which other
seeds share the command), and the initial noise is `mx.random.normal(key=mx.random.key(seed))` in fp32:
the same command gives byte-identical PNGs.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from zrecipe.errors import UserError
from zrecipe.models.z_image.sampler import SchedulerConfig, denoise, read_scheduler_config
from zrecipe.models.z_image.vae import VAEConfig, from_model_latents, load_vae, vae_folder
from zrecipe.models.z_image.weights import read_config

LATENT_CHANNELS = 16
LOW_RAM_VAE_TILE = 512  # pixels; a multiple of 4·8 as the tiled VAE requires


@dataclass(frozen=True)
class GenerationSettings:
    """What to generate (the defaults are the command's defaults)."""

    prompt: str
    negative_prompt: str = ""
    guidance: float = 3.5
    steps: int = 50
    width: int = 1024
    height: int = 1024
    seeds: tuple[int, ...] = (0,)
    cfg_normalization: bool = False
    cfg_truncation: float = 1.0


@dataclass
class GeneratedImage:
    seed: int
    image: object  # PIL.Image.Image
    latents: mx.array  # final (1, 16, H/8, W/8) latents in the transformer's space
    metadata: dict = field(default_factory=dict)


def size_multiple(model_path: str | Path) -> int:
    """Width and height must be multiples of this: the VAE factor times the transformer patch (16)."""
    config = VAEConfig.from_dict(read_config(vae_folder(model_path)))
    return 2 * config.downscale


def check_size(width: int, height: int, multiple: int = 16) -> None:
    """A clear error (rather than a silent crop) for sizes the model cannot make."""
    bad = []
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % multiple:
            low = max(multiple, value // multiple * multiple)
            bad.append(f"{name} {value} (try {low} or {low + multiple})")
    if bad:
        raise UserError(
            f"{' and '.join(bad)}: width and height must be positive multiples of {multiple} "
            "(the VAE's 8x downscale times the transformer's 2x2 patches)."
        )


def initial_noise(seed: int, width: int, height: int, downscale: int = 8) -> mx.array:
    """The seed's starting latents (1, 16, H/8, W/8), float32, from MLX's counter-based generator."""
    shape = (1, LATENT_CHANNELS, height // downscale, width // downscale)
    return mx.random.normal(shape, dtype=mx.float32, key=mx.random.key(int(seed)))


def encode_text(model_path: str | Path, prompts: list[str], dtype=None) -> list[mx.array]:
    """Caption embeddings for `prompts` (one (L_i, D) array each); the text encoder is freed afterwards.

    `dtype` as in `load_text_encoder` (None: the backend's default, fp32 on the CPU, bf16 on a GPU).
    """
    from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
    from zrecipe.models.z_image.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    encoder = load_text_encoder(model_path, dtype=dtype)
    embeds = encode_prompts(encoder, tokenizer, list(prompts))
    mx.eval(embeds)
    embeds = [mx.array(e) for e in embeds]  # detach from the encoder's graph before freeing it
    del encoder
    free_memory()
    return embeds


def free_memory() -> None:
    """Release Python references and MLX's buffer cache (memory goes back to the system)."""
    gc.collect()
    mx.clear_cache()


def to_image(images: mx.array):
    """Decoded images (B, H, W, 3) in [−1, 1] → PIL images, rounded exactly as diffusers' postprocess."""
    from PIL import Image

    array = np.array(images.astype(mx.float32))
    array = np.clip(array / 2 + 0.5, 0, 1)
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def decode_latents(vae, latents: mx.array, tile: int | None = None):
    """Transformer-space latents (B, 16, h, w) → PIL images."""
    unscaled = from_model_latents(latents.transpose(0, 2, 3, 1), vae)
    images = vae.decode(unscaled, tile=tile)
    mx.eval(images)
    return to_image(images)


def load_generation_transformer(
    model_path, quantize=None, lora_paths=(), lora_scales=None, fuse_loras=False, allow_unmatched=False
):
    """The transformer with `lora_paths` applied at `lora_scales` (fused into the weights if asked)."""
    from zrecipe.export.apply import apply_loras
    from zrecipe.models.z_image.transformer import load_transformer

    if quantize not in (None, 4, 8):
        raise UserError(f"--quantize must be 4 or 8, not {quantize!r}.")
    transformer = load_transformer(model_path, quantize=quantize)
    if lora_paths:
        apply_loras(
            transformer,
            [Path(p) for p in lora_paths],
            list(lora_scales) if lora_scales else None,
            fuse=fuse_loras,
            allow_unmatched=allow_unmatched,
        )
    return transformer


def sample_latents(
    transformer,
    scheduler: SchedulerConfig,
    settings: GenerationSettings,
    seed: int,
    pos: mx.array,
    neg: mx.array | None,
    downscale: int = 8,
    on_step: Callable[[int, int], None] | None = None,
) -> mx.array:
    """Denoise one seed's noise with the prompt / negative embeddings; returns the final latents."""
    noise = initial_noise(seed, settings.width, settings.height, downscale)
    callback = (lambda i, n, _x: on_step(i + 1, n)) if on_step else None
    return denoise(
        transformer,
        noise,
        [pos],
        [neg] if neg is not None else None,
        settings.guidance,
        settings.steps,
        scheduler,
        cfg_normalization=settings.cfg_normalization,
        cfg_truncation=settings.cfg_truncation,
        callback=callback,
    )


def generate(
    model_path: str | Path,
    settings: GenerationSettings,
    lora_paths: list[str | Path] = (),
    lora_scales: list[float] | None = None,
    quantize: int | None = None,
    low_ram: bool = False,
    fuse_loras: bool = False,
    allow_unmatched: bool = False,
    model_name: str | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
) -> list[GeneratedImage]:
    """Generate one image per seed. `on_step(seed_index, step, steps)` reports progress."""
    if settings.steps < 1:
        raise UserError(f"--steps must be at least 1 (got {settings.steps}).")
    if not settings.seeds:
        raise UserError("give at least one --seed.")
    model_path = Path(model_path)
    multiple = size_multiple(model_path)
    check_size(settings.width, settings.height, multiple)
    scheduler = read_scheduler_config(model_path)
    cfg = settings.guidance > 0
    embeds = encode_text(model_path, [settings.prompt] + ([settings.negative_prompt] if cfg else []))
    pos, neg = embeds[0], (embeds[1] if cfg else None)
    transformer = load_generation_transformer(
        model_path, quantize, lora_paths, lora_scales, fuse_loras, allow_unmatched
    )
    latents = []
    for index, seed in enumerate(settings.seeds):
        step_cb = (lambda i, n, k=index: on_step(k, i, n)) if on_step else None
        latents.append(
            sample_latents(transformer, scheduler, settings, seed, pos, neg, multiple // 2, step_cb)
        )
    if low_ram:
        del transformer
        free_memory()
    vae = load_vae(model_path)
    tile = LOW_RAM_VAE_TILE if low_ram else None
    meta = png_metadata(settings, model_name or str(model_path), lora_paths, lora_scales)
    results = []
    for seed, lat in zip(settings.seeds, latents, strict=True):
        image = decode_latents(vae, lat, tile)[0]
        results.append(GeneratedImage(seed, image, lat, {**meta, "seed": str(seed)}))
    return results


def png_metadata(settings: GenerationSettings, model: str, lora_paths=(), lora_scales=None) -> dict[str, str]:
    """The text chunks written into each PNG (everything needed to reproduce it)."""
    from zrecipe import __version__

    scales = list(lora_scales) if lora_scales else [1.0] * len(lora_paths)
    return {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "steps": str(settings.steps),
        "guidance": repr(float(settings.guidance)),
        "width": str(settings.width),
        "height": str(settings.height),
        "cfg_normalization": str(bool(settings.cfg_normalization)).lower(),
        "cfg_truncation": repr(float(settings.cfg_truncation)),
        "model": model,
        "loras": json.dumps(
            [{"path": str(p), "scale": float(s)} for p, s in zip(lora_paths, scales, strict=True)]
        ),
        "software": f"zrecipe {__version__}",
    }


def save_png(image, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a PNG with `metadata` as text chunks (no timestamps: same inputs → same bytes)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in metadata.items():
        info.add_text(key, str(value))  # PIL switches to an iTXt (UTF-8) chunk for non-Latin-1 text
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info)
    return path


def output_paths(output: str | Path, seeds: tuple[int, ...]) -> list[Path]:
    """`out.png` for one seed; `out_<seed>.png` for several. A missing suffix becomes `.png`."""
    output = Path(output)
    if not output.suffix:
        output = output.with_suffix(".png")
    if output.suffix.lower() != ".png":
        raise UserError(f"--output {output}: images are written as PNG; use a .png file name.")
    if len(seeds) == 1:
        return [output]
    return [output.with_name(f"{output.stem}_{seed}{output.suffix}") for seed in seeds]
