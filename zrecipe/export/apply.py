"""Apply one or several LoRAs (each with its own strength) to a loaded transformer, for generation.

Unfused (default): each targeted Linear is wrapped by `MultiLoRALinear`, computing
`base(x) + (x @ A_cat^T) @ B_cat^T` where A_cat stacks every LoRA's A and B_cat every LoRA's
`strength · scale · B`: Σ_i s_i·(x@A_i^T)@B_i^T in one low-rank matmul pair, base weights untouched.
Fused (`fuse=True`): ΔW = Σ s_i·scale_i·B_i@A_i is added into the weights once (fp32 arithmetic, cast back);
faster per step. A quantised layer is dequantised, updated and re-quantised with the same bits and group size,
which adds one rounding of the fused weight.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten

from zrecipe.errors import UserError
from zrecipe.export.lora_formats import LoraWeights, read_lora


def _in_features(layer: nn.Module) -> int:
    if isinstance(layer, nn.QuantizedLinear):
        return layer.weight.shape[1] * 32 // layer.bits  # packed uint32 columns
    return layer.weight.shape[1]


class MultiLoRALinear(nn.Module):
    """A frozen base Linear (or QuantizedLinear) plus the stacked low-rank updates of several LoRAs."""

    def __init__(self, base: nn.Module, a_cat: mx.array, b_cat: mx.array):
        super().__init__()
        self.base = base
        self.lora_a = a_cat  # (R, in): every LoRA's A stacked
        self.lora_b = b_cat  # (out, R): every LoRA's strength·scale·B side by side
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (x @ self.lora_a.T.astype(x.dtype)) @ self.lora_b.T.astype(x.dtype)
        return y + z.astype(y.dtype)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of every Linear / QuantizedLinear layer a LoRA can target."""
    shapes: dict[str, tuple[int, int]] = {}
    wrapped: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, MultiLoRALinear) or type(module).__name__ == "LoRALinear":
            inner = module.base if isinstance(module, MultiLoRALinear) else module.linear
            shapes[path] = (inner.weight.shape[0], _in_features(inner))
            wrapped.add(path)
        elif isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            shapes[path] = (module.weight.shape[0], _in_features(module))
    return {p: s for p, s in shapes.items() if p.rsplit(".", 1)[0] not in wrapped}


def _weight_dtype(layer: nn.Module) -> mx.Dtype:
    return layer.scales.dtype if isinstance(layer, nn.QuantizedLinear) else layer.weight.dtype


def _fused(layer: nn.Module, delta: mx.array) -> nn.Module:
    """`layer` with ΔW added to its weight (a new module; the input layer is left as it was)."""
    if isinstance(layer, nn.QuantizedLinear):
        weight = mx.dequantize(layer.weight, layer.scales, layer.biases, layer.group_size, layer.bits)
    else:
        weight = layer.weight
    has_bias = "bias" in layer
    plain = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    plain.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
    if has_bias:
        plain.bias = layer.bias
    if isinstance(layer, nn.QuantizedLinear):
        return nn.QuantizedLinear.from_linear(plain, layer.group_size, layer.bits)
    return plain


def apply_loras(
    transformer: nn.Module,
    loras: list,
    scales: list[float] | None = None,
    fuse: bool = False,
    allow_unmatched: bool = False,
) -> list[str]:
    """Apply `loras` (LoraWeights or paths of LoRA files) with strengths `scales` (default 1.0 each).

    Returns the module paths changed. Paths are read against the transformer's own layers, so foreign
    naming resolves and a LoRA for another model is refused (see `read_lora`).
    """
    scales = [1.0] * len(loras) if scales is None else [float(s) for s in scales]
    if len(scales) != len(loras):
        raise UserError(
            f"{len(loras)} LoRA file(s) but {len(scales)} scale(s): give one scale per LoRA "
            "(or none for 1.0 each)."
        )
    shapes = linear_shapes(transformer)
    loaded = [
        lora if isinstance(lora, LoraWeights) else read_lora(Path(lora), shapes, allow_unmatched)
        for lora in loras
    ]
    for lora in loaded:
        if lora.unmatched:  # only reachable with allow_unmatched: say what was left out
            warnings.warn(
                f"{lora.source}: skipped {len(lora.unmatched)} key(s) matching no layer: "
                + ", ".join(lora.unmatched[:20]),
                stacklevel=2,
            )
    per_path: dict[str, list[tuple[mx.array, mx.array]]] = {}
    for lora, strength in zip(loaded, scales, strict=True):
        for path, d in lora.deltas.items():
            if path not in shapes:
                raise UserError(f"{lora.source}: layer {path} does not exist in this transformer.")
            # strength · scale folded into B in fp32 before any cast.
            per_path.setdefault(path, []).append(
                (d.A.astype(mx.float32), (strength * d.scale) * d.B.astype(mx.float32))
            )
    modules = dict(transformer.named_modules())
    updates = []
    for path, pairs in sorted(per_path.items()):
        layer = modules[path]
        previous_a = previous_b = None
        if isinstance(layer, MultiLoRALinear):  # a second apply_loras call stacks onto the first
            layer, previous_a, previous_b = layer.base, layer.lora_a, layer.lora_b
        a_cat = mx.concatenate([a for a, _ in pairs], axis=0)
        b_cat = mx.concatenate([b for _, b in pairs], axis=1)
        if previous_a is not None:
            a_cat = mx.concatenate([previous_a.astype(mx.float32), a_cat], axis=0)
            b_cat = mx.concatenate([previous_b.astype(mx.float32), b_cat], axis=1)
        if fuse:
            updates.append((path, _fused(layer, b_cat @ a_cat)))
        else:
            dtype = _weight_dtype(layer)
            updates.append((path, MultiLoRALinear(layer, a_cat.astype(dtype), b_cat.astype(dtype))))
    if updates:
        transformer.update_modules(tree_unflatten(updates))
        mx.eval([m.parameters() for _, m in updates])
    return [p for p, _ in updates]
