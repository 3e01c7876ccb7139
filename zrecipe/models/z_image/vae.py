"""The Z-Image VAE: diffusers `AutoencoderKL` (FLUX.1 configuration) in MLX, channels-last.

Built from `vae/config.json` alone (nothing about the real sizes is hard-coded), loaded through the strict
path in `weights.py`. Images are (B,H,W,3) in [−1,1]; latents (B,H/f,W/f,C) unscaled, f = 2^(levels−1).
`to_model_latents` / `from_model_latents` apply the config's shift and scale for the transformer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.errors import ModelError
from zrecipe.models.z_image.vae_blocks import Decoder, Encoder
from zrecipe.models.z_image.weights import component_folder, load_component

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
# diffusers blends tiles over a quarter of the tile (`tile_overlap_factor = 0.25`).
TILE_OVERLAP = 0.25


@dataclass(frozen=True)
class VAEConfig:
    """The hyper-parameters of diffusers' AutoencoderKL (defaults = diffusers' defaults)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    # Not a diffusers config key: diffusers hard-codes 1e-6 for every VAE GroupNorm; read if present.
    norm_eps: float = 1e-6
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, data: dict, source: str = "vae/config.json") -> VAEConfig:
        """Build from a config.json dict; unknown keys (`_class_name`, `force_upcast`, ...) are ignored."""
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        if isinstance(kwargs.get("sample_size"), (list, tuple)):
            kwargs["sample_size"] = kwargs["sample_size"][0]
        cfg = cls(**kwargs)
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        problems = []
        levels = len(self.block_out_channels)
        if levels == 0:
            problems.append("block_out_channels is empty")
        if self.down_block_types != ("DownEncoderBlock2D",) * levels:
            problems.append(
                f"down_block_types must be {levels}× DownEncoderBlock2D, got {self.down_block_types}"
            )
        if self.up_block_types != ("UpDecoderBlock2D",) * levels:
            problems.append(f"up_block_types must be {levels}× UpDecoderBlock2D, got {self.up_block_types}")
        if self.act_fn not in ("silu", "swish"):
            problems.append(f"act_fn {self.act_fn!r} is not supported (only silu)")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            problems.append(
                f"block_out_channels {bad} not divisible by norm_num_groups {self.norm_num_groups}"
            )
        if problems:
            raise ModelError(f"{source}: unsupported AutoencoderKL config: " + "; ".join(problems) + ".")

    @property
    def downscale(self) -> int:
        """Pixels per latent along each axis (8 for the FLUX VAE)."""
        return 2 ** (len(self.block_out_channels) - 1)


class AutoencoderKL(nn.Module):
    """diffusers AutoencoderKL; parameter paths equal the diffusers checkpoint keys."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        c = config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * c, 2 * c, kernel_size=1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(c, c, kernel_size=1)

    # -- public API ---------------------------------------------------------------------------------

    def encode(self, images: mx.array, tile: int | None = None) -> mx.array:
        """Images (B,H,W,in) in [−1,1] → posterior mean (B,H/f,W/f,latent), unscaled.

        `tile` (pixels, a multiple of 4·f) encodes overlapping tiles one at a time (low-RAM mode).
        """
        return self.encode_with_logvar(images, tile)[0]

    def encode_with_logvar(self, images: mx.array, tile: int | None = None) -> tuple[mx.array, mx.array]:
        """Posterior (mean, logvar), logvar clamped to [−30, 20] as diffusers does."""
        images = images.astype(self.encoder.conv_in.weight.dtype)
        f = self.config.downscale
        t = None if tile is None else _tile_units(tile, f)
        if t is not None and max(images.shape[1:3]) > tile:
            moments = _tiled(self._moments, images, t, in_unit=f, out_unit=1)
        else:
            moments = self._moments(images)
        mean, logvar = mx.split(moments, 2, axis=-1)
        return mean, mx.clip(logvar, *LOGVAR_RANGE)

    def decode(self, latents: mx.array, tile: int | None = None) -> mx.array:
        """Unscaled latents (B,h,w,latent) → images (B,h·f,w·f,out), roughly in [−1,1] (not clipped).

        `tile` (pixels of the output image, a multiple of 4·f) decodes overlapping tiles one at a time.
        """
        latents = latents.astype(self.decoder.conv_in.weight.dtype)
        f = self.config.downscale
        t = None if tile is None else _tile_units(tile, f)
        if t is not None and max(latents.shape[1:3]) > t:
            return _tiled(self._decode, latents, t, in_unit=1, out_unit=f)
        return self._decode(latents)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoint tensors (diffusers, original or mflux-save layout) → this module's names and layout."""
        return sanitize(weights, levels=len(self.config.block_out_channels))

    # -- internals ----------------------------------------------------------------------------------

    def _moments(self, images: mx.array) -> mx.array:
        moments = self.encoder(images)
        return self.quant_conv(moments) if "quant_conv" in self else moments

    def _decode(self, latents: mx.array) -> mx.array:
        if "post_quant_conv" in self:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


def _tile_units(tile: int, f: int) -> int:
    """The tile size in latent units; it must split into whole pixels and a whole-latent overlap."""
    if tile <= 0 or tile % (4 * f):
        raise ValueError(f"VAE tile size {tile} must be a positive multiple of {4 * f} pixels.")
    return tile // f


def _tiled(fn, x: mx.array, t: int, in_unit: int, out_unit: int) -> mx.array:
    """Apply `fn` to overlapping tiles of `x` and blend them linearly, as diffusers' tiled_encode/decode.

    Sizes are in latent units: tiles of `t` start every `t − t/4`; each tile is blended with its upper
    and left neighbours (already blended, as diffusers mutates them in place) over `t/4`, then cropped
    to `t − t/4`. `in_unit` / `out_unit` are the pixels per latent unit of `fn`'s input and output.
    """
    if x.shape[1] % in_unit or x.shape[2] % in_unit:
        raise ValueError(f"tiled VAE input {x.shape[1]}×{x.shape[2]} must be a multiple of {in_unit} pixels.")
    blend = int(t * TILE_OVERLAP)
    stride = t - blend
    h, w = x.shape[1] // in_unit, x.shape[2] // in_unit
    rows = []
    for i in range(0, h, stride):
        row = []
        for j in range(0, w, stride):
            out = fn(x[:, i * in_unit : (i + t) * in_unit, j * in_unit : (j + t) * in_unit])
            # Evaluate tile by tile so that only one tile's activations are alive at a time.
            mx.eval(out)
            row.append(out)
        rows.append(row)
    limit = stride * out_unit
    result_rows = []
    for i, row in enumerate(rows):
        parts = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, blend * out_unit, axis=1)
            if j > 0:
                tile = _blend(row[j - 1], tile, blend * out_unit, axis=2)
            row[j] = tile
            parts.append(tile[:, :limit, :limit])
        result_rows.append(mx.concatenate(parts, axis=2))
    return mx.concatenate(result_rows, axis=1)


def _blend(a: mx.array, b: mx.array, extent: int, axis: int) -> mx.array:
    """Cross-fade the last `extent` rows (axis 1) or columns (axis 2) of `a` into the first ones of `b`."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    ramp = (mx.arange(extent, dtype=mx.float32) / extent).reshape(shape)
    head = [slice(None)] * 4
    head[axis] = slice(0, extent)
    tail = [slice(None)] * 4
    tail[axis] = slice(a.shape[axis] - extent, None)
    rest = [slice(None)] * 4
    rest[axis] = slice(extent, None)
    mixed = (a[tuple(tail)] * (1 - ramp) + b[tuple(head)] * ramp).astype(b.dtype)
    return mx.concatenate([mixed, b[tuple(rest)]], axis=axis)


# -- latent space helpers ---------------------------------------------------------------------------


def to_model_latents(mean: mx.array, config) -> mx.array:
    """Unscaled VAE latents → the transformer's latent space: (mean − shift)·scale."""
    cfg = getattr(config, "config", config)
    return (mean - (cfg.shift_factor or 0.0)) * cfg.scaling_factor


def from_model_latents(latents: mx.array, config) -> mx.array:
    """The transformer's latents → unscaled VAE latents: latents/scale + shift (inverse of the above)."""
    cfg = getattr(config, "config", config)
    return latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)


# -- weights ----------------------------------------------------------------------------------------

# Older diffusers checkpoints name the mid-block attention projections like the deprecated AttentionBlock.
LEGACY_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(
    r"^(.*\.attentions\.\d+\.)(" + "|".join(LEGACY_ATTENTION_NAMES) + r")\.(weight|bias)$"
)
_ATTENTION_PROJ_RE = re.compile(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
# The original (BFL / ComfyUI `ae.safetensors`, LDM) naming → diffusers. `{up}` is the decoder level counted
# the diffusers way: the original numbers decoder levels from the output end, diffusers from the latent end.
_ORIGINAL_PREFIXES = ("first_stage_model.", "vae.")
_ORIGINAL_RENAMES = [
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), "encoder.down_blocks.{0}.resnets.{1}."),
    (
        re.compile(r"^encoder\.down\.(\d+)\.downsample\.conv\."),
        "encoder.down_blocks.{0}.downsamplers.0.conv.",
    ),
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\."), "decoder.up_blocks.{up}.resnets.{1}."),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv\."), "decoder.up_blocks.{up}.upsamplers.0.conv."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_1\."), "{0}.mid_block.resnets.0."),
    (re.compile(r"^(encoder|decoder)\.mid\.block_2\."), "{0}.mid_block.resnets.1."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.norm\."), "{0}.mid_block.attentions.0.group_norm."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.([qkv])\."), "{0}.mid_block.attentions.0.to_{1}."),
    (re.compile(r"^(encoder|decoder)\.mid\.attn_1\.proj_out\."), "{0}.mid_block.attentions.0.to_out.0."),
    (re.compile(r"^(encoder|decoder)\.norm_out\."), "{0}.conv_norm_out."),
    (re.compile(r"\.nin_shortcut\."), ".conv_shortcut."),
]
_ORIGINAL_UP = re.compile(r"^(?:first_stage_model\.|vae\.)?decoder\.up\.(\d+)\.")
# mflux-save names a few convs and norms one module deeper, and stores convs already in MLX's OHWI layout.
_MFLUX_RENAMES = {
    "encoder.conv_in.conv2d.": "encoder.conv_in.",
    "encoder.conv_out.conv2d.": "encoder.conv_out.",
    "encoder.conv_norm_out.norm.": "encoder.conv_norm_out.",
    "decoder.conv_in.conv.": "decoder.conv_in.",
    "decoder.conv_out.conv.": "decoder.conv_out.",
    "decoder.conv_norm_out.norm.": "decoder.conv_norm_out.",
}


def sanitize(weights: dict, levels: int | None = None) -> dict:
    """Checkpoint tensors → this module's names and layout; renames and reshapes only.

    Accepts diffusers naming (also its legacy attention names), the original BFL naming of the FLUX
    `ae.safetensors` and mflux-save's naming. PyTorch layouts get conv OIHW → OHWI and 1×1-conv attention
    weights → Linear; mflux-save already stores MLX layouts. `levels` (the config's number of blocks)
    maps the original decoder numbering; None counts the levels in the keys.
    """
    mflux = any(key.startswith(tuple(_MFLUX_RENAMES)) for key in weights)
    if levels is None:
        levels = 1 + max((int(m.group(1)) for k in weights if (m := _ORIGINAL_UP.match(k))), default=0)
    out = {}
    for key, value in weights.items():
        key = _diffusers_key(key, levels)
        if value.ndim == 4 and not mflux:
            if _ATTENTION_PROJ_RE.search(key):
                value = value.reshape(value.shape[0], value.shape[1])
            else:
                value = value.transpose(0, 2, 3, 1)
        out[key] = value
    return out


def _diffusers_key(key: str, levels: int) -> str:
    for prefix in _ORIGINAL_PREFIXES:
        key = key.removeprefix(prefix)
    for pattern, replacement in _ORIGINAL_RENAMES:
        m = pattern.search(key)
        if m:
            up = levels - 1 - int(m.group(1)) if "{up}" in replacement else None
            key = key[: m.start()] + replacement.format(*m.groups(), up=up) + key[m.end() :]
    for old, new in _MFLUX_RENAMES.items():
        if key.startswith(old):
            key = new + key.removeprefix(old)
    m = _LEGACY_RE.match(key)
    if m:
        key = f"{m.group(1)}{LEGACY_ATTENTION_NAMES[m.group(2)]}.{m.group(3)}"
    return key


def export_weights(model: AutoencoderKL) -> dict:
    """The model's parameters as a diffusers checkpoint dict (diffusers names, conv weights OIHW)."""
    return {k: (v.transpose(0, 3, 1, 2) if v.ndim == 4 else v) for k, v in tree_flatten(model.parameters())}


def vae_folder(path: str | Path) -> Path:
    """The VAE component folder: `path/vae` for a model folder, else `path` itself."""
    return component_folder(path, "vae")


def load_vae(path: str | Path, dtype=None) -> AutoencoderKL:
    """Load the VAE of a model folder (or of its `vae/` folder) strictly.

    `dtype` (mx dtype or "float32"/"bfloat16"/"float16"): default float32 on CPU, bfloat16 on GPU.
    """

    def build(config: dict, source: Path) -> AutoencoderKL:
        return AutoencoderKL(VAEConfig.from_dict(config, source=str(source)))

    model = load_component(path, "vae", build, dtype)
    model.eval()
    return model
