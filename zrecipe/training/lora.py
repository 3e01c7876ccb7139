"""LoRA: a low-rank adapter wrapped around a (possibly quantised) Linear, swapped in by module path.

`LoRALinear.from_base(linear, rank, alpha)` keeps the base layer frozen inside the wrapper and adds
`lora_a` (in, r) and `lora_b` (r, out) so that y = base(x) + (alpha / r) · (x @ A) @ B; ΔW is never
materialised during training. B starts at zero, so step 0 is exactly the base model (mlx-examples' flux).
The adapter file uses the PEFT orientation (A: (r, in), B: (out, r)) documented in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError, RecipeError
from zrecipe.recipe.schema import BLOCK_TYPES  # one list of targetable layers


class LoRALinear(nn.Module):
    """A frozen base Linear (or QuantizedLinear) plus a trainable low-rank update."""

    @staticmethod
    def from_base(linear: nn.Module, rank: int = 8, alpha: float | None = None) -> LoRALinear:
        """Wrap `linear`; A ~ U(±1/sqrt(in)) as in mlx-examples, B = 0, scale = alpha / rank."""
        out_dims, in_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            in_dims = in_dims * 32 // linear.bits  # packed uint32 columns
        lora = LoRALinear(in_dims, out_dims, rank, rank if alpha is None else alpha)
        lora.linear = linear
        return lora

    def __init__(self, input_dims: int, output_dims: int, rank: int = 8, alpha: float = 8.0):
        super().__init__()
        if rank < 1:
            raise RecipeError(f"LoRA rank must be at least 1 (got {rank}).")
        self.linear = nn.Linear(input_dims, output_dims, bias=False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        # Low-rank path in the activation dtype (bf16 compute keeps the fp32 adapter as master copy).
        z = (x @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def delta(self) -> mx.array:
        """ΔW in the base layer's (out, in) orientation (only for fusing/export, never in training)."""
        return self.scale * (self.lora_b.T @ self.lora_a.T)

    def fuse(self) -> nn.Linear:
        """A plain nn.Linear equal to base + ΔW (a quantised base is dequantised first: QLoRA)."""
        base = self.linear
        if isinstance(base, nn.QuantizedLinear):
            weight = mx.dequantize(base.weight, base.scales, base.biases, base.group_size, base.bits)
        else:
            weight = base.weight
        has_bias = "bias" in base
        out_dims, in_dims = weight.shape
        fused = nn.Linear(in_dims, out_dims, bias=has_bias)
        fused.weight = (weight.astype(mx.float32) + self.delta()).astype(weight.dtype)
        if has_bias:
            fused.bias = base.bias
        return fused


def _children(model: nn.Module) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules()}


def _block_count(modules: dict[str, nn.Module], block_type: str) -> int:
    indices = {
        int(p.split(".")[1]) for p in modules if p.startswith(block_type + ".") and p.split(".")[1].isdigit()
    }
    return max(indices) + 1 if indices else 0


def resolve_targets(model: nn.Module, targets: Iterable[Any]) -> list[tuple[str, int, float]]:
    """(module path, rank, alpha) for every target; raises one RecipeError listing targets matching nothing.

    A target is any object with block_type, start, end (exclusive), layer_types, rank, alpha
    (`zrecipe.recipe.LoraTarget`).
    """
    modules = _children(model)
    found: dict[str, tuple[str, int, float]] = {}
    problems: list[str] = []
    for target in targets:
        count = _block_count(modules, target.block_type)
        if target.block_type not in BLOCK_TYPES or count == 0:
            problems.append(
                f"block type {target.block_type!r} does not exist (use one of {', '.join(BLOCK_TYPES)})"
            )
            continue
        end = count if target.end is None else target.end  # None: through the last block
        if not 0 <= target.start < end or target.start >= count:
            problems.append(
                f"{target.block_type} block range start={target.start}, end={target.end} selects no block "
                f"(the model has {count}: 0..{count - 1}; end is exclusive)"
            )
            continue
        for layer_type in target.layer_types:
            paths = [
                f"{target.block_type}.{i}.{layer_type}"
                for i in range(target.start, min(end, count))
                if f"{target.block_type}.{i}.{layer_type}" in modules
            ]
            usable = [p for p in paths if isinstance(modules[p], (nn.Linear, nn.QuantizedLinear, LoRALinear))]
            if not usable:
                problems.append(
                    f"layer type {layer_type!r} matches nothing in {target.block_type}[{target.start}:{end}]"
                    + (" (context_refiner blocks have no adaLN_modulation)" if "adaLN" in layer_type else "")
                )
            for path in usable:
                found[path] = (path, int(target.rank), float(target.alpha))
    if problems:
        raise RecipeError("LoRA targets that match nothing: " + "; ".join(problems), problems)
    return list(found.values())


def apply_lora(model: nn.Module, targets: Iterable[Any]) -> list[str]:
    """Freeze `model`, swap LoRALinear in at every target path; returns the wrapped module paths."""
    resolved = resolve_targets(model, targets)
    modules = _children(model)
    model.freeze()
    updates = []
    for path, rank, alpha in resolved:
        base = modules[path]
        if isinstance(base, LoRALinear):  # a later target overrides an earlier one on the same layer
            base = base.linear
        updates.append((path, LoRALinear.from_base(base, rank=rank, alpha=alpha)))
    model.update_modules(_unflatten_modules(updates))
    for _, layer in updates:
        # Only A and B train; the base inside the wrapper stays frozen.
        layer.freeze()
        layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return [path for path, _ in updates]


def _unflatten_modules(items: list[tuple[str, nn.Module]]) -> dict:
    """tree_unflatten for module paths whose lists are already lists in the model (update_modules wants
    a dict/list tree; digits index into lists)."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalars the optimiser updates."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_weights(model: nn.Module) -> dict[str, tuple[mx.array, mx.array, float]]:
    """{module path: (A (r, in), B (out, r), alpha)} in the adapter-file orientation."""
    return {p: (m.lora_a.T, m.lora_b.T, m.alpha) for p, m in sorted(lora_modules(model).items())}


def fuse_lora(model: nn.Module) -> list[str]:
    """Replace every LoRALinear by its fused Linear; returns the fused paths."""
    fused = [(p, m.fuse()) for p, m in lora_modules(model).items()]
    if fused:
        model.update_modules(_unflatten_modules(fused))
    return [p for p, _ in fused]


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The adapter.safetensors tensors: `<path>.lora_A.weight`, `<path>.lora_B.weight`, `<path>.alpha`."""
    tensors: dict[str, mx.array] = {}
    for path, (a, b, alpha) in lora_weights(model).items():
        tensors[f"{path}.lora_A.weight"] = a
        tensors[f"{path}.lora_B.weight"] = b
        tensors[f"{path}.alpha"] = mx.array(alpha, dtype=mx.float32)
    return tensors


def adapter_metadata(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Self-describing safetensors metadata (format, rank, alpha, targets + caller's fields)."""
    from zrecipe import __version__

    mods = lora_modules(model)
    ranks = sorted({m.rank for m in mods.values()})
    alphas = sorted({m.alpha for m in mods.values()})
    meta = {
        "format": "zrecipe",
        "rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "targets": json.dumps({p: {"rank": m.rank, "alpha": m.alpha} for p, m in sorted(mods.items())}),
        "zrecipe_version": __version__,
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def save_adapter(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write zrecipe's adapter.safetensors for the LoRA layers of `model` (atomically)."""
    from zrecipe.training.checkpoint import atomic_path

    path = Path(path)
    tensors = adapter_tensors(model)
    mx.eval(tensors)
    with atomic_path(path) as tmp:
        mx.save_safetensors(str(tmp), tensors, metadata=adapter_metadata(model, metadata))
    return path


def load_adapter_tensors(model: nn.Module, tensors: dict[str, mx.array], where: str) -> None:
    """Apply adapter tensors to a model (wrapping layers as needed); every mismatch reported at once."""
    groups: dict[str, dict[str, mx.array]] = {}
    problems: list[str] = []
    for key, value in tensors.items():
        for suffix in (".lora_A.weight", ".lora_B.weight", ".alpha"):
            if key.endswith(suffix):
                groups.setdefault(key.removesuffix(suffix), {})[suffix] = value
                break
        else:
            problems.append(f"unexpected key {key}")
    modules = _children(model)
    updates = []
    for path, parts in sorted(groups.items()):
        if set(parts) != {".lora_A.weight", ".lora_B.weight", ".alpha"}:
            problems.append(f"{path}: incomplete (has {sorted(parts)})")
            continue
        base = modules.get(path)
        if base is None:
            problems.append(f"{path}: no such layer in the model")
            continue
        a, b = parts[".lora_A.weight"], parts[".lora_B.weight"]
        alpha = parts[".alpha"].item()
        if isinstance(base, LoRALinear) and base.rank == a.shape[0]:
            layer = base  # update in place: keeps the module tree the optimiser state refers to
            if float(mx.array(layer.alpha, dtype=mx.float32).item()) != alpha:
                layer.alpha = float(alpha)  # (the file stores float32: keep the exact Python value if equal)
        else:
            base = base.linear if isinstance(base, LoRALinear) else base
            layer = LoRALinear.from_base(base, rank=a.shape[0], alpha=alpha)
            layer.freeze()
            layer.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
        if tuple(a.shape) != tuple(layer.lora_a.T.shape) or tuple(b.shape) != tuple(layer.lora_b.T.shape):
            problems.append(f"{path}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the layer")
            continue
        layer.lora_a = a.T.astype(mx.float32)
        layer.lora_b = b.T.astype(mx.float32)
        updates.append((path, layer))
    if problems:
        raise CheckpointError(f"{where}: adapter does not fit this model: " + "; ".join(problems[:20]))
    model.update_modules(_unflatten_modules(updates))


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load zrecipe's adapter.safetensors into `model`; returns the file's metadata."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read adapter ({exc}).") from exc
    load_adapter_tensors(model, tensors, str(path))
    return metadata
