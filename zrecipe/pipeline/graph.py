"""Recipe → build graph: the one place where the recipe, the data layer and the engine meet.

    scan → caption → resize → encode-image ┐
                          caption → encode-text ┤
                                   (masks) mask ┴→ train → sample → contact-sheet
                                                        └→ export

Scanning, human caption resolution and model identity happen here, at plan time, cheaply (stat cache, no
MLX); a caption that a step produces is a node of its own (see captions.py). The step kinds come from
kinds.py. Every node's params/inputs are exactly what can change its output; anything else a step needs
(source paths, the example list) travels in `PipelineData`, which is not part of any key.
"""

from __future__ import annotations

import os
from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import xxhash

from zrecipe.engine import Graph, Node, Ref
from zrecipe.errors import DatasetError, UserError
from zrecipe.pipeline import checks
from zrecipe.pipeline.captions import (
    CAPTION_PRODUCERS,
    CaptionProducer,
    human_captions,
    produced_text_node,
    producers_used,
    text_item,
    text_node,
)
from zrecipe.pipeline.kinds import KINDS, MODEL_KINDS, TABLE, until_closure
from zrecipe.pipeline.masks import mask_params, scan_masks


class TrainItem(NamedTuple):
    """One training example as the plan knows it. Every field is hashed into the train key (the
    `examples` digest) and handed to the training `Example` — one spelling of both. (A NamedTuple: a plan
    of 100,000 images makes 100,000 of them.)"""

    image: str  # encode-image item
    text: str  # encode-text item of its caption
    dataset: str
    repeats: int
    caption_dropout: float
    loss_weight: float = 1.0
    mask: bool = False  # a `mask` node of the same item weights its loss
    holdout: bool = False  # a validation item: never trained on

    def line(self) -> str:
        """The item's line of the digest. The fields after caption_dropout are written only when they
        differ from their defaults (as `name=value`), so plans that use none of them keep their keys."""
        head = "\t".join(map(str, self[:5]))
        named = zip(self._fields[5:], self[5:], _DEFAULTS, strict=True)
        extra = [f"{name}={value}" for name, value, default in named if value != default]
        return "\t".join([head, *extra]) if extra else head


_DEFAULTS = tuple(TrainItem._field_defaults[name] for name in TrainItem._fields[5:])


def holdout(content_hash: str, fraction: float) -> bool:
    """Whether an image with this content hash is held out for validation at `fraction`: a function of
    its own content only, so adding or removing other images never moves it (and copies of one image in
    two datasets land on the same side)."""
    draw = xxhash.xxh3_64_intdigest(f"zrecipe-validation\0{content_hash}".encode())
    return draw < fraction * 2**64


@dataclass
class PipelineData:
    """What steps need beyond their keys. Sent to worker processes for parallel kinds: keep it small."""

    cache_dir: str
    model_spec: str
    dataset_folders: dict[str, str]
    model_path: str | None = None
    recipe: Any = None  # the Recipe (in-process steps only)
    examples: list[TrainItem] = field(default_factory=list)
    empty_text: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    mask_folders: dict[str, str] = field(default_factory=dict)  # dataset → mask folder (`masks: {folder}`)
    assistant_lora: str | None = None  # the local assistant LoRA file (its content hash is a train input)
    start_from: str | None = None  # the file the trained LoRA starts from (its content hash is a train input)


def default_cache_dir(recipe) -> Path:
    """`cache:` in the recipe, else $ZRECIPE_CACHE, else `cache/` next to the recipe file."""
    if getattr(recipe, "cache", None):
        return Path(recipe.cache)
    env = os.environ.get("ZRECIPE_CACHE")
    return Path(env).expanduser() if env else Path(recipe.root) / "cache"


@dataclass
class Scan:
    """Images and human captions of every dataset, and the problems met (for on_error: skip datasets).
    For a dataset whose captions a step produces, `captions` holds only the human captions that win."""

    images: dict[str, list[Any]] = field(default_factory=dict)  # dataset -> [ImageFile]
    captions: dict[str, dict[str, str]] = field(default_factory=dict)  # dataset -> rel_path -> caption
    skipped: list[str] = field(default_factory=list)


def scan_datasets(recipe, stat_cache=None, produced: Container[str] = ()) -> Scan:
    """Scan every dataset and resolve its human captions (`produced`: names of datasets whose captions a
    step makes). Problems of `on_error: fail` datasets raise one DatasetError listing all of them; `skip`
    datasets drop the items and record why. With a `stat_cache` (StatCache), caption files whose stat is
    unchanged are not reopened."""
    from zrecipe.data import resolve_captions, scan_images

    scan = Scan()
    problems: list[str] = []
    for ds in recipe.datasets:
        broken: list[str] | None = [] if ds.on_error == "skip" else None  # skip datasets: skip bad entries
        try:
            files = scan_images(ds.path, recursive=ds.recursive, broken=broken)
        except DatasetError as exc:
            problems.append(f"dataset {ds.name!r}: {exc}")
            continue
        scan.skipped.extend(f"dataset {ds.name!r}: {line}" for line in broken or ())
        if ds.name in produced:
            human = human_captions(ds, files, None if stat_cache is None else stat_cache.read_small_files)
            lines = [f"dataset {ds.name!r}: {p}" for p in human.problems]
            (scan.skipped if ds.on_error == "skip" else problems).extend(lines)
            scan.images[ds.name] = [f for f in files if f.rel_path not in human.failed]
            scan.captions[ds.name] = human.captions
            continue
        src = ds.captions
        if src.kind == "inline":
            # Only the listed images belong to an inline dataset (the seed's `examples` form).
            listed = {Path(name).as_posix() for name, _ in src.items}
            present = {f.rel_path for f in files}
            files = [f for f in files if f.rel_path in listed]
            for name in sorted(listed - present):
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
        # Captions are keyed by the rel paths of `files`: as many captions as files keeps every image
        # (no lookup per image).
        kept = len(result.captions) == len(files)
        scan.images[ds.name] = files if kept else [f for f in files if f.rel_path in result.captions]
        scan.captions[ds.name] = result.captions
    if problems:
        skip_helps = any(ds.on_error == "fail" for ds in recipe.datasets)
        raise DatasetError(
            f"{recipe.source}: {len(problems)} dataset problem(s):\n  "
            + "\n  ".join(problems)
            + ("\nFix them, or set `on_error: skip` on the dataset to leave those items out." if skip_helps
               else "\nFix them (`on_error: skip` leaves out bad items, not a missing or empty folder)."),
            items=problems,
        )  # fmt: skip
    return scan


def recipe_kinds(recipe) -> set[str]:
    """The table's kinds this recipe has (no sample kinds without prompts, no export without formats)."""
    kinds = set(KINDS)
    if recipe.sample is None or not recipe.sample.prompts:
        kinds -= {"sample", "contact-sheet"}
    if not recipe.export.formats:
        kinds.discard("export")
    if not any(ds.masks is not None for ds in recipe.datasets):
        kinds.discard("mask")
    return kinds


def build_graph(
    recipe,
    cache_dir: Path,
    until: str | None = None,
    stat_cache=None,
    producers: Mapping[str, CaptionProducer] = CAPTION_PRODUCERS,
) -> tuple[Graph, PipelineData]:
    """The build graph of `recipe` (only `until` and what it needs, when given) and the data its steps
    need. `producers`: caption-source kind → the step that captions such datasets."""
    from zrecipe.engine import StatCache, paused_gc
    from zrecipe.pipeline.identity import ModelIdentity

    used = producers_used(recipe, producers)
    extra = {p.kind.name: p.kind for p in used.values()}
    present = recipe_kinds(recipe) | set(extra)
    if until is not None and until not in KINDS and until not in extra:
        raise UserError(f"--until {until!r}: unknown step; choose one of {', '.join((*KINDS, *extra))}.")
    wanted = present if until is None else until_closure(until, extra.values()) & present
    data = PipelineData(
        cache_dir=str(cache_dir),
        model_spec=recipe.model,
        dataset_folders={ds.name: str(ds.path) for ds in recipe.datasets},
        recipe=recipe,
        mask_folders={
            ds.name: str(ds.masks.folder) for ds in recipe.datasets if ds.masks and ds.masks.folder
        },
    )
    # A kind the recipe lacks (masks without `masks:`) is no dependency: its nodes' Refs would say so.
    graph = Graph(str(recipe.source), [replace(k.step_kind(), after=tuple(a for a in k.needs if a in wanted))
                                       for k in (*TABLE, *extra.values()) if k.name in wanted])  # fmt: skip
    # Kinds the recipe has but --until leaves out: the build record keeps their previous entries.
    graph.omitted_kinds = frozenset(present - wanted)
    if not recipe.datasets and "resize" in wanted:  # every image step (and train) needs resize
        raise DatasetError(
            f"{recipe.source}: the recipe declares no dataset, so there is nothing to train on. Add a "
            "`datasets:` list (or the seed's `examples:` block) with a folder of images and captions."
        )
    uses_model = wanted & {*MODEL_KINDS, *(k.name for k in extra.values() if k.models)}
    own_cache = stat_cache is None
    sc = StatCache(Path(cache_dir) / "stat.sqlite") if own_cache else stat_cache
    try:
        # 100,000 images make several hundred thousand objects here (nodes, scan tuples, examples), none
        # of them cyclic: the cyclic GC would only rescan them again and again.
        with paused_gc():
            scan = scan_datasets(recipe, sc, used)
            masks = scan_masks(recipe, scan) if "mask" in wanted else {}
            unreadable: dict[str, OSError] = {}
            hashes = _hash_with_stats(sc, scan, unreadable)
            checks.drop_unreadable(recipe, scan, unreadable)
            hashes.update(sc.hash_signed([f[1:] for files in masks.values() for f in files.values()]))
            identity = ModelIdentity(recipe.model, cache_dir, sc) if uses_model else None
            # Files the train step reads besides the data, as content hashes (inputs of the train key).
            extra: list[str] = []
            loop = recipe.training_loop
            if "train" in wanted and loop.assistant_lora:
                from zrecipe.training.assistant import assistant_identity

                path, assistant = assistant_identity(loop.assistant_lora, sc)
                data.assistant_lora = str(path)
                extra.append(assistant)
            if "train" in wanted and loop.start_from:
                from zrecipe.training.start import START_PREFIX

                data.start_from = loop.start_from
                extra.append(START_PREFIX + sc.hash_files([loop.start_from])[loop.start_from])
            datasets = {ds.name: ds for ds in recipe.datasets}
            makers = {
                name: p.node_maker(datasets[name], sc, data)
                for name, p in used.items()
                if p.kind.name in wanted and name in scan.images
            }
            _add_nodes(graph, recipe, scan, hashes, identity, data, wanted, used, makers, masks, extra)
            if identity is not None:
                data.model_path = identity.model_path
            checks.check_values(recipe, scan, data, wanted)
    finally:
        if own_cache:
            sc.close()
    data.options["skipped_at_plan"] = scan.skipped
    return graph, data


def _hash_with_stats(sc, scan: Scan, errors: dict[str, OSError]) -> dict[str, str]:
    """Content hashes through the stat cache, reusing the scan's stat fields (no second stat); files that
    cannot be read land in `errors`.

    An ImageFile is (rel_path, path, size, mtime_ns, ctime_ns, inode): its tail is the signature."""
    return sc.hash_signed([f[1:] for files in scan.images.values() for f in files], errors)


def _add_nodes(graph: Graph, recipe, scan: Scan, hashes, identity, data: PipelineData, wanted: set[str],
               used: Mapping[str, CaptionProducer], makers: Mapping[str, Any],
               masks: Mapping[str, Mapping[str, Any]], extra: list[str]) -> None:  # fmt: skip
    datasets = {ds.name: ds for ds in recipe.datasets}
    texts: dict[str, str] = {}  # text item → known text
    text_ids: dict[str, str] = {}  # caption → text_item(caption)
    produced: set[str] = set()  # encode-text items of produced captions
    want_resize, want_image = "resize" in wanted, "encode-image" in wanted
    want_text, want_train = "encode-text" in wanted, "train" in wanted
    want_mask = "mask" in wanted
    validation = recipe.validation
    # One params object shared by every encode-image node: the planner computes a key prefix once per
    # params object, so a fresh dict per image would cost a canonical encoding per node.
    encode_params = {"dtype": "float32"}
    vae = identity.vae if want_image else None
    text_encoder = identity.text_encoder if want_text else None
    add = graph.add
    for name, files in scan.images.items():
        ds = datasets[name]
        captions = scan.captions.get(name)
        producer = used.get(name)
        make_caption = makers.get(name)  # the caption node of an image without a winning human caption
        needs_caption = want_text or make_caption is not None  # not for `--until resize`, say
        on_error = ds.on_error
        resize_params = {
            "resolution": ds.resolution,
            "bucketing": ds.bucketing.enabled,
            "max_aspect": ds.bucketing.max_aspect,
            "step": ds.bucketing.step,
            "upscale": ds.upscale,
        }
        masked = mask_params(ds, resize_params) if want_mask else None
        mask_files = masks.get(name, {})
        held_out_dataset = validation is not None and validation.dataset == name
        fraction = validation.fraction if validation is not None else None
        # The hot loop of a plan (100,000 iterations for 100,000 images): only what the wanted kinds need.
        for f in files:
            rel = f.rel_path
            item = f"{name}/{rel}"
            if want_resize:
                add(Node("resize", item, resize_params, [hashes[f.path]], None, on_error))
            if masked is not None:
                mask_file = mask_files.get(rel)
                sources = [hashes[f.path]] + ([] if mask_file is None else [hashes[mask_file.path]])
                add(Node("mask", item, masked, sources, None, on_error))
            if want_image:
                add(Node("encode-image", item, encode_params, [Ref("resize", item), vae], None, on_error))
            if not needs_caption:
                continue
            caption = captions.get(rel) if captions is not None else None
            if make_caption is not None and caption is None:
                add(make_caption(item, hashes[f.path]))
            if not want_text:
                continue
            if caption is not None:
                text_id = text_ids.get(caption)
                if text_id is None:  # many images share a caption: hash each distinct text once
                    text_id = text_ids[caption] = text_item(caption)
                    texts[text_id] = caption
            else:
                node = add(produced_text_node(Ref(producer.kind.name, item), text_encoder, ds))
                text_id = node.item
                produced.add(text_id)
            if want_train:  # only the train step reads the examples (and PipelineData travels to workers)
                held = held_out_dataset or (fraction is not None and holdout(hashes[f.path], fraction))
                data.examples.append(TrainItem(item, text_id, name, ds.repeats, ds.caption_dropout,
                                               ds.loss_weight, masked is not None, held))  # fmt: skip
    if want_text:
        sample = recipe.sample if "sample" in wanted else None
        texts[text_item("")] = ""  # caption dropout and CFG's negative prompt both need the empty prompt
        if sample is not None:
            for prompt in (*sample.prompts, sample.negative_prompt):
                texts[text_item(prompt)] = prompt
        for item, text in sorted(texts.items()):
            add(text_node(item, text, text_encoder))
    if want_train:
        _check_split(recipe, data.examples)
        _add_train(graph, recipe, data, identity, produced, extra)
    if "sample" in wanted:
        _add_samples(graph, recipe.sample, identity, "contact-sheet" in wanted)
    if "export" in wanted:
        full = recipe.mode == "full"
        for fmt in recipe.export.formats:
            params = {
                "format": fmt,
                "dtype": recipe.export.dtype,
                "name": f"{Path(recipe.source).stem}_{fmt}",
            }
            if recipe.export.use_ema:  # only when on: exports of the trained weights keep their keys
                params["use_ema"] = True
            # A full fine-tune exports a whole model folder: the base model's VAE and text encoder with it.
            models = [identity.vae, identity.text_encoder] if full else []
            add(Node("export", fmt, params, [Ref("train", "train"), *models]))


def _check_split(recipe, examples: list[TrainItem]) -> None:
    """A validation split must leave items on both sides."""
    if recipe.validation is None or not examples:
        return
    held = sum(e.holdout for e in examples)
    how = (f"`validation.fraction: {recipe.validation.fraction:g}`" if recipe.validation.fraction is not None
           else f"`validation.dataset: {recipe.validation.dataset}`")  # fmt: skip
    if held == 0:
        raise DatasetError(
            f"{recipe.source}: {how} holds out none of the {len(examples)} images (the split is by content "
            "hash); raise the fraction or name a validation dataset."
        )
    if held == len(examples):
        raise DatasetError(f"{recipe.source}: {how} holds out every image: nothing is left to train on.")


def _add_train(graph: Graph, recipe, data: PipelineData, identity, produced: set[str],
               extra: list[str]) -> None:  # fmt: skip
    from zrecipe.training.settings import train_params

    digest = xxhash.xxh3_128_hexdigest("\n".join(e.line() for e in data.examples).encode())
    # The base the LoRA trains on (the transformer, and an assistant LoRA fused in for training) and the
    # weights it starts from, as content identities; then the data.
    inputs: list[Any] = [identity.transformer, *extra]
    for e in data.examples:
        # Optional: an image skipped by `on_error: skip` leaves the training set instead of stopping it.
        inputs.append(Ref("encode-image", e.image, optional=True))
        if e.mask:
            inputs.append(Ref("mask", e.image, optional=True))
    for t in sorted({e.text for e in data.examples} | {text_item("")}):
        inputs.append(Ref("encode-text", t, optional=t in produced))
    params = train_params(recipe)
    params["examples"] = digest
    graph.add(Node("train", "train", params, inputs))
    data.empty_text = text_item("")


def _add_samples(graph: Graph, sample, identity, sheet: bool) -> None:
    items = []
    for p_index, prompt in enumerate(sample.prompts):
        for seed in sample.seeds:
            item = f"p{p_index}-s{seed}"
            items.append(item)
            params = {
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
            }
            inputs = [
                Ref("train", "train"),
                Ref("encode-text", text_item(prompt)),
                Ref("encode-text", text_item(sample.negative_prompt)),
                identity.transformer,
                identity.vae,
            ]
            graph.add(Node("sample", item, params, inputs))
    if sheet:
        graph.add(Node("contact-sheet", "sheet", {"items": items}, [Ref("sample", i) for i in items]))
