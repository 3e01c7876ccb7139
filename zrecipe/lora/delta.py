"""What an adapter changes in one Linear layer, held between training, files, application and generation.

`LoraDelta(A, B, scale, alpha)` is the low-rank update ΔW = scale · B @ A in the PEFT orientation that
zrecipe's adapter file, mflux and diffusers share: A (rank, in), B (out, rank). Every adapter kind is a
delta class with the same small protocol (`AdapterDelta`), registered in `DELTA_KINDS`:

- `weight_delta(base_weight)`: ΔW (out, in) in float32, the change added to the base weight (DoRA-like
  kinds need the base weight; LoRA ignores it);
- `low_rank()`: (A, B') with ΔW = B' @ A when the kind is a plain additive low-rank update (the fast
  unfused path of `MultiLoRALinear` stacks these), or None;
- `scaled(strength)`: the same update times a strength;
- `file_parts(style)` / `from_file_parts(parts, scale_for)`: the tensors of one module in a file
  convention (`STYLES`: zrecipe's adapter layout, ComfyUI/mflux, diffusers, kohya) and back;
- `split_outputs(n)`: the update of a fused projection (qkv) as n row blocks;
- `PART_PATTERNS`: the tensor-name endings that mark the kind's parts in a file.

Parts every kind may carry (`SHARED_PARTS`): `.alpha`, and a weight-decomposition magnitude (DoRA's
`.dora_scale` / PEFT's `.lora_magnitude_vector`), which turns the kind's update into its DoRA form
(`zrecipe.lora.variants.DecomposedDelta`). `build_delta` turns one module's parts into its delta.
The other kinds (DoRA, LoKr, LoHa, full `.diff`) live in `zrecipe.lora.variants` and register here.

`fuse_linear(layer, ΔW)` is the one fuse: a quantised base is dequantised, updated in float32 and (by
default) re-quantised with the same bits and group size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Protocol

import mlx.core as mx
from mlx import nn

# File conventions a delta lays its tensors out in (`file_parts(style)`).
ZRECIPE = "zrecipe"  # lora_A / lora_B names, alpha always (zrecipe's adapter layout, checkpoints)
COMFY = "comfy"  # the same names, alpha only when the scale is not 1 (mflux, ComfyUI, ai-toolkit)
DIFFUSERS = "diffusers"  # the same names, the scale folded into the weights and no alpha (diffusers / PEFT)
KOHYA = "kohya"  # lora_down / lora_up names, alpha always (kohya, musubi-tuner)
STYLES = (ZRECIPE, COMFY, DIFFUSERS, KOHYA)
_PART_NAMES = {
    ZRECIPE: (".lora_A.weight", ".lora_B.weight"),
    COMFY: (".lora_A.weight", ".lora_B.weight"),
    DIFFUSERS: (".lora_A.weight", ".lora_B.weight"),
    KOHYA: (".lora_down.weight", ".lora_up.weight"),
}
# Parts any kind may carry: its alpha, and the magnitude of a weight-decomposed (DoRA) update.
SHARED_PARTS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\.alpha$"), "alpha"),
    (re.compile(r"\.dora_scale$"), "magnitude"),
    (re.compile(r"\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$"), "magnitude"),
)


class AdapterDelta(Protocol):
    """The protocol every adapter kind's delta follows (see the module docstring)."""

    KIND: ClassVar[str]  # the kind's name (DELTA_KINDS key; TRAINABLE_KINDS key if it trains)
    PART_PATTERNS: ClassVar[tuple[tuple[re.Pattern, str], ...]]  # tensor-name ending → part name

    @property
    def in_dims(self) -> int: ...

    @property
    def out_dims(self) -> int: ...

    @property
    def rank(self) -> int: ...  # for metadata

    @property
    def file_alpha(self) -> float: ...  # for metadata

    def weight_delta(self, base_weight: mx.array | None = None) -> mx.array: ...

    def low_rank(self) -> tuple[mx.array, mx.array] | None: ...

    def scaled(self, strength: float) -> AdapterDelta: ...

    def file_parts(self, style: str) -> dict: ...

    @classmethod
    def from_file_parts(cls, parts: dict, scale_for) -> AdapterDelta | str: ...

    def split_outputs(self, count: int) -> list[AdapterDelta | None] | str: ...  # fused qkv files


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or QuantizedLinear (whose weight packs 32 // bits columns per uint32)."""
    out_dims, in_dims = layer.weight.shape
    if isinstance(layer, nn.QuantizedLinear):
        in_dims = in_dims * 32 // layer.bits
    return int(out_dims), int(in_dims)


def weight_dtype(layer: nn.Module) -> mx.Dtype:
    """The dtype the layer computes in (a quantised layer's scales carry it)."""
    return layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype


def dense_weight(layer: nn.Module) -> mx.array:
    """The layer's weight (out, in), dequantised when the layer is quantised."""
    if isinstance(layer, nn.QuantizedLinear):
        return mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    return layer.weight


def fuse_linear(layer: nn.Module, delta: mx.array, requantize: bool = True) -> nn.Module:
    """A new layer equal to `layer` + ΔW (float32 arithmetic, cast back to the weight's dtype).

    A quantised layer is dequantised first and, with `requantize`, quantised again with its own bits and
    group size (one more rounding of the fused weight); without it the result is a plain Linear (QLoRA's
    merge). `layer` itself is left as it was.
    """
    weight = dense_weight(layer)
    has_bias = "bias" in layer
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    plain.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
    if has_bias:
        plain.bias = layer.bias
    if requantize and isinstance(layer, nn.QuantizedLinear):
        return nn.QuantizedLinear.from_linear(plain, layer.group_size, layer.bits)
    return plain


@dataclass(frozen=True)
class LoraDelta:
    """One module's low-rank update: ΔW = scale · B @ A. `alpha` is the file's alpha (None if absent)."""

    A: mx.array  # (rank, in)
    B: mx.array  # (out, rank)
    scale: float
    alpha: float | None = None

    KIND: ClassVar[str] = "lora"
    # Tensor-name endings → part. PEFT adds the adapter name before `.weight` (`lora_A.default.weight`);
    # some trainers write `lora.down.weight`.
    PART_PATTERNS: ClassVar[tuple[tuple[re.Pattern, str], ...]] = (
        (re.compile(r"\.lora_A(?:\.[A-Za-z0-9_-]+)?\.weight$"), "down"),
        (re.compile(r"\.lora_B(?:\.[A-Za-z0-9_-]+)?\.weight$"), "up"),
        (re.compile(r"\.lora_down\.weight$"), "down"),
        (re.compile(r"\.lora_up\.weight$"), "up"),
        (re.compile(r"\.lora\.down\.weight$"), "down"),
        (re.compile(r"\.lora\.up\.weight$"), "up"),
    )

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_dims(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_dims(self) -> int:
        return int(self.B.shape[0])

    @property
    def file_alpha(self) -> float:
        """The alpha to write: the file's own, else the one that reproduces the scale."""
        return float(self.alpha) if self.alpha is not None else self.scale * self.rank

    def delta(self) -> mx.array:
        """ΔW (out, in) in float32."""
        return self.scale * (self.B.astype(mx.float32) @ self.A.astype(mx.float32))

    def weight_delta(self, base_weight: mx.array | None = None) -> mx.array:
        return self.delta()

    def low_rank(self) -> tuple[mx.array, mx.array]:
        """(A, scale · B) in float32: ΔW = B' @ A."""
        return self.A.astype(mx.float32), self.scale * self.B.astype(mx.float32)

    def scaled(self, strength: float) -> LoraDelta:
        return LoraDelta(self.A, self.B, self.scale * float(strength), None)

    def file_parts(self, style: str) -> dict:
        """{suffix: tensor} of this module in a file convention (float32; the writer casts)."""
        a, b = self.A.astype(mx.float32), self.B.astype(mx.float32)
        down, up = _PART_NAMES[style]
        if style == DIFFUSERS:  # diffusers reads a PEFT file without alphas as scale 1
            return {down: a, up: self.scale * b}
        parts = {down: a, up: b}
        if style != COMFY or self.scale != 1.0:
            parts[".alpha"] = mx.array(self.file_alpha, dtype=mx.float32)
        return parts

    @classmethod
    def from_file_parts(cls, parts: dict, scale_for) -> LoraDelta | str:
        """The delta of one module's parts ({part: tensor}); an error message when they are no pair.
        `scale_for(rank, alpha)` gives the scale (PEFT metadata decides when the file has no alpha)."""
        if "down" not in parts or "up" not in parts:
            return "incomplete LoRA pair"
        a, b = parts["down"], parts["up"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            return f"A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair"
        alpha = float(parts["alpha"].item()) if "alpha" in parts else None
        return cls(a, b, scale_for(int(a.shape[0]), alpha), alpha)

    def split_outputs(self, count: int) -> list[LoraDelta | None] | str:
        """A fused projection's delta (B rows = [q; k; v]) as `count` deltas, one per output block.

        When B is block-diagonal over equal thirds of its rank (as zrecipe's fused kohya export and
        musubi's converter write it), each block keeps only its own rank slice: exact and compact, and a
        block whose slices are all zero (a projection padded in, never trained) is None. Otherwise every
        block shares the whole A (also exact, at the fused rank).
        """
        if self.B.shape[0] % count:
            return f"fused B has {self.B.shape[0]} rows, not a multiple of {count}"
        chunks = mx.split(self.B, count, axis=0)
        if self.rank % count == 0:
            r = self.rank // count
            outside = [
                mx.concatenate([c[:, : i * r], c[:, (i + 1) * r :]], axis=1) for i, c in enumerate(chunks)
            ]
            if not any(mx.any(x).item() for x in outside):
                own = [(self.A[i * r : (i + 1) * r], c[:, i * r : (i + 1) * r]) for i, c in enumerate(chunks)]
                # A block with A and B both zero is a projection the writer padded in: none was trained.
                return [
                    LoraDelta(a, b, self.scale, self.scale * r)
                    if mx.any(a).item() or mx.any(b).item()
                    else None
                    for a, b in own
                ]
        return [LoraDelta(self.A, c, self.scale, self.alpha) for c in chunks]


# Adapter kinds by name (a variant registers its delta class here; see docs/ARCHITECTURE.md).
DELTA_KINDS: dict[str, type] = {LoraDelta.KIND: LoraDelta}


def part_of(key: str) -> tuple[str, type | None, str] | None:
    """(key without its part ending, delta kind, part name) for a tensor name, None if no adapter part.
    The kind is None for a shared part (alpha, magnitude), which joins whatever kind its module has."""
    for pattern, part in SHARED_PARTS:
        match = pattern.search(key)
        if match:
            return key[: match.start()], None, part
    for kind in DELTA_KINDS.values():
        for pattern, part in kind.PART_PATTERNS:
            match = pattern.search(key)
            if match:
                return key[: match.start()], kind, part
    return None


def build_delta(kinds: set[type], parts: dict, scale_for):
    """The delta of one module from its parts ({part: tensor}) and the kinds they belong to; an error
    message when they name no kind or several. A magnitude part makes it the kind's DoRA form."""
    if not kinds:
        return f"only {', '.join(sorted(parts))}: no adapter weights"
    if len(kinds) > 1:
        return "mixes the parts of " + " and ".join(sorted(k.KIND for k in kinds)) + " adapters"
    own = dict(parts)
    magnitude = own.pop("magnitude", None)
    delta = next(iter(kinds)).from_file_parts(own, scale_for)
    if isinstance(delta, str) or magnitude is None:
        return delta
    from zrecipe.lora.variants import DecomposedDelta

    return DecomposedDelta.over(delta, magnitude)


# The other kinds register themselves in DELTA_KINDS (imported last: they build on the names above).
from zrecipe.lora import variants as _variants  # noqa: E402, F401
