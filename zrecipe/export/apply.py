"""Apply one or several LoRAs (each with its own strength) to a loaded transformer, for generation.

Unfused (default): each targeted Linear is wrapped by `MultiLoRALinear`, computing
`base(x) + (x @ A_cat^T) @ B_cat^T` where A_cat stacks every LoRA's A and B_cat every LoRA's
`strength · scale · B`: Σ_i s_i·(x@A_i^T)@B_i^T in one low-rank matmul pair, base weights untouched.
An adapter kind that is not a plain low-rank update is added into the weights instead.
Fused (`fuse=True`): ΔW = Σ s_i·ΔW_i is added into the weights once (`zrecipe.lora.delta.fuse_linear`:
fp32 arithmetic, cast back; a quantised layer is dequantised, updated and re-quantised with the same bits
and group size, which adds one rounding of the fused weight); faster per step.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_unflatten

from zrecipe.errors import UserError
from zrecipe.export.lora_formats import LoraWeights, read_lora
from zrecipe.lora.delta import dense_weight, fuse_linear
from zrecipe.lora.layers import AdapterLayer, MultiLoRALinear
from zrecipe.lora.layers import linear_shapes as linear_shapes  # public here: callers read shapes to match

__all__ = ["MultiLoRALinear", "apply_loras", "linear_shapes"]


def apply_loras(
    transformer: nn.Module,
    loras: list,
    scales: list[float] | None = None,
    fuse: bool = False,
    allow_unmatched: bool = False,
) -> list[str]:
    """Apply `loras` (LoraWeights or paths of LoRA files) with strengths `scales` (default 1.0 each).

    Returns the module paths changed. Paths are read against the transformer's own layers, so foreign
    naming resolves and a LoRA for another model is refused (see `read_lora`). A second call stacks onto
    the LoRAs already applied.
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
    per_path: dict[str, list] = {}
    for lora, strength in zip(loaded, scales, strict=True):
        for path, delta in lora.deltas.items():
            if path not in shapes:
                raise UserError(f"{lora.source}: layer {path} does not exist in this transformer.")
            per_path.setdefault(path, []).append(delta.scaled(strength))
    modules = dict(transformer.named_modules())
    updates = [(path, _applied(modules[path], deltas, fuse)) for path, deltas in sorted(per_path.items())]
    if updates:
        transformer.update_modules(tree_unflatten(updates))
        mx.eval([m.parameters() for _, m in updates])
    return [p for p, _ in updates]


def _applied(layer: nn.Module, deltas: list, fuse: bool) -> nn.Module:
    """`layer` with `deltas` (already at their strengths) applied, fused into the weights or stacked."""
    low_rank = [d for d in deltas if d.low_rank() is not None]
    dense = [d for d in deltas if d.low_rank() is None]
    if isinstance(layer, AdapterLayer) and (fuse or dense):  # an earlier call's stack joins the sum
        low_rank = [layer.to_delta(), *low_rank]
        layer = layer.base_layer()
    if dense:  # not a low-rank update: added into the weights, whatever `fuse` says
        layer = fuse_linear(layer, sum(d.weight_delta(dense_weight(layer)) for d in dense))
    if not low_rank:
        return layer
    if fuse:
        pairs = [d.low_rank() for d in low_rank]
        a_cat = mx.concatenate([a for a, _ in pairs], axis=0)
        b_cat = mx.concatenate([b for _, b in pairs], axis=1)
        return fuse_linear(layer, b_cat @ a_cat)
    return MultiLoRALinear.from_deltas(layer, low_rank)
