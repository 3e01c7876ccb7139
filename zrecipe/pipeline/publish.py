"""Materialise a build's results in the recipe's output folder (`save.output_path`).

The store is the source of truth; the output folder is a view of the latest build, refreshed after every
build (cheap: files already there with the same size are left alone). Layout:

    <output_path>/adapter.safetensors | transformer.safetensors, loss.json, loss.png
    <output_path>/checkpoints/<step:07d>_checkpoint.zip
    <output_path>/samples/<prompt>-<seed>_<n>.png, samples/contact_sheet.png
    <export.output_path>/<name>.safetensors (or a model folder for full fine-tunes)
    <output_path>/build-report.json
    <output_path>/captions.jsonl (datasets with generated captions: every image's caption and its origin)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def _copy(src: Path, dst: Path) -> Path:
    """Copy `src` to `dst` atomically unless an identical-size file is already there."""
    if (
        dst.exists()
        and dst.is_file()
        and dst.stat().st_size == src.stat().st_size
        and dst.stat().st_mtime >= src.stat().st_mtime
    ):
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)
    return dst


def _copy_tree(src: Path, dst: Path) -> list[Path]:
    out = []
    for f in sorted(src.rglob("*")):
        if f.is_file() and f.name != "MANIFEST.json":
            out.append(_copy(f, dst / f.relative_to(src)))
    return out


def publish(plan, store, recipe) -> dict[str, list[str]]:
    """Copy the results of `plan`'s nodes from the store into the output folders; returns what is where."""
    out = Path(recipe.save.output_path)
    published: dict[str, list[str]] = {"checkpoints": [], "final": [], "samples": [], "exports": []}
    nodes = plan.by_id()
    train = nodes.get(("train", "train"))
    if train is not None and store.has(train.key):
        entry = store.path(train.key)
        for name in ("adapter.safetensors", "transformer.safetensors", "loss.json", "loss.png"):
            if (entry / name).exists():
                published["final"].append(str(_copy(entry / name, out / name)))
        for zpath in sorted((store.work_dir(train.key) / "checkpoints").glob("*_checkpoint.zip")):
            published["checkpoints"].append(str(_copy(zpath, out / "checkpoints" / zpath.name)))
    for (kind, item), p in sorted(nodes.items()):
        if kind == "sample" and store.has(p.key):
            entry = store.path(p.key)
            labels = json.loads((entry / "labels.json").read_text())
            for index, label in enumerate(labels):
                name = f"{item}_{label.replace(' ', '')}.png"
                published["samples"].append(str(_copy(entry / f"{index:02d}.png", out / "samples" / name)))
        elif kind == "contact-sheet" and store.has(p.key):
            published["samples"].append(
                str(_copy(store.path(p.key) / "contact_sheet.png", out / "samples" / "contact_sheet.png"))
            )
        elif kind == "export" and store.has(p.key):
            published["exports"] += [
                str(f) for f in _copy_tree(store.path(p.key), Path(recipe.export.output_path))
            ]
    from zrecipe.pipeline.caption_view import publish_captions

    published.update(publish_captions(plan, store, recipe))  # captions.jsonl, with generated captions
    return published
