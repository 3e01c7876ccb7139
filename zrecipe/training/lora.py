"""LoRA in training: recipe targets → adapter layers swapped in by module path, and the adapter file.

The layers themselves (`LoRALinear`, with `to_delta()` / `from_delta()`) are `zrecipe.lora.layers`; this
module resolves the recipe's targets, swaps layers in with `update_modules`, and writes / reads zrecipe's
`adapter.safetensors` through the same format code as every export (`zrecipe.export.lora_formats`), in the
PEFT orientation (A: (r, in), B: (out, r)) documented in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError, RecipeError
from zrecipe.lora.layers import TRAINABLE_KINDS, AdapterLayer, adapter_layers, linear_shapes
from zrecipe.lora.layers import LoRALinear as LoRALinear  # training's public name for the trained layer
from zrecipe.recipe.schema import BLOCK_TYPES  # one list of targetable layers


def _children(model: nn.Module) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules()}


def _block_count(modules: dict[str, nn.Module], block_type: str) -> int:
    indices = {
        int(p.split(".")[1]) for p in modules if p.startswith(block_type + ".") and p.split(".")[1].isdigit()
    }
    return max(indices) + 1 if indices else 0


def resolve_targets(model: nn.Module, targets: Iterable[Any]) -> list[tuple[str, Any]]:
    """(module path, its target) for every targeted layer; raises one RecipeError listing targets that
    match nothing.

    A target is any object with block_type, start, end (exclusive), layer_types, rank, alpha
    (`zrecipe.recipe.LoraTarget`) and optionally `kind` (an adapter kind of `TRAINABLE_KINDS`; "lora"),
    `dropout` and the kind's `OPTIONS` (LoKr: factor, decompose_both, full_matrix).
    """
    modules = _children(model)
    found: dict[str, tuple[str, Any]] = {}
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
            usable = [
                p for p in paths if isinstance(modules[p], (nn.Linear, nn.QuantizedLinear, AdapterLayer))
            ]
            if not usable:
                problems.append(
                    f"layer type {layer_type!r} matches nothing in {target.block_type}[{target.start}:{end}]"
                    + (" (context_refiner blocks have no adaLN_modulation)" if "adaLN" in layer_type else "")
                )
            for path in usable:
                found[path] = (path, target)
    if problems:
        raise RecipeError("LoRA targets that match nothing: " + "; ".join(problems), problems)
    return list(found.values())


def apply_lora(model: nn.Module, targets: Iterable[Any]) -> list[str]:
    """Freeze `model`, swap an adapter layer in at every target path; returns the wrapped module paths.

    Layers get their `dropout_index` in path order, so their dropout masks do not depend on target order.
    """
    resolved = resolve_targets(model, targets)
    modules = _children(model)
    model.freeze()
    updates = []
    dropout_index = {path: i for i, path in enumerate(sorted(path for path, _ in resolved))}
    for path, target in resolved:  # in target order: the order the layers draw their initial values
        kind = getattr(target, "kind", "lora")
        if kind not in TRAINABLE_KINDS:
            raise RecipeError(f"LoRA kind {kind!r} is not known (use one of {', '.join(TRAINABLE_KINDS)}).")
        base = modules[path]
        if isinstance(base, AdapterLayer):  # a later target overrides an earlier one on the same layer
            base = base.base_layer()
        cls = TRAINABLE_KINDS[kind]
        options = {name: getattr(target, name) for name in cls.OPTIONS if hasattr(target, name)}
        layer = cls.from_base(
            base, rank=int(target.rank), alpha=float(target.alpha), dropout=float(getattr(target, "dropout", 0.0)),
            **options,
        )  # fmt: skip
        layer.dropout_index = dropout_index[path]
        updates.append((path, layer))
    model.update_modules(_unflatten_modules(updates))
    for _, layer in updates:
        _train_only_adapter(layer)
    return [path for path, _ in updates]


def _train_only_adapter(layer: AdapterLayer) -> None:
    """Only the adapter's own parameters train; the base inside the wrapper stays frozen."""
    layer.freeze()
    layer.unfreeze(keys=list(layer.TRAINABLE), recurse=False)


def _unflatten_modules(items: list[tuple[str, nn.Module]]) -> dict:
    """tree_unflatten for module paths whose lists are already lists in the model (update_modules wants
    a dict/list tree; digits index into lists)."""
    from mlx.utils import tree_unflatten

    return tree_unflatten(items)


def trainable_parameter_count(model: nn.Module) -> int:
    """Number of scalars the optimiser updates."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def lora_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """{module path: trainable adapter layer} of `model`."""
    return adapter_layers(model)


def adapter_deltas(model: nn.Module) -> dict:
    """{module path: delta} of the model's trainable adapter layers, by path."""
    return {p: m.to_delta() for p, m in sorted(lora_modules(model).items())}


def lora_weights(model: nn.Module) -> dict[str, tuple[mx.array, mx.array, float]]:
    """{module path: (A (r, in), B (out, r), alpha)} of the plain LoRA layers, adapter-file orientation."""
    return {p: (d.A, d.B, d.alpha) for p, d in adapter_deltas(model).items() if d.KIND == "lora"}


def fuse_lora(model: nn.Module) -> list[str]:
    """Replace every adapter layer by its fused Linear; returns the fused paths."""
    fused = [(p, m.fuse()) for p, m in lora_modules(model).items()]
    if fused:
        model.update_modules(_unflatten_modules(fused))
    return [p for p, _ in fused]


def adapter_tensors(model: nn.Module) -> dict[str, mx.array]:
    """The adapter.safetensors tensors: `<path>.lora_A.weight`, `<path>.lora_B.weight`, `<path>.alpha`."""
    from zrecipe.export.lora_formats import export_tensors

    return export_tensors(adapter_deltas(model), "zrecipe", "float32")


def adapter_metadata(model: nn.Module, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """Self-describing safetensors metadata (format, rank, alpha, targets + caller's fields)."""
    from zrecipe.export.lora_formats import adapter_file_metadata

    return adapter_file_metadata(adapter_deltas(model), extra)


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
    """Apply adapter tensors to a model (wrapping layers as needed); every mismatch reported at once.

    The tensors are read by the one LoRA reader (`zrecipe.export.lora_formats`); a layer that already
    holds an adapter of the same kind and rank is updated in place (the optimiser state refers to it).
    """
    from zrecipe.export.lora_formats import parse_deltas

    deltas, unmatched = parse_deltas(
        tensors, {}, where, linear_shapes(model), "adapter does not fit this model"
    )
    if unmatched:
        raise CheckpointError(
            f"{where}: adapter does not fit this model: no such layer for "
            + ", ".join(unmatched[:20])
            + (f" and {len(unmatched) - 20} more" if len(unmatched) > 20 else "")
        )
    modules = _children(model)
    updates = []
    for path, delta in sorted(deltas.items()):
        current = modules[path]
        kind = TRAINABLE_KINDS.get(delta.KIND)
        if kind is None:
            raise CheckpointError(f"{where}: {path}: a {delta.KIND} adapter cannot be trained here.")
        if isinstance(current, kind) and current.set_delta(delta):
            layer = current
        else:
            base = current.base_layer() if isinstance(current, AdapterLayer) else current
            layer = kind.from_delta(base, delta)
            _train_only_adapter(layer)
        updates.append((path, layer))
    model.update_modules(_unflatten_modules(updates))


def load_adapter(model: nn.Module, path: str | Path) -> dict[str, str]:
    """Load zrecipe's adapter.safetensors into `model`; returns the file's metadata."""
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read adapter ({exc}).") from exc
    load_adapter_tensors(model, tensors, str(path))
    return metadata
