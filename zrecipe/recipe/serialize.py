"""Recipe → JSON-able resolved data (the native recipe form), and the recipe's stable hash.

The resolved form lists every default and absolute paths, so it is what a checkpoint's `config.json`
stores, and `Recipe.from_dict(recipe.to_dict(), source=recipe.source) == recipe`. The hash covers the
canonical JSON of that form (sorted keys, no whitespace), so key order and path spelling in the file do
not change it, and any resolved value does.
"""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

import xxhash

from zrecipe.recipe.schema import (
    CaptionSource,
    Dataset,
    LoraTarget,
    Masks,
    Optimizer,
    Recipe,
    TrainingLoop,
    optimizer_fields,
)

# Bump when the resolved form changes meaning, so old hashes cannot collide with new ones.
HASH_FORMAT = "zrecipe-recipe/1"


def _plain(obj: Any) -> dict[str, Any]:
    """A flat dataclass as a dict of JSON values (Paths as strings, tuples as lists)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = (
            str(value) if hasattr(value, "as_posix") else list(value) if isinstance(value, tuple) else value
        )
    return out


def _captions(c: CaptionSource) -> Any:
    if c.kind == "generate":
        human = _captions(CaptionSource(kind=c.human, file=c.file, items=c.items, extension=c.extension))
        out = {"generate": _plain(c.generate), "prefer": c.prefer, **human}
        if c.template is not None:
            out["template"] = c.template
        return out
    if c.kind in ("sidecar", "template"):
        out: dict[str, Any] = {"extension": c.extension}
        if c.kind == "template":
            out["template"] = c.template
        return out
    if c.kind == "filename":
        return "filename"
    if c.kind == "manifest":
        return {"manifest": str(c.file)}
    return {"inline": [{"image": image, "caption": caption} for image, caption in c.items]}


def _masks(m: Masks | None) -> Any:
    if m is None:
        return None
    source = {"alpha": True} if m.source == "alpha" else {"folder": str(m.folder)}
    return {**source, "unmasked_weight": m.unmasked_weight}


def _dataset(d: Dataset) -> dict[str, Any]:
    out = _plain(d)
    out["captions"] = _captions(d.captions)
    out["bucketing"] = {"enabled": d.bucketing.enabled, "max_aspect": d.bucketing.max_aspect}
    out["masks"] = _masks(d.masks)
    return out


# Target fields written only when they differ from their default, so a plain LoRA recipe resolves (and
# hashes, and keys its train step) as it did before adapter kinds existed.
_TARGET_OPTIONAL = ("kind", "dropout", "factor", "decompose_both", "full_matrix")


def _target(t: LoraTarget) -> dict[str, Any]:
    out = {
        "blocks": t.block_type,
        "range": [t.start, t.end],
        "layer_types": list(t.layer_types),
        "rank": t.rank,
        "alpha": t.alpha,
    }
    for name in _TARGET_OPTIONAL:
        if getattr(t, name) != getattr(LoraTarget, name):
            out[name] = getattr(t, name)
    return out


def lora_target_from_dict(d: dict[str, Any]) -> LoraTarget:
    """The inverse of `_target`, the resolved form of a LoRA target (`{blocks, range, layer_types, rank,
    alpha}` plus the optional fields that differ from their defaults: kind, dropout, LoKr options)."""
    start, end = d["range"]
    optional = {name: d[name] for name in _TARGET_OPTIONAL if name in d}
    return LoraTarget(d["blocks"], start, end, tuple(d["layer_types"]), d["rank"], d["alpha"], **optional)


def _training_loop(loop: TrainingLoop) -> dict[str, Any]:
    out = _plain(loop)
    out["ema"] = None if loop.ema is None else _plain(loop.ema)
    return out


def _optimizer(o: Optimizer) -> dict[str, Any]:
    """The keys that apply to this optimiser and schedule (the others are not read)."""
    plain = _plain(o)
    return {k: plain[k] for k in optimizer_fields(o.name, o.schedule, o.relative_step)}


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe in the native form (see Recipe.to_dict)."""
    out: dict[str, Any] = {
        "model": recipe.model,
        "mode": recipe.mode,
        "seed": recipe.seed,
        "datasets": [_dataset(d) for d in recipe.datasets],
        "training_loop": _training_loop(recipe.training_loop),
        "optimizer": _optimizer(recipe.optimizer),
        "save": _plain(recipe.save),
        "export": _plain(recipe.export),
    }
    if recipe.lora is not None:
        out["lora"] = {"targets": [_target(t) for t in recipe.lora.targets]}
    if recipe.mode == "full":
        out["full_finetune"] = _plain(recipe.full_finetune)
    if recipe.sample is not None:
        out["sample"] = _plain(recipe.sample)
    if recipe.cache is not None:
        out["cache"] = str(recipe.cache)
    if recipe.validation is not None:
        validation = _plain(recipe.validation)
        out["validation"] = {k: v for k, v in validation.items() if v is not None or k == "every"}
    return out


def canonical_json(data: Any) -> str:
    """Sorted-key, whitespace-free JSON (ASCII) of resolved recipe data."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def recipe_hash(recipe: Recipe) -> str:
    """A stable hex hash (xxh128) of the canonical resolved recipe."""
    payload = f"{HASH_FORMAT}\n{canonical_json(recipe_to_dict(recipe))}"
    return xxhash.xxh3_128_hexdigest(payload.encode("utf-8"))
