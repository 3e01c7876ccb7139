"""The Z-Image single-stream DiT (diffusers `ZImageTransformer2DModel`) in MLX, with its one load path.

The parameter tree has exactly the diffusers checkpoint key names (`layers.12.attention.to_q.weight`,
`all_x_embedder.2-1.weight`, ...). Sequence layout and positions follow the reference:
caption and image runs are each padded to a multiple of 32 with learned pad tokens (not masked); caption
token i sits at RoPE position (1+i, 0, 0), image token (h, w) at (Lc+1, h, w) with Lc the padded caption
length, image pads at (0, 0, 0); the joint sequence is [image, caption]. Only batch padding is masked, so
every item's output equals its single-item output. All images of one batch share H and W (x is one array;
training batches come from one bucket).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.errors import ModelError
from zrecipe.models.z_image.transformer_blocks import (
    ADALN_EMBED_DIM,
    FinalLayer,
    RopeTables,
    TimestepEmbedder,
    TransformerBlock,
)
from zrecipe.models.z_image.weights import component_folder, load_component

SEQ_MULTIPLE = 32  # token runs are padded to a multiple of this with learned pad tokens
QUANT_GROUP_SIZE = 64
# Precision-sensitive / tiny layers kept in full precision when quantising (diffusers skips the first two
# when casting layer-wise; the embedder and final layer are small and touch the output directly).
_QUANT_SKIP_PREFIXES = ("t_embedder.", "cap_embedder.", "all_x_embedder.", "all_final_layer.")


@dataclass(frozen=True)
class TransformerConfig:
    """Every dimension of the transformer, read from `transformer/config.json`."""

    all_patch_size: tuple[int, ...]
    all_f_patch_size: tuple[int, ...]
    in_channels: int
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    n_kv_heads: int  # present in the config; the reference builds K/V with all n_heads, and so do we
    norm_eps: float
    qk_norm: bool
    cap_feat_dim: int
    rope_theta: float
    t_scale: float
    axes_dims: tuple[int, ...]
    axes_lens: tuple[int, ...]

    @classmethod
    def from_dict(cls, data: dict, source: str | Path = "config.json") -> TransformerConfig:
        """Build from a diffusers config dict; extra keys (`_class_name`, ...) are ignored."""
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise ModelError(
                f"{source}: transformer config lacks {', '.join(missing)}; is this a Z-Image model?"
            )
        if data.get("siglip_feat_dim") is not None:
            raise ModelError(f"{source}: the Z-Image Omni variant (siglip_feat_dim) is not supported.")
        tuples = {"all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"}
        try:
            values = {n: tuple(int(v) for v in data[n]) if n in tuples else data[n] for n in names}
            config = cls(**values)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{source}: malformed transformer config ({exc}).") from exc
        config.validate(source)
        return config

    def validate(self, source: str | Path = "config.json") -> None:
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        elif sum(self.axes_dims) != self.head_dim:
            problems.append(f"axes_dims {list(self.axes_dims)} must sum to the head dim {self.head_dim}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3 or any(d % 2 for d in self.axes_dims):
            problems.append("axes_dims / axes_lens must be three entries each, axes_dims even")
        if not self.all_patch_size or len(self.all_patch_size) != len(self.all_f_patch_size):
            problems.append("all_patch_size and all_f_patch_size must be non-empty and of equal length")
        if problems:
            raise ModelError(f"{source}: invalid transformer config: " + "; ".join(problems) + ".")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        """Width of the timestep conditioning fed to every adaLN Linear."""
        return min(self.dim, ADALN_EMBED_DIM)


# Other checkpoint layouts → diffusers naming. The original Z-Image / ComfyUI naming (`z_image_bf16.safetensors`:
# fused `attention.qkv`, `attention.out`, `x_embedder`, `final_layer`, optionally behind
# `model.diffusion_model.`) and mflux-save's naming (`t_embedder.linear1`, the final layer's modulation at
# index 0) differ from diffusers in disjoint key parts, so one table serves all of them, key by key.
# Prefix renames apply at the start of a key, infix renames anywhere; `{patch}` is the config's first
# "<patch>-<f_patch>" key. Renames act on module paths, so quantised triplets (.weight/.scales/.biases) follow.
_ORIGINAL_PREFIX = "model.diffusion_model."
_PREFIX_RENAMES = {
    "x_embedder.": "all_x_embedder.{patch}.",
    "final_layer.": "all_final_layer.{patch}.",
    "t_embedder.linear1.": "t_embedder.mlp.0.",  # mflux
    "t_embedder.linear2.": "t_embedder.mlp.2.",  # mflux
}
_INFIX_RENAMES = {
    ".attention.out.": ".attention.to_out.0.",
    ".attention.q_norm.": ".attention.norm_q.",
    ".attention.k_norm.": ".attention.norm_k.",
}
# mflux keeps the final layer's modulation Linear at index 0; diffusers (after a SiLU at 0) at index 1.
_FINAL_LAYER_RENAMES = {".adaLN_modulation.0.": ".adaLN_modulation.1."}
_FUSED_QKV = ".attention.qkv."
_DROPPED_KEYS = {"norm_final.weight"}  # an unused weight some original checkpoints carry (diffusers drops it)


class ZImageTransformer(nn.Module):
    """`module(x, t, cap_feats)` → raw model output (B, C, H, W), before the pipeline's negation."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        c = config
        self.config = c
        self.all_x_embedder = {}
        self.all_final_layer = {}
        for p, pf in zip(c.all_patch_size, c.all_f_patch_size, strict=True):
            width = pf * p * p * c.in_channels
            self.all_x_embedder[f"{p}-{pf}"] = nn.Linear(width, c.dim)
            self.all_final_layer[f"{p}-{pf}"] = FinalLayer(c.dim, width)
        self.noise_refiner = [
            TransformerBlock(c.dim, c.n_heads, c.norm_eps, c.qk_norm, modulation=True)
            for _ in range(c.n_refiner_layers)
        ]
        self.context_refiner = [
            TransformerBlock(c.dim, c.n_heads, c.norm_eps, c.qk_norm, modulation=False)
            for _ in range(c.n_refiner_layers)
        ]
        self.t_embedder = TimestepEmbedder(c.adaln_dim)
        self.cap_embedder = [nn.RMSNorm(c.cap_feat_dim, eps=c.norm_eps), nn.Linear(c.cap_feat_dim, c.dim)]
        self.x_pad_token = mx.zeros((1, c.dim))
        self.cap_pad_token = mx.zeros((1, c.dim))
        self.layers = [TransformerBlock(c.dim, c.n_heads, c.norm_eps, c.qk_norm) for _ in range(c.n_layers)]
        self.rope = None  # built on first call: a lazily built model materialises nothing

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the pad tokens, which are never quantised)."""
        return self.x_pad_token.dtype

    def __call__(
        self,
        x: mx.array,
        t: mx.array,
        cap_feats: list,
        patch_size: int | None = None,
        f_patch_size: int | None = None,
    ) -> mx.array:
        """x (B, C, H, W) latents, t (B,) model time 1−σ, cap_feats B arrays (L_i, cap_feat_dim)."""
        c = self.config
        p = patch_size or c.all_patch_size[0]
        pf = f_patch_size or c.all_f_patch_size[0]
        key = f"{p}-{pf}"
        self._check_inputs(x, t, cap_feats, key, p, pf)
        B, C, H, W = x.shape
        dtype = self.dtype
        if self.rope is None:
            self.rope = RopeTables(c.rope_theta, c.axes_dims, c.axes_lens)
        adaln = self.t_embedder(t.astype(mx.float32) * c.t_scale, dtype).astype(dtype)

        # Image tokens: patchify to (pH, pW, C)-ordered 64-wide vectors, embed, pad with x_pad_token.
        ht, wt = H // p, W // p
        n_img = ht * wt
        img_pad = -n_img % SEQ_MULTIPLE
        img = x.astype(dtype).reshape(B, C, ht, p, wt, p).transpose(0, 2, 4, 3, 5, 1).reshape(B, n_img, -1)
        img = self.all_x_embedder[key](img)
        if img_pad:
            img = mx.concatenate([img, mx.broadcast_to(self.x_pad_token, (B, img_pad, c.dim))], axis=1)

        # Caption tokens: embed all items at once, pad each to a multiple of 32 with cap_pad_token, then
        # pad the batch to the longest item with zeros (masked).
        lens = [int(f.shape[0]) for f in cap_feats]
        padded = [n + (-n % SEQ_MULTIPLE) for n in lens]
        cap_len = max(padded)
        embedded = mx.concatenate([f.astype(dtype) for f in cap_feats], axis=0)
        embedded = self.cap_embedder[1](self.cap_embedder[0](embedded))
        rows, start = [], 0
        for n, n_padded in zip(lens, padded, strict=True):
            parts = [embedded[start : start + n]]
            start += n
            if n_padded > n:
                parts.append(mx.broadcast_to(self.cap_pad_token, (n_padded - n, c.dim)))
            if cap_len > n_padded:
                parts.append(mx.zeros((cap_len - n_padded, c.dim), dtype=dtype))
            rows.append(mx.concatenate(parts, axis=0) if len(parts) > 1 else parts[0])
        cap = mx.stack(rows)

        img_rope, cap_rope = self._positions(B, ht, wt, img_pad, padded, cap_len)
        cap_mask = _key_mask([cap_len] * B, padded)
        joint_mask = _key_mask([n_img + img_pad + cap_len] * B, [n_img + img_pad + n for n in padded])

        for block in self.noise_refiner:
            img = block(img, None, img_rope, adaln)  # one image size per batch: no batch padding here
        for block in self.context_refiner:
            cap = block(cap, cap_mask, cap_rope)
        h = mx.concatenate([img, cap], axis=1)
        rope = tuple(mx.concatenate([a, b], axis=1) for a, b in zip(img_rope, cap_rope, strict=True))
        for block in self.layers:
            h = block(h, joint_mask, rope, adaln)
        out = self.all_final_layer[key](h[:, :n_img], adaln)

        # Unpatchify: (B, ht·wt, pH·pW·C) → (B, C, H, W).
        return out.reshape(B, ht, wt, p, p, C).transpose(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)

    def _check_inputs(self, x, t, cap_feats, key, p, pf) -> None:
        c = self.config
        if key not in self.all_x_embedder:
            raise ValueError(f"patch size {key} not in this model's {sorted(self.all_x_embedder)}")
        if pf != 1:
            raise ValueError("images have one frame: f_patch_size must be 1")
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[2] % p or x.shape[3] % p:
            raise ValueError(
                f"x must be (B, {c.in_channels}, H, W) with H, W multiples of {p}; got {x.shape}"
            )
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},); got {t.shape}")
        if len(cap_feats) != B or any(
            f.ndim != 2 or f.shape[1] != c.cap_feat_dim or f.shape[0] < 1 for f in cap_feats
        ):
            raise ValueError(f"cap_feats must be {B} non-empty arrays of shape (L, {c.cap_feat_dim})")
        longest = max(f.shape[0] + (-f.shape[0] % SEQ_MULTIPLE) for f in cap_feats)
        limits = [longest + 1, x.shape[2] // p, x.shape[3] // p]  # image tokens sit at axis-0 position Lc+1
        if any(n >= size for n, size in zip(limits, c.axes_lens, strict=True)):
            raise ValueError(f"caption or image too long for the RoPE tables (axes_lens {list(c.axes_lens)})")

    def _positions(self, B, ht, wt, img_pad, padded, cap_len):
        """RoPE cos/sin for the image run (B, Ni, ...) and the caption run (B, cap_len, ...)."""
        n_img = ht * wt
        real = mx.concatenate([mx.ones((n_img,), mx.int32), mx.zeros((img_pad,), mx.int32)])
        frame = (mx.array(padded, dtype=mx.int32)[:, None] + 1) * real[None]
        rows = mx.concatenate([mx.repeat(mx.arange(ht, dtype=mx.int32), wt), mx.zeros((img_pad,), mx.int32)])
        cols = mx.concatenate([mx.tile(mx.arange(wt, dtype=mx.int32), ht), mx.zeros((img_pad,), mx.int32)])
        img_pos = mx.stack(
            [frame, *mx.broadcast_to(mx.stack([rows, cols])[:, None], (2, B, n_img + img_pad))], axis=-1
        )
        # Batch padding of shorter captions gets positions too (never attended to, outputs discarded).
        seq = mx.arange(1, cap_len + 1, dtype=mx.int32)
        cap_pos = mx.stack([seq, mx.zeros_like(seq), mx.zeros_like(seq)], axis=-1)
        cap_pos = mx.broadcast_to(cap_pos[None], (B, cap_len, 3))
        return self.rope(img_pos), self.rope(cap_pos)

    def sanitize(self, weights: dict) -> dict:
        """Rename original / mflux keys to diffusers names and split fused qkv; diffusers keys pass through."""
        patch = f"{self.config.all_patch_size[0]}-{self.config.all_f_patch_size[0]}"
        out = {}
        for key, value in weights.items():
            key = key.removeprefix(_ORIGINAL_PREFIX)
            if key in _DROPPED_KEYS:
                continue
            for old, new in _PREFIX_RENAMES.items():
                if key.startswith(old):
                    key = new.format(patch=patch) + key.removeprefix(old)
            for old, new in _INFIX_RENAMES.items():
                key = key.replace(old, new)
            if key.startswith("all_final_layer."):
                for old, new in _FINAL_LAYER_RENAMES.items():
                    key = key.replace(old, new)
            if _FUSED_QKV in key:
                head, tail = key.split(_FUSED_QKV)
                for name, part in zip(("to_q", "to_k", "to_v"), mx.split(value, 3, axis=0), strict=True):
                    out[f"{head}.attention.{name}.{tail}"] = part
            else:
                out[key] = value
        return out


def _key_mask(lengths: list[int], valid: list[int]) -> mx.array | None:
    """Boolean key mask (B, 1, 1, L) keeping each item's first `valid[i]` tokens; None when nothing is padded."""
    if all(v == n for v, n in zip(valid, lengths, strict=True)):
        return None
    keep = mx.arange(lengths[0])[None] < mx.array(valid)[:, None]
    return keep[:, None, None, :]


def export_weights(model: ZImageTransformer) -> dict:
    """The model's weights as a flat {diffusers key: array} dict (LoRA must be fused first)."""
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        raise ValueError("cannot export a quantised transformer: load it unquantised to export weights")
    return dict(tree_flatten(model.parameters()))


def quantize_transformer(model: ZImageTransformer, bits: int) -> None:
    """Quantise the Linear layers in place (4 or 8 bits), skipping layers that cannot or should not be."""
    if bits not in (4, 8):
        raise ModelError(f"quantize must be 4 or 8 bits, not {bits!r}.")

    def wanted(path: str, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Linear)
            and module.weight.shape[1] % QUANT_GROUP_SIZE == 0
            and not (path + ".").startswith(_QUANT_SKIP_PREFIXES)
        )

    nn.quantize(model, group_size=QUANT_GROUP_SIZE, bits=bits, class_predicate=wanted)


def load_transformer(path: str | Path, dtype=None, quantize: int | None = None) -> ZImageTransformer:
    """Load the transformer from a model folder (with `transformer/`) or the transformer folder itself.

    `dtype`: mx dtype or its name; default float32 on the CPU backend, bfloat16 on a GPU.
    `quantize`: None, 4 or 8 — quantise the Linear layers after loading. Weights stored quantised (an
    `mflux-save -q` folder) load quantised as they are; `quantize` must then be None or their bit width.
    """

    def build(config: dict, source: Path) -> ZImageTransformer:
        return ZImageTransformer(TransformerConfig.from_dict(config, source=source))

    model = load_component(path, "transformer", build, dtype)
    stored = stored_bits(model)
    if stored:
        if quantize and {quantize} != stored:
            raise ModelError(
                f"{component_folder(path, 'transformer')}: the weights are stored quantised to "
                f"{'/'.join(map(str, sorted(stored)))} bits; quantize: {quantize} cannot requantise them. "
                "Remove `quantize` (or set it to the stored bits), or use an unquantised model."
            )
    elif quantize:
        quantize_transformer(model, quantize)
    mx.eval(model.parameters())
    return model


def stored_bits(model: nn.Module) -> set[int]:
    """The bit widths of the model's quantised layers (empty when nothing is quantised)."""
    return {m.bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)}
