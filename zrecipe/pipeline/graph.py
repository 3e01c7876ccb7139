"""Recipe → build graph: the one place where the recipe, the data layer and the engine meet.

    scan → caption → resize → encode-image ┐
                          caption → encode-text ┴→ train → sample → contact-sheet
                                                        └→ export

Scanning, caption resolution and model identity happen here, at plan time, cheaply (stat cache, no MLX).
Every node's params/inputs are exactly what can change its output; anything else a step needs (source
paths, the example manifest) travels in `PipelineData`, which is not part of any key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from zrecipe.engine import Graph, Node, Ref, StepKind
from zrecipe.errors import DatasetError

KINDS = ("resize", "encode-image", "encode-text", "train", "sample", "contact-sheet", "export")
# Max caption tokens: the pipeline's truncation length.
MAX_TEXT_TOKENS = 512
# Step versions: bump when a step's code changes its output, so every node of that kind rebuilds.
VERSIONS = {
    "resize": 1,
    "encode-image": 2,
    "encode-text": 2,
    # 2: AdamW follows torch.optim.AdamW (bias-corrected); 3: the optimisers, schedules, EMA, loss
    # weighting, noise offset and TensorBoard keys enter the params (every recipe's train key changes)
    "train": 3,
    "sample": 1,
    "contact-sheet": 1,
    "export": 2,  # 2: the kohya format became ComfyUI's names with fused qkv (musubi keeps the old)
}
MODEL_KINDS = ("encode-image", "encode-text", "train", "sample", "contact-sheet", "export")


@dataclass
class PipelineData:
    """What steps need beyond their keys. Sent to worker processes for parallel kinds: keep it small."""

    cache_dir: str
    model_spec: str
    dataset_folders: dict[str, str]
    model_path: str | None = None
    recipe: Any = None  # the Recipe (in-process steps only)
    examples: list[dict[str, Any]] = field(default_factory=list)
    empty_text: str = ""
    train_item: str = "train"
    options: dict[str, Any] = field(default_factory=dict)


def text_item(text: str) -> str:
    """Item id of a caption / prompt text: identical texts are one item (encoded once)."""
    return xxhash.xxh64_hexdigest(text.encode("utf-8"))


def image_item(dataset: str, rel_path: str) -> str:
    return f"{dataset}/{rel_path}"


def default_cache_dir(recipe) -> Path:
    """`cache:` in the recipe, else $ZRECIPE_CACHE, else `cache/` next to the recipe file."""
    if getattr(recipe, "cache", None):
        return Path(recipe.cache)
    env = os.environ.get("ZRECIPE_CACHE")
    return Path(env).expanduser() if env else Path(recipe.root) / "cache"


def _step_kinds() -> list[StepKind]:
    from zrecipe.pipeline import steps

    return [
        StepKind(
            "resize", VERSIONS["resize"], steps.run_resize, parallel=True, description="decode, crop, resize"
        ),
        StepKind("encode-image", VERSIONS["encode-image"], steps.run_encode_image, description="VAE latents"),
        StepKind(
            "encode-text", VERSIONS["encode-text"], steps.run_encode_text, description="text embeddings"
        ),
        StepKind("train", VERSIONS["train"], steps.run_train, description="LoRA / full fine-tune"),
        StepKind("sample", VERSIONS["sample"], steps.run_sample, description="sample images"),
        StepKind("contact-sheet", VERSIONS["contact-sheet"], steps.run_contact_sheet, description="grid"),
        StepKind("export", VERSIONS["export"], steps.run_export, description="LoRA / model export"),
    ]


@dataclass
class Scan:
    """Images and captions of every dataset, and the problems met (for on_error: skip datasets)."""

    images: dict[str, list[Any]] = field(default_factory=dict)  # dataset -> [ImageFile]
    captions: dict[str, dict[str, str]] = field(default_factory=dict)  # dataset -> rel_path -> caption
    skipped: list[str] = field(default_factory=list)


def scan_datasets(recipe, stat_cache=None) -> Scan:
    """Scan every dataset and resolve its captions. Problems of `on_error: fail` datasets raise one
    DatasetError listing all of them; `skip` datasets drop the items and record why. With a `stat_cache`
    (StatCache), caption files whose stat is unchanged are not reopened."""
    from zrecipe.data import resolve_captions, scan_images

    scan = Scan()
    problems: list[str] = []
    for ds in recipe.datasets:
        try:
            files = scan_images(ds.path, recursive=ds.recursive)
        except DatasetError as exc:
            problems.append(f"dataset {ds.name!r}: {exc}")
            continue
        src = ds.captions
        if src.kind == "inline":
            # Only the listed images belong to an inline dataset (the seed's `examples` form).
            listed = {Path(name).as_posix() for name, _ in src.items}
            present = {f.rel_path for f in files}
            files = [f for f in files if f.rel_path in listed]
            missing = sorted(listed - present)
            for name in missing:
                msg = f"dataset {ds.name!r}: {ds.path / name}: listed image not found; fix the name or add it"
                (scan.skipped if ds.on_error == "skip" else problems).append(msg)
        result = resolve_captions(
            files,
            ds.path,
            src.kind,
            manifest=src.file,
            inline=src.items,
            template=src.template,
            trigger=ds.trigger,
            extension=src.extension,
            read=None if stat_cache is None else stat_cache.read_small_files,
        )
        if result.problems:
            lines = [f"dataset {ds.name!r}: {p}" for p in result.problems]
            (scan.skipped if ds.on_error == "skip" else problems).extend(lines)
        kept = [f for f in files if f.rel_path in result.captions]
        scan.images[ds.name] = kept
        scan.captions[ds.name] = result.captions
    if problems:
        raise DatasetError(
            f"{recipe.source}: {len(problems)} dataset problem(s):\n  "
            + "\n  ".join(problems)
            + "\nFix them, or set `on_error: skip` on the dataset to leave those items out.",
            items=problems,
        )
    return scan


def _train_params(recipe) -> dict[str, Any]:
    d = recipe.to_dict()
    params = {
        "mode": recipe.mode,
        "seed": recipe.seed,
        "training_loop": d.get("training_loop"),
        "optimizer": d.get("optimizer"),
        "save": {
            k: v for k, v in (d.get("save") or {}).items() if k in ("checkpoint_frequency", "keep_last")
        },
    }
    if recipe.mode == "lora":
        params["lora"] = d.get("lora")
    else:
        params["full_finetune"] = d.get("full_finetune")
    return params


def build_graph(
    recipe, cache_dir: Path, until: str | None = None, stat_cache=None
) -> tuple[Graph, PipelineData]:
    """The build graph of `recipe` (only up to `until` when given) and the data its steps need."""
    from zrecipe.engine import StatCache, paused_gc
    from zrecipe.pipeline.identity import ModelIdentity

    wanted = _wanted_kinds(recipe, until)
    data = PipelineData(
        cache_dir=str(cache_dir),
        model_spec=recipe.model,
        dataset_folders={ds.name: str(ds.path) for ds in recipe.datasets},
        recipe=recipe,
    )
    graph = Graph(str(recipe.source))
    for kind in _step_kinds():
        if kind.name in wanted:
            graph.add_kind(kind)
    if not recipe.datasets and ({"train", "encode-image", "resize"} & wanted):
        raise DatasetError(
            f"{recipe.source}: the recipe declares no dataset, so there is nothing to train on. Add a "
            "`datasets:` list (or the seed's `examples:` block) with a folder of images and captions."
        )
    own_cache = stat_cache is None
    sc = StatCache(Path(cache_dir) / "stat.sqlite") if own_cache else stat_cache
    try:
        # 100,000 images make several hundred thousand objects here (nodes, scan tuples, examples), none
        # of them cyclic: the cyclic GC would only rescan them again and again.
        with paused_gc():
            scan = scan_datasets(recipe, sc)
            hashes = _hash_with_stats(sc, scan)
            identity = ModelIdentity(recipe.model, cache_dir, sc) if wanted & set(MODEL_KINDS) else None
            _add_nodes(graph, recipe, scan, hashes, identity, data, wanted)
            if identity is not None:
                data.model_path = identity.model_path
    finally:
        if own_cache:
            sc.close()
    data.options["skipped_at_plan"] = scan.skipped
    return graph, data


def _hash_with_stats(sc, scan: Scan) -> dict[str, str]:
    """Content hashes through the stat cache, reusing the scan's stat fields (no second stat).

    An ImageFile is (rel_path, path, size, mtime_ns, ctime_ns, inode): its tail is the signature."""
    return sc.hash_signed([f[1:] for files in scan.images.values() for f in files])


def _wanted_kinds(recipe, until: str | None) -> set[str]:
    deps = {
        "resize": set(),
        "encode-image": {"resize"},
        "encode-text": set(),
        "train": {"encode-image", "encode-text"},
        "sample": {"train", "encode-text"},
        "contact-sheet": {"sample"},
        "export": {"train"},
    }
    if until is None:
        wanted = set(KINDS)
    else:
        if until not in deps:
            from zrecipe.errors import UserError

            raise UserError(f"--until {until!r}: unknown step; choose one of {', '.join(KINDS)}.")
        wanted, stack = set(), [until]
        while stack:
            k = stack.pop()
            if k not in wanted:
                wanted.add(k)
                stack.extend(deps[k])
    sample = recipe.sample
    if sample is None or not sample.prompts:
        wanted -= {"sample", "contact-sheet"}
    if not recipe.export.formats:
        wanted.discard("export")
    return wanted


def _add_nodes(
    graph: Graph, recipe, scan: Scan, hashes, identity, data: PipelineData, wanted: set[str]
) -> None:
    datasets = {ds.name: ds for ds in recipe.datasets}
    texts: dict[str, str] = {}
    text_ids: dict[str, str] = {}  # caption → text_item(caption)
    want_image, want_text, want_train = "encode-image" in wanted, "encode-text" in wanted, "train" in wanted
    # One params object shared by every encode-image node: the planner computes a key prefix once per
    # params object, so a fresh dict per image would cost a canonical encoding per node.
    encode_params = {"dtype": "float32"}
    vae = identity.vae if want_image else None
    add = graph.add
    for name, files in scan.images.items():
        ds = datasets[name]
        captions = scan.captions[name]
        on_error = ds.on_error
        resize_params = {
            "resolution": ds.resolution,
            "bucketing": ds.bucketing.enabled,
            "max_aspect": ds.bucketing.max_aspect,
            "step": ds.bucketing.step,
            "upscale": ds.upscale,
        }
        # The hot loop of a plan (100,000 iterations for 100,000 images): only what the wanted kinds need.
        for f in files:
            rel = f.rel_path
            item = f"{name}/{rel}"  # image_item(name, rel), inlined
            add(Node("resize", item, resize_params, [hashes[f.path]], None, on_error))
            if want_image:
                add(Node("encode-image", item, encode_params, [Ref("resize", item), vae], None, on_error))
            if not want_text:
                continue
            caption = captions[rel]
            text_id = text_ids.get(caption)
            if text_id is None:  # many images share a caption: hash each distinct text once
                text_id = text_ids[caption] = text_item(caption)
                texts[text_id] = caption
            if want_train:  # only the train step reads the examples (and PipelineData travels to workers)
                data.examples.append(
                    {
                        "image": item,
                        "text": text_id,
                        "dataset": name,
                        "repeats": ds.repeats,
                        "caption_dropout": ds.caption_dropout,
                    }
                )
    if "encode-text" not in wanted:
        return
    sample = recipe.sample if "sample" in wanted else None
    texts[text_item("")] = ""  # caption dropout and CFG's negative prompt both need the empty prompt
    if sample is not None:
        for prompt in (*sample.prompts, sample.negative_prompt):
            texts[text_item(prompt)] = prompt
    for item, text in sorted(texts.items()):
        graph.add(
            Node(
                "encode-text",
                item,
                {"text": text, "max_length": MAX_TEXT_TOKENS},
                [identity.text_encoder],
                watch=(),
            )
        )
    if "train" not in wanted:
        return
    manifest_digest = xxhash.xxh3_128_hexdigest(
        "\n".join(
            f"{e['image']}\t{e['text']}\t{e['dataset']}\t{e['repeats']}\t{e['caption_dropout']}"
            for e in data.examples
        ).encode()
    )
    train_inputs: list[Any] = [identity.transformer]
    for e in data.examples:
        # Optional: an image skipped by `on_error: skip` leaves the training set instead of stopping it.
        train_inputs.append(Ref("encode-image", e["image"], optional=True))
    train_inputs += [
        Ref("encode-text", t) for t in sorted({e["text"] for e in data.examples} | {text_item("")})
    ]
    params = _train_params(recipe)
    params["examples"] = manifest_digest
    graph.add(Node("train", "train", params, train_inputs))
    data.empty_text = text_item("")
    if sample is not None:
        sample_items = []
        for p_index, prompt in enumerate(sample.prompts):
            for seed in sample.seeds:
                item = f"p{p_index}-s{seed}"
                sample_items.append(item)
                graph.add(
                    Node(
                        "sample",
                        item,
                        {
                            "prompt": prompt,
                            "negative_prompt": sample.negative_prompt,
                            "guidance": sample.guidance,
                            "steps": sample.steps,
                            "width": sample.width,
                            "height": sample.height,
                            "seed": seed,
                            "every": sample.every,
                            "cfg_normalization": sample.cfg_normalization,
                            "cfg_truncation": sample.cfg_truncation,
                            # only when on: the keys of samples of the trained weights stay as they were
                            **({"use_ema": True} if sample.use_ema else {}),
                        },
                        [
                            Ref("train", "train"),
                            Ref("encode-text", text_item(prompt)),
                            Ref("encode-text", text_item(sample.negative_prompt)),
                            identity.transformer,
                            identity.vae,
                        ],
                    )
                )
        if "contact-sheet" in wanted:
            graph.add(
                Node(
                    "contact-sheet",
                    "sheet",
                    {"items": sample_items},
                    [Ref("sample", i) for i in sample_items],
                )
            )
    if "export" in wanted:
        for fmt in recipe.export.formats:
            params = {"format": fmt, "dtype": recipe.export.dtype}
            if recipe.export.use_ema:  # only when on: exports of the trained weights keep their keys
                params["use_ema"] = True
            graph.add(Node("export", fmt, params, [Ref("train", "train")]))
