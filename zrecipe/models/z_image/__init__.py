"""Z-Image in MLX: transformer, VAE, Qwen3 text encoder, tokenizer, sampler, weight loading, resolution.

Stable entry points (outside checks call these):
    load_transformer(path, dtype=None, quantize=None) -> ZImageTransformer; module(x, t, cap_feats)
    load_vae(path, dtype=None) -> AutoencoderKL with encode(images) / decode(latents)
    load_text_encoder(path, dtype=None) -> Qwen3TextEncoder; module(input_ids, attention_mask)
    denoise(transformer, latents, pos_embeds, neg_embeds, guidance, steps, shift, ...)

Names are resolved lazily so that importing one component does not import the others.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ZImageTransformer": "transformer",
    "TransformerConfig": "transformer",
    "load_transformer": "transformer",
    "quantize_transformer": "transformer",
    "AutoencoderKL": "vae",
    "VAEConfig": "vae",
    "load_vae": "vae",
    "to_model_latents": "vae",
    "from_model_latents": "vae",
    "Qwen3Config": "text_encoder",
    "Qwen3TextEncoder": "text_encoder",
    "load_text_encoder": "text_encoder",
    "encode_prompts": "text_encoder",
    "load_tokenizer": "tokenizer",
    "apply_template": "tokenizer",
    "TEMPLATE": "tokenizer",
    "denoise": "sampler",
    "sigmas": "sampler",
    "read_scheduler_config": "sampler",
    "read_scheduler_shift": "sampler",
    "SchedulerConfig": "sampler",
    "resolve_model": "resolve",
    "model_weight_files": "resolve",
    "create_tiny_model": "tiny",
    "TINY_VERSION": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
