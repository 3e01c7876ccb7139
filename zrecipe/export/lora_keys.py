"""LoRA key conventions: parse a tensor name into (module stem, part) and map stems onto Z-Image modules.

Conventions seen in the wild for Z-Image LoRAs (all handled here, data-driven):

- zrecipe / PEFT without prefix: `layers.3.attention.to_q.lora_A.weight`, `.lora_B.weight`, `.alpha`
- mflux / ComfyUI / ai-toolkit: the same behind `diffusion_model.` (or `model.diffusion_model.`)
- diffusers / PEFT: behind `transformer.` (or `base_model.model.`), optionally `.lora_A.default.weight`
- kohya: `lora_unet_layers_3_attention_to_q.lora_down.weight` / `.lora_up.weight` / `.alpha`
- dot style (some trainers): `....lora.down.weight` / `.lora.up.weight`, `attention.to.q`
- original Z-Image naming: fused `attention.qkv` (B rows = [q; k; v], A shared), `attention.out`,
  `x_embedder`, `final_layer.*`

Kohya names replace every `.` with `_`, which is ambiguous (`to_q`, `feed_forward`, `adaLN_modulation`);
they are resolved against the model's own module paths when known, else against Z-Image's naming grammar.
"""

from __future__ import annotations

import re

from zrecipe.lora.delta import part_of

# Prefixes stripped before resolution. `lora_unet_` / `lora_transformer_` mark underscored (kohya) stems.
_DOTTED_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_", "lycoris_")

# Z-Image's naming grammar, for kohya stems when no model is at hand (underscored leaf → dotted leaf).
_BLOCK_RE = re.compile(r"^(layers|noise_refiner|context_refiner)_(\d+)_(.+)$", re.IGNORECASE)
_BLOCK_LEAVES = {
    "attention_to_q": "attention.to_q",
    "attention_to_k": "attention.to_k",
    "attention_to_v": "attention.to_v",
    "attention_to_out_0": "attention.to_out.0",
    "attention_qkv": "attention.qkv",
    "attention_out": "attention.out",
    "feed_forward_w1": "feed_forward.w1",
    "feed_forward_w2": "feed_forward.w2",
    "feed_forward_w3": "feed_forward.w3",
    "adaln_modulation_0": "adaLN_modulation.0",
}
_GLOBAL_LEAVES = {
    "all_x_embedder_2-1": "all_x_embedder.2-1",
    "all_final_layer_2-1_linear": "all_final_layer.2-1.linear",
    "all_final_layer_2-1_adaln_modulation_1": "all_final_layer.2-1.adaLN_modulation.1",
    "x_embedder": "x_embedder",
    "final_layer_linear": "final_layer.linear",
    "final_layer_adaln_modulation_1": "final_layer.adaLN_modulation.1",
    "cap_embedder_1": "cap_embedder.1",
    "t_embedder_mlp_0": "t_embedder.mlp.0",
    "t_embedder_mlp_2": "t_embedder.mlp.2",
}
# mflux's own module names where they differ from the checkpoint's (its training adapters use them).
_MFLUX_NAMES = (
    (re.compile(r"^t_embedder\.linear1$"), "t_embedder.mlp.0"),
    (re.compile(r"^t_embedder\.linear2$"), "t_embedder.mlp.2"),
    (re.compile(r"^(all_final_layer\.[^.]+)\.adaLN_modulation\.0$"), r"\1.adaLN_modulation.1"),
)
_FUSED_QKV = ".attention.qkv"
_QKV_TARGETS = ("to_q", "to_k", "to_v")


def parse_key(key: str) -> tuple[str, type, str, bool] | None:
    """(stem, delta kind, part, underscored) for a LoRA tensor name, or None when it is not one."""
    found = part_of(key)
    if found is None:
        return None
    stem, kind, part = found
    for prefix in _KOHYA_PREFIXES:
        if stem.startswith(prefix):
            return stem.removeprefix(prefix), kind, part, True
    for prefix in _DOTTED_PREFIXES:
        if stem.startswith(prefix):
            stem = stem.removeprefix(prefix)
            break
    return stem, kind, part, False


def key_convention(keys: list[str]) -> str:
    """A short name of the convention a file's keys follow (for messages and metadata)."""
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        return "kohya"
    if any(k.startswith(("diffusion_model.", "model.diffusion_model.")) for k in keys):
        return "mflux"
    if any(k.startswith(("transformer.", "base_model.model.")) for k in keys):
        return "diffusers"
    return "zrecipe"


def _kohya_to_dotted(stem: str, known: dict[str, str] | None) -> str | None:
    """Underscored kohya stem → dotted module path (via the model's own paths first, then the grammar)."""
    lowered = stem.lower()
    if known is not None and lowered in known:
        return known[lowered]
    block = _BLOCK_RE.match(stem)
    if block:
        leaf = _BLOCK_LEAVES.get(block.group(3).lower())
        return f"{block.group(1).lower()}.{block.group(2)}.{leaf}" if leaf else None
    return _GLOBAL_LEAVES.get(lowered)


def underscored_index(paths) -> dict[str, str]:
    """{kohya form (lower case): module path} for the model's module paths."""
    return {p.replace(".", "_").lower(): p for p in paths}


def resolve_stem(
    stem: str, underscored: bool, paths: set[str] | None, patch: str = "2-1"
) -> list[tuple[str, int | None]] | None:
    """Module targets of one LoRA stem: [(path, None)] or, for a fused qkv LoRA, [(to_q, 0), (to_k, 1),
    (to_v, 2)] (the chunk of B rows each gets). None when the stem names nothing Z-Image has.

    `paths` is the set of the model's Linear module paths (None: any name in Z-Image's grammar passes).
    """
    if underscored:
        dotted = _kohya_to_dotted(stem, underscored_index(paths) if paths is not None else None)
        if dotted is None:
            return None
        stem = dotted
    # Dot-style trainers write `attention.to.q`; the original naming says `attention.out`.
    stem = re.sub(r"\.attention\.to\.([qkv])$", r".attention.to_\1", stem)
    stem = re.sub(r"\.attention\.(?:to\.)?out(?:\.0)?$", ".attention.to_out.0", stem)
    for pattern, replacement in _MFLUX_NAMES:
        stem = pattern.sub(replacement, stem)
    if stem == "x_embedder":
        stem = f"all_x_embedder.{patch}"
    elif stem.startswith("final_layer."):
        stem = f"all_final_layer.{patch}." + stem.removeprefix("final_layer.")
    if stem.endswith(_FUSED_QKV):
        head = stem[: -len(_FUSED_QKV)]
        targets = [(f"{head}.attention.{name}", i) for i, name in enumerate(_QKV_TARGETS)]
    else:
        targets = [(stem, None)]
    if paths is not None and any(path not in paths for path, _ in targets):
        return None
    return targets


def patch_key(paths) -> str:
    """The "<patch>-<f_patch>" key of the model's embedder (for original-naming `x_embedder` LoRAs)."""
    for path in paths or ():
        if path.startswith("all_x_embedder."):
            return path.split(".")[1]
    return "2-1"


def kohya_name(path: str) -> str:
    """`layers.3.attention.to_q` → `lora_unet_layers_3_attention_to_q` (kohya's module naming, which
    musubi-tuner's Z-Image LoRA uses: its modules keep the checkpoint's names)."""
    return "lora_unet_" + path.replace(".", "_")


# ComfyUI's own Z-Image module names (comfy/ldm/lumina/model.py) where they differ from the checkpoint's;
# comfy/lora.py maps `lora_unet_<its name with _>` onto each of its weights.
_COMFY_NAMES = (
    (re.compile(r"\.attention\.to_out\.0$"), ".attention.out"),
    (re.compile(r"^all_x_embedder\.2-1$"), "x_embedder"),
    (re.compile(r"^all_final_layer\.2-1\."), "final_layer."),
)


def comfy_kohya_name(path: str) -> str:
    """The kohya name ComfyUI maps onto the Z-Image layer at `path` (`attention.to_out.0` is its
    `attention.out`; q/k/v have no name of their own there: they are written fused, see `qkv_head`)."""
    for pattern, replacement in _COMFY_NAMES:
        path = pattern.sub(replacement, path)
    return kohya_name(path)


def qkv_head(path: str) -> tuple[str, int] | None:
    """(`<block>.attention`, index 0/1/2) for a q/k/v projection path, else None."""
    for index, name in enumerate(_QKV_TARGETS):
        suffix = f".attention.{name}"
        if path.endswith(suffix):
            return path.removesuffix(f".{name}"), index
    return None
