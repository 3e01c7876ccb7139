"""A tiny random-weight vision-language model in a real Hugging Face layout (`tiny-vlm`).

Written the way the published Qwen2-VL / Qwen2.5-VL checkpoints are laid out (`Qwen/Qwen2-VL-2B-Instruct`):
a flat `config.json` (text settings at the top, `vision_config` nested), `generation_config.json`, one
`model.safetensors` with the hub's tensor names (`model.layers.*`, `visual.*`, `lm_head.weight`, the patch
embedding as PyTorch's Conv3d `(out, in, t, h, w)`), the byte-level BPE tokenizer (`tokenizer.json`,
`vocab.json`, `merges.txt`, `tokenizer_config.json`) with the vision tokens and the chat template, and
`preprocessor_config.json` / `chat_template.json` for the processor. So mlx-vlm and transformers load it
through their ordinary paths, offline, as they would a downloaded model (the tests check both).

Seeded and written in a fixed order: the same seed gives byte-identical files. The text vocabulary is the
tokenizer's exact size (a real checkpoint pads its embedding table, but a random model would then emit
ids no tokenizer can decode). `max_pixels` is small so that a caption costs a few image tokens.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

from zrecipe.errors import ModelError

# Bump when the files written here change: the cached copy lives in `<model cache>/tiny-vlm-v<N>`, and the
# identity of `tiny-vlm` (in every caption key) is this version.
TINY_VLM_VERSION = 1
TINY_VLM = "tiny-vlm"
FAMILIES = ("qwen2_vl", "qwen2_5_vl")

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2-VL's chat template (Qwen2.5-VL uses the same one): a system turn unless one is given, images as
# <|vision_start|><|image_pad|><|vision_end|>, then the assistant turn.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class Dims:
    """The sizes of a Qwen2-VL-style model. The defaults are the tiny model's; `QWEN2_VL_2B` is the real
    2B model's (for benchmarks with random weights). `vocab`: None = the tokenizer's size."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2
    vision_dim: int = 32
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64  # Qwen2-VL: vision_dim * mlp_ratio; Qwen2.5-VL: the SwiGLU width
    min_pixels: int = 56 * 56
    max_pixels: int = 112 * 112
    vocab: int | None = None


TINY_DIMS = Dims()
QWEN2_VL_2B = Dims(
    hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, mrope_section=(16, 24, 24),
    vision_dim=1280, vision_depth=32, vision_heads=16, vision_intermediate=5120,
    min_pixels=56 * 56, max_pixels=512 * 512, vocab=151936,
)  # fmt: skip
PATCH, MERGE, TEMPORAL = 14, 2, 2


def create_tiny_vlm(
    path: str | Path, family: str = "qwen2_vl", seed: int = 0, dims: Dims = TINY_DIMS, dtype: str = "float32"
) -> Path:
    """Write the model folder at `path` (which must not exist or be empty); returns its path. `dims`: the
    sizes (`QWEN2_VL_2B` for a real-size random model); `dtype`: "float32" or "bfloat16" weights.

    Written into a temporary sibling folder and renamed at the end, so a reader sees the whole model or
    none, and of two processes creating it at once one rename wins (the other gets ModelError)."""
    if family not in FAMILIES:
        raise ModelError(f"tiny VLM family {family!r}: choose one of {', '.join(FAMILIES)}.")
    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"tiny VLM dtype {dtype!r}: use 'float32' or 'bfloat16'.")
    path = Path(path).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelError(f"{path}: already exists and is not empty; pass a new folder for the tiny VLM.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, family, seed, dims, dtype)
        try:
            if path.exists():
                path.rmdir()
            os.replace(tmp, path)
        except OSError as exc:
            raise ModelError(f"{path}: already exists and is not empty; pass a new folder.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _write(folder: Path, family: str, seed: int, dims: Dims, dtype: str) -> None:
    from zrecipe.models.z_image.tiny import _random_weights, _save, _write_json, write_tokenizer

    ids = write_tokenizer(folder, special=SPECIAL_TOKENS, added=[], chat_template=CHAT_TEMPLATE)
    if dims.vocab is not None and dims.vocab < len(ids):
        raise ModelError(f"vocab {dims.vocab} is smaller than the tokenizer's {len(ids)} tokens.")
    dims = replace(dims, vocab=dims.vocab or len(ids))
    config = model_config(family, dims, ids) | {"torch_dtype": dtype}
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "do_sample": False,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    processor = "Qwen2VLProcessor" if family == "qwen2_vl" else "Qwen2_5_VLProcessor"
    _write_json(
        folder / "preprocessor_config.json",
        {
            "image_mean": IMAGE_MEAN,
            "image_processor_type": "Qwen2VLImageProcessor",
            "image_std": IMAGE_STD,
            "max_pixels": dims.max_pixels,
            "merge_size": MERGE,
            "min_pixels": dims.min_pixels,
            "patch_size": PATCH,
            "processor_class": processor,
            "temporal_patch_size": TEMPORAL,
        },
    )
    _write_json(folder / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    weights = _random_weights(weight_shapes(family, dims), seed, component=11)
    if dims.vocab > len(ids):
        # Rows past the tokenizer (a real checkpoint's padding): never the argmax, as in a trained model.
        for key in ("lm_head.weight",):
            weights[key][len(ids) :] = 0.0
    _save(weights, folder / "model.safetensors", dtype)


def model_config(family: str, dims: Dims, ids: dict) -> dict:
    """The flat config.json of the published checkpoints (transformers 4.4x), with tiny sizes."""
    vision = {
        "depth": dims.vision_depth,
        "in_chans": 3,
        "num_heads": dims.vision_heads,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "spatial_patch_size": PATCH,
        "temporal_patch_size": TEMPORAL,
    }
    if family == "qwen2_vl":
        vision |= {
            "embed_dim": dims.vision_dim,
            "hidden_size": dims.hidden,
            "mlp_ratio": dims.vision_intermediate // dims.vision_dim,  # an integer in the real config
        }
        architecture = "Qwen2VLForConditionalGeneration"
    else:
        vision |= {
            "fullatt_block_indexes": [dims.vision_depth - 1],
            "hidden_act": "silu",
            "hidden_size": dims.vision_dim,
            "intermediate_size": dims.vision_intermediate,
            "out_hidden_size": dims.hidden,
            "tokens_per_second": 2,
            "window_size": 112,
        }
        architecture = "Qwen2_5_VLForConditionalGeneration"
    return {
        "architectures": [architecture],
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": dims.hidden,
        "image_token_id": ids["<|image_pad|>"],
        "initializer_range": 0.02,
        "intermediate_size": dims.intermediate,
        "max_position_embeddings": 32768,
        "max_window_layers": dims.layers,
        "model_type": family,
        "num_attention_heads": dims.heads,
        "num_hidden_layers": dims.layers,
        "num_key_value_heads": dims.kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": list(dims.mrope_section), "rope_type": "default", "type": "mrope"},
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.49.0",
        "use_cache": True,
        "use_sliding_window": False,
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": vision,
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "vocab_size": dims.vocab,
    }


def weight_shapes(family: str, dims: Dims) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} of the checkpoint, in the hub's names (what `model.safetensors` holds)."""
    h, head = dims.hidden, dims.hidden // dims.heads
    kv = dims.kv_heads * head
    shapes: dict[str, tuple[int, ...]] = {
        "lm_head.weight": (dims.vocab, h),
        "model.embed_tokens.weight": (dims.vocab, h),
        "model.norm.weight": (h,),
    }
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (dims.intermediate, h),
            p + "mlp.up_proj.weight": (dims.intermediate, h),
            p + "mlp.down_proj.weight": (h, dims.intermediate),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.q_proj.bias": (h,),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (h, h),
        }
    e, m = dims.vision_dim, dims.vision_intermediate
    norm = ("weight", "bias") if family == "qwen2_vl" else ("weight",)  # LayerNorm / RMSNorm
    for i in range(dims.vision_depth):
        p = f"visual.blocks.{i}."
        shapes |= {p + f"norm{n}.{part}": (e,) for n in (1, 2) for part in norm}
        shapes |= {
            p + "attn.qkv.weight": (3 * e, e),
            p + "attn.qkv.bias": (3 * e,),
            p + "attn.proj.weight": (e, e),
            p + "attn.proj.bias": (e,),
        }
        if family == "qwen2_vl":
            mlp = {"fc1": (m, e), "fc2": (e, m)}
        else:
            mlp = {"gate_proj": (m, e), "up_proj": (m, e), "down_proj": (e, m)}
        for name, shape in mlp.items():
            shapes |= {p + f"mlp.{name}.weight": shape, p + f"mlp.{name}.bias": (shape[0],)}
    c = e * MERGE * MERGE
    shapes |= {f"visual.merger.ln_q.{part}": (e,) for part in norm}
    shapes |= {
        "visual.merger.mlp.0.weight": (c, c),
        "visual.merger.mlp.0.bias": (c,),
        "visual.merger.mlp.2.weight": (h, c),
        "visual.merger.mlp.2.bias": (h,),
        "visual.patch_embed.proj.weight": (e, 3, TEMPORAL, PATCH, PATCH),
    }
    return shapes


def tiny_vlm_folder(models: Path) -> Path:
    """`<models>/tiny-vlm-v<N>` (the Qwen2-VL family, seed 0), written on first use."""
    target = models / f"{TINY_VLM}-v{TINY_VLM_VERSION}"
    if (target / "config.json").is_file():
        return target
    try:
        create_tiny_vlm(target, "qwen2_vl", seed=0)
    except ModelError:
        if not (target / "config.json").is_file():  # otherwise a concurrent build wrote it first
            raise
    return target
