"""A tiny random-weight Z-Image (a few MB) in exactly the real diffusers on-disk layout.

It is loaded by the same code as the real model (and by diffusers / transformers), so tests, CI and
`recipes/tiny.yaml` exercise the real load path. Everything is seeded and written in a fixed order:
the same seed gives byte-identical files.

The VAE keeps four levels ([8, 8, 16, 16]) so its spatial factor stays the real 8×: bucketing, latent
shapes and the pipeline's `vae_scale_factor` all assume 8, and a two-level tiny VAE (factor 2) would
take code paths the real model never takes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from zrecipe.errors import ModelError

# Bump when the files this module writes change: the cached copy lives in `models/tiny-v<N>`, so a newer
# zrecipe never keeps using an old tiny model (and model-dependent build keys change with it).
TINY_VERSION = 1

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Added but not special in Qwen3 (decoded like text), as in the real tokenizer.json.
THINK_TOKENS = ["<think>", "</think>"]
BPE_VOCAB_SIZE = 1000

MODEL_INDEX = {
    "_class_name": "ZImagePipeline",
    "_diffusers_version": "0.36.0.dev0",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen3Model"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "ZImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.36.0.dev0",
    "num_train_timesteps": 1000,
    "shift": 6.0,
    "use_dynamic_shifting": False,
}
TEXT_HIDDEN = 64
TRANSFORMER_CONFIG = {
    "_class_name": "ZImageTransformer2DModel",
    "_diffusers_version": "0.36.0.dev0",
    "all_f_patch_size": [1],
    "all_patch_size": [2],
    "axes_dims": [8, 12, 12],  # sums to the head dim 64 / 2
    "axes_lens": [1536, 512, 512],
    "cap_feat_dim": TEXT_HIDDEN,
    "dim": 64,
    "in_channels": 16,
    "n_heads": 2,
    "n_kv_heads": 2,
    "n_layers": 2,
    "n_refiner_layers": 1,
    "norm_eps": 1e-05,
    "qk_norm": True,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
}
VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.36.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [8, 8, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "layers_per_block": 1,
    "mid_block_add_attention": True,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def text_encoder_config(vocab_size: int, token_ids: dict) -> dict:
    """The tiny Qwen3 config, in the key set of the real checkpoint's config.json (transformers 4.51)."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": TEXT_HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "max_position_embeddings": 40960,
        "max_window_layers": 3,
        "model_type": "qwen3",
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "transformers_version": "4.51.0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab_size,
    }


def create_tiny_model(path: str | Path, seed: int = 0, dtype: str = "float32") -> Path:
    """Write the tiny model folder at `path` (which must not exist or be empty); returns its path.

    Written into a temporary sibling folder and renamed at the end, so an interrupted run never leaves
    a half-written model behind. `dtype` is "float32" or "bfloat16" for every weight file.
    """
    if dtype not in ("float32", "bfloat16"):
        raise ModelError(f"tiny model dtype {dtype!r}: use 'float32' or 'bfloat16'.")
    path = Path(path).expanduser().absolute()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ModelError(f"{path}: already exists and is not empty; pass a new folder for the tiny model.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per writer (process and thread): concurrent creators never share a temporary folder.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_json(tmp / "model_index.json", MODEL_INDEX)
        _write_json(tmp / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
        token_ids = write_tokenizer(tmp / "tokenizer")
        # Rounded up like the real checkpoint's embedding table (151669 tokens → 151936 rows).
        vocab_size = -(-len(token_ids) // 64) * 64
        write_text_encoder(tmp / "text_encoder", text_encoder_config(vocab_size, token_ids), seed, dtype)
        write_transformer(tmp / "transformer", seed, dtype)
        write_vae(tmp / "vae", seed, dtype)
        try:
            if path.exists():
                path.rmdir()  # the empty folder the caller gave
            os.replace(tmp, path)
        except OSError as exc:  # another process finished first and filled the folder
            raise ModelError(f"{path}: already exists and is not empty; pass a new folder.") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def write_tokenizer(
    folder: Path,
    special: list[str] = SPECIAL_TOKENS,
    added: list[str] = THINK_TOKENS,
    chat_template: str | None = None,
) -> dict:
    """Train the byte-level BPE on the built-in corpus; write tokenizer.json, vocab/merges, config.

    Returns {token: id} including the added tokens. Same pre-tokenizer, normalizer and decoder as
    transformers' Qwen2Tokenizer, so AutoTokenizer and the `tokenizers` library agree on every id.
    `special` / `added` are the special and the plain added tokens, `chat_template` the config's template
    (default: Qwen3's); the defaults are the Z-Image text encoder's (the tiny VLM passes Qwen2-VL's).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    from zrecipe.models.z_image.tokenizer import QWEN3_CHAT_TEMPLATE

    special, added = list(special), list(added)
    # Qwen2's pre-tokenizer split, as in transformers' Qwen2Tokenizer.
    split = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
        r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    tokenizer = Tokenizer(
        models.BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # The trainer is deterministic for a fixed corpus (ties are broken by token ids), checked by the tests.
    tokenizer.train_from_iterator(CORPUS.strip().splitlines(), trainer=trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    tokenizer.model.save(str(folder))  # vocab.json + merges.txt, as in the real tokenizer folder
    ids = tokenizer.get_vocab(with_added_tokens=True)
    added = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in special,
        }
        for t in special + added
    }
    _write_json(
        folder / "tokenizer_config.json",
        {
            "add_bos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "additional_special_tokens": special[1:],
            "bos_token": None,
            "chat_template": QWEN3_CHAT_TEMPLATE if chat_template is None else chat_template,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>",
            "errors": "replace",
            "model_max_length": 131072,
            "pad_token": "<|endoftext|>",
            "split_special_tokens": False,
            "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None,
        },
    )
    return ids


def write_text_encoder(folder: Path, config: dict, seed: int, dtype: str) -> None:
    """Qwen3 config.json + model.safetensors with `model.`-prefixed keys and no lm_head (tied)."""
    from mlx.utils import tree_flatten

    from zrecipe.models.z_image.text_encoder import Qwen3Config, Qwen3TextEncoder

    model = Qwen3TextEncoder(Qwen3Config.from_dict(config))
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    _write_json(folder / "config.json", config)
    _save(_random_weights(shapes, seed, component=1), folder / "model.safetensors", dtype)


def write_transformer(folder: Path, seed: int, dtype: str) -> None:
    """Transformer config.json + two safetensors shards with their index json (as the real one)."""
    from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer, export_weights

    model = ZImageTransformer(TransformerConfig.from_dict(TRANSFORMER_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in export_weights(model).items()}
    weights = _random_weights(shapes, seed, component=2)
    _write_json(folder / "config.json", TRANSFORMER_CONFIG)
    keys = sorted(weights)
    sizes = [weights[k].size * (4 if dtype == "float32" else 2) for k in keys]
    total = sum(sizes)
    # Split the sorted keys where the two shards' byte counts are closest (both non-empty).
    prefix = [sum(sizes[:i]) for i in range(1, len(keys))]
    cut = 1 + min(range(len(prefix)), key=lambda i: abs(2 * prefix[i] - total))
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    weight_map = {}
    for name, part in zip(names, (keys[:cut], keys[cut:]), strict=True):
        _save({k: weights[k] for k in part}, folder / name, dtype)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(folder / "diffusion_pytorch_model.safetensors.index.json", index)


def write_vae(folder: Path, seed: int, dtype: str) -> None:
    """VAE config.json + diffusion_pytorch_model.safetensors (PyTorch OIHW conv layout)."""
    from zrecipe.models.z_image.vae import AutoencoderKL, VAEConfig, export_weights

    model = AutoencoderKL(VAEConfig.from_dict(VAE_CONFIG))
    shapes = {k: tuple(v.shape) for k, v in export_weights(model).items()}
    _write_json(folder / "config.json", VAE_CONFIG)
    _save(_random_weights(shapes, seed, component=3), folder / "diffusion_pytorch_model.safetensors", dtype)


def _random_weights(shapes: dict, seed: int, component: int) -> dict:
    """Seeded float32 weights at scales that keep activations O(1) through the network.

    Matrices and convs ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.1²) (not 1, so a parity test notices a
    norm weight that is ignored); biases N(0, 0.1²); embeddings and learned pad tokens N(0, 1).
    """
    import numpy as np

    # One stream per component so resizing one component does not change another's weights.
    rng = np.random.RandomState([seed, component])
    weights = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = rng.standard_normal(shape).astype(np.float32)
        if key.endswith("embed_tokens.weight") or "pad_token" in key:
            value = noise
        elif len(shape) >= 2:
            value = noise / np.float32(np.sqrt(np.prod(shape[1:])))
        elif key.endswith(".bias"):
            value = noise * np.float32(0.1)
        else:
            value = np.float32(1.0) + noise * np.float32(0.1)
        weights[key] = np.ascontiguousarray(value, dtype=np.float32)
    return weights


def _save(weights: dict, file: Path, dtype: str) -> None:
    """Write one safetensors file with the `format: pt` metadata transformers / diffusers expect."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "float32":
        from safetensors.numpy import save_file

        save_file(weights, str(file), metadata={"format": "pt"})
    else:  # numpy has no bfloat16: round through MLX, which writes bf16 safetensors itself
        import mlx.core as mx

        mx.save_safetensors(
            str(file),
            {k: mx.array(v).astype(mx.bfloat16) for k, v in weights.items()},
            metadata={"format": "pt"},
        )


def _write_json(file: Path, data: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# Caption-like English (plus digits, contractions) for the tiny BPE: enough distinct words for ~1000 merges.
CORPUS = """
A photograph of a red fox sitting in fresh snow at dawn, soft golden light, shallow depth of field.
An oil painting of a quiet harbour with fishing boats, seagulls and wooden piers under a cloudy sky.
Portrait of an elderly woman with silver hair and a knitted scarf, warm window light, film grain.
A watercolor illustration of a cottage garden full of roses, tulips, lavender and sunflowers.
Cinematic shot of a neon city street at night, rain reflections, people with umbrellas, cyberpunk mood.
A pencil sketch of a cathedral facade with gothic arches, detailed stonework and tall spires.
Macro photograph of a dewdrop on a green leaf, bokeh background, morning mist.
A bowl of ramen with sliced pork, boiled egg, scallions and nori on a dark wooden table.
Digital art of a dragon flying over snowy mountains, dramatic clouds, epic fantasy landscape.
An astronaut floating inside a space station, earth visible through the round window.
A vintage poster of a train crossing a stone bridge over a deep valley, bold typography.
Studio product photo of a leather handbag on a white background, sharp focus, high detail.
Children playing football on a sandy beach at sunset, long shadows, turquoise waves.
Minimalist line drawing of a cat curled up asleep on a windowsill beside a potted plant.
A medieval knight in polished armour holding a banner, heraldic lion, castle courtyard.
Aerial view of terraced rice fields in spring, winding paths, small villages and farmers.
A cozy library with tall bookshelves, a reading chair, a fireplace and a sleeping dog.
Close-up of a hummingbird drinking nectar from a bright orange flower, frozen wings.
Ink illustration in the style of an old botanical book: ferns, mushrooms, moss and beetles.
A futuristic robot chef cooking pancakes in a bright kitchen, playful cartoon style.
Black and white street photography of a jazz musician playing saxophone under a lamp post.
A lighthouse on a rocky cliff during a violent storm, crashing waves, lightning, spray.
Still life with apples, pears, grapes, a copper jug and a linen cloth, baroque lighting.
An isometric pixel art scene of a tiny island with palm trees, a hut and a treasure chest.
Double exposure of a wolf silhouette and a pine forest, blue hour, ethereal atmosphere.
A girl reading a letter by candlelight, renaissance painting, rich velvet colours.
Snow leopard walking along a ridge in the Himalaya, thin air, crisp blue sky, telephoto lens.
Street market in Marrakech with spices, lanterns, woven carpets and colourful ceramics.
Paper cut art of a whale swimming among layered ocean waves and tiny fish.
A steampunk airship with brass propellers above Victorian rooftops and chimney smoke.
Foggy autumn park with a wooden bench, fallen maple leaves, yellow and crimson trees.
Logo design for a bakery called Sunrise Bread, simple flat vector, wheat and sun icon.
Underwater photograph of a coral reef with clownfish, sea turtles and rays of sunlight.
A samurai standing in a bamboo grove, katana drawn, cherry blossom petals in the wind.
Highly detailed map of an imaginary kingdom with rivers, forests, cities and compass rose.
Astronomical photograph of the Milky Way over a desert canyon, long exposure, stars.
Claymation style character of a friendly monster waving hello, pastel colours.
A modern living room with large windows, concrete walls, a grey sofa and indoor plants.
Racing car speeding through a mountain pass, motion blur, dust, afternoon sun.
Traditional Chinese ink wash painting of misty peaks, a pavilion and a lone fisherman.
Hand lettering that says Happy Birthday surrounded by balloons, confetti and stars.
A tabby kitten chasing a butterfly across a meadow of daisies and clover.
Portrait of a jazz-age woman with pearls and a feathered headband, art deco frame.
Thunderstorm over wheat fields in Kansas, supercell cloud, dramatic green sky.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.5 50% #1 @home & more!
Questions? Why not, where to, what's next, who's there, it's fine, we'll see, they're here.
"""
