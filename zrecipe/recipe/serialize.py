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

from zrecipe.recipe.schema import CaptionSource, Dataset, LoraTarget, Masks, Recipe

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


def _target(t: LoraTarget) -> dict[str, Any]:
    return {
        "blocks": t.block_type,
        "range": [t.start, t.end],
        "layer_types": list(t.layer_types),
        "rank": t.rank,
        "alpha": t.alpha,
    }


def lora_target_from_dict(d: dict[str, Any]) -> LoraTarget:
    """The inverse of the resolved form of a LoRA target (`{blocks, range, layer_types, rank, alpha}`)."""
    start, end = d["range"]
    return LoraTarget(d["blocks"], start, end, tuple(d["layer_types"]), d["rank"], d["alpha"])


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The resolved recipe in the native form (see Recipe.to_dict)."""
    out: dict[str, Any] = {
        "model": recipe.model,
        "mode": recipe.mode,
        "seed": recipe.seed,
        "datasets": [_dataset(d) for d in recipe.datasets],
        "training_loop": _plain(recipe.training_loop),
        "optimizer": _plain(recipe.optimizer),
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
