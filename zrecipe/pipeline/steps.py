"""The Z-Image step kinds: what each build step does with its tasks (see zrecipe.engine for the contract).

Each run function loads what it needs once (a model per kind, not per item), batches where the model
allows, writes one store entry per task and frees its model before returning, so the next kind's peak
memory is its own (the text encoder and VAE are gone before training starts).
"""

from __future__ import annotations

import gc
import json
from collections import defaultdict
from pathlib import Path

from zrecipe.pipeline.identity import resolve_model_path

# One item per model call: batched numerics depend on the batch (padding length, BLAS blocking by matrix
# height — measured: every item of an 8-item VAE or text batch differed in its last bits from the same item
# encoded alone). A store entry must be a function of its key alone, or a fresh build and an incremental
# build (which re-encodes a different set of items together) would train on different bytes.
ENCODE_BATCH = 1
LATENTS_FILE = "latents.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
# What a train entry holds beside its per-checkpoint adapters (the EMA weights when the run keeps one).
FINAL_FILES = (
    "adapter.safetensors",
    "transformer.safetensors",
    "adapter_ema.safetensors",
    "transformer_ema.safetensors",
    "loss.json",
    "loss.png",
)


def _free() -> None:
    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


# --- resize (parallel, per image) -------------------------------------------------------------------------


def run_resize(tasks, ctx) -> None:
    from zrecipe.data.images import resize_to_file

    for task in tasks:
        dataset, rel = task.item.split("/", 1)
        src = Path(ctx.data.dataset_folders[dataset]) / rel
        p = task.params
        with ctx.output(task) as folder:
            w, h = resize_to_file(
                src,
                folder / "image.png",
                p["resolution"],
                p["max_aspect"],
                p["bucketing"],
                p["upscale"],
                step=p["step"],
            )
            (folder / "size.json").write_text(json.dumps({"width": w, "height": h}))


# --- encode-image (per image, batched per bucket) ---------------------------------------------------------


def run_encode_image(tasks, ctx) -> None:
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from zrecipe.models.z_image.vae import load_vae, to_model_latents

    vae = load_vae(resolve_model_path(ctx.data), dtype=mx.float32)
    for batch in _image_batches(tasks, ctx):
        srcs = [ctx.input_dir(task, 0) for task in batch]
        images = [Image.open(d / "image.png").convert("RGB") for d in srcs]
        pixels = np.stack([np.asarray(image, dtype=np.float32) for image in images])
        mean = vae.encode(mx.array(pixels / 127.5 - 1.0))
        latents = to_model_latents(mean, vae).transpose(0, 3, 1, 2).astype(mx.float32)  # (B, 16, h, w)
        mx.eval(latents)
        for i, task in enumerate(batch):
            with ctx.output(task) as folder:
                mx.save_safetensors(str(folder / LATENTS_FILE), {"latents": latents[i]})
    del vae
    _free()


def _image_batches(tasks, ctx) -> list[list]:
    """The VAE batches: tasks grouped by image size (size order), then runs of ENCODE_BATCH in task order."""
    by_size: dict[tuple[int, int], list] = defaultdict(list)
    for task in tasks:
        size = json.loads((ctx.input_dir(task, 0) / "size.json").read_text())
        by_size[(size["height"], size["width"])].append(task)
    groups = [group for _, group in sorted(by_size.items())]
    return [group[i : i + ENCODE_BATCH] for group in groups for i in range(0, len(group), ENCODE_BATCH)]


def _text_batches(tasks) -> list[list]:
    """The text-encoder batches: runs of ENCODE_BATCH in task order."""
    return [tasks[i : i + ENCODE_BATCH] for i in range(0, len(tasks), ENCODE_BATCH)]


def batches(kind: str, tasks, ctx) -> list[list]:
    """The groups of `tasks` that `kind`'s run() computes together (one item each for per-item work).

    Batched numerics depend on the batch (padding, matmul blocking), so a distributed build hands whole
    groups to ranks: rank r's share then forms exactly these batches again, and every entry is
    byte-identical to a single-process build of the same stale items."""
    if kind == "encode-image":
        return _image_batches(tasks, ctx)
    if kind == "encode-text":
        return _text_batches(tasks)
    return [[task] for task in tasks]


# --- encode-text (per distinct text) ----------------------------------------------------------------------


def run_encode_text(tasks, ctx) -> None:
    import mlx.core as mx

    from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
    from zrecipe.models.z_image.tokenizer import load_tokenizer

    model_path = resolve_model_path(ctx.data)
    tokenizer = load_tokenizer(model_path)
    encoder = load_text_encoder(model_path, dtype=mx.float32)
    for batch in _text_batches(tasks):
        embeds = encode_prompts(encoder, tokenizer, [t.params["text"] for t in batch], t_max(batch))
        for task, emb in zip(batch, embeds, strict=True):
            with ctx.output(task) as folder:
                mx.save_safetensors(str(folder / EMBEDDING_FILE), {"embedding": emb.astype(mx.float32)})
    del encoder
    _free()


def t_max(batch) -> int:
    return max(t.params["max_length"] for t in batch)


# --- train (one task) -------------------------------------------------------------------------------------


def _load_examples(task, ctx):
    """Training examples from the encode-image / encode-text entries the train node references."""
    import mlx.core as mx

    from zrecipe.engine import Ref
    from zrecipe.training.data import Example

    image_dirs, text_dirs = {}, {}
    for index, ref in enumerate(task.node.inputs):
        if not isinstance(ref, Ref):
            continue
        folder = ctx.input_dir(task, index)
        if ref.kind == "encode-image":
            image_dirs[ref.item] = (folder, task.inputs[index])
        else:
            text_dirs[ref.item] = folder
    embeddings = {item: mx.load(str(d / EMBEDDING_FILE))["embedding"] for item, d in text_dirs.items()}
    examples, skipped = [], []
    for e in ctx.data.examples:
        folder, key = image_dirs.get(e["image"], (None, None))
        if folder is None:  # skipped upstream (on_error: skip)
            skipped.append(e["image"])
            continue
        latents = mx.load(str(folder / LATENTS_FILE))["latents"]
        examples.append(
            Example(
                latents=latents,
                caption=embeddings[e["text"]],
                bucket=(int(latents.shape[1]), int(latents.shape[2])),
                dataset=e["dataset"],
                repeats=int(e["repeats"]),
                caption_dropout=float(e["caption_dropout"]),
                key=key,
            )
        )
    return examples, embeddings[ctx.data.empty_text], skipped


def run_train(tasks, ctx) -> None:
    import shutil

    import mlx.core as mx

    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.recipe import recipe_hash
    from zrecipe.training.callbacks import default_callbacks
    from zrecipe.training.checkpoint import list_checkpoints, read_checkpoint
    from zrecipe.training.checkpointer import RunInfo
    from zrecipe.training.distributed import world
    from zrecipe.training.ema import ema_weights
    from zrecipe.training.loop import train
    from zrecipe.training.session import prepare_training

    (task,) = tasks
    recipe = ctx.data.recipe
    model_path = resolve_model_path(ctx.data)
    examples, empty, skipped = _load_examples(task, ctx)
    log = print if world().main else (lambda _msg: None)
    transformer, settings = prepare_training(recipe, model_path, examples, log)
    # Checkpoints live in the step's persistent work folder, keyed like the step: an interrupted build
    # resumes from the newest one of the *same* key (same data, parameters, model and code).
    work = ctx.work_dir(task)
    resume = None
    for candidate in reversed(list_checkpoints(work)):
        try:
            read_checkpoint(candidate)  # a damaged zip (killed while writing) is skipped, never half-loaded
        except Exception:  # noqa: BLE001 — any unreadable checkpoint is just not a resume point
            continue
        resume = candidate
        break
    if resume is not None and world().main:
        print(f"train: resuming from {resume.name}")
    if recipe.training_loop.tensorboard and world().main:  # live while training; published when done
        print(f"train: TensorBoard events in {work / 'tensorboard'}")
    meta = {"base_model": recipe.model, "recipe_hash": recipe_hash(recipe), "train_step_key": task.key}
    run = RunInfo(
        model_identity=task.inputs[0],
        train_step_key=task.key,
        config=recipe.to_dict(),
        adapter_metadata=meta,
        checkpoint_meta={"recipe_source": str(recipe.source)},
    )
    options = ctx.data.options
    result = train(
        transformer,
        examples,
        FlowMatchingObjective.from_settings(settings, empty),
        settings,
        work,
        run=run,
        resume_from=resume,
        callbacks=default_callbacks(options.get("progress", True), options.get("battery_limit")),
    )
    if getattr(result, "stopped", False):
        raise KeyboardInterrupt(f"training stopped at step {result.step}; run the build again to resume")
    del transformer
    _free()
    if result.world_size > 1 and not world().main:
        return  # a distributed build: rank 0 commits the entry, the others learn its outcome from it
    with ctx.output(task) as folder:
        for name in FINAL_FILES:
            if (work / name).exists():
                shutil.copy2(work / name, folder / name)
        if (work / "tensorboard").is_dir():
            shutil.copytree(work / "tensorboard", folder / "tensorboard")
        steps = []
        if recipe.mode == "lora":
            # Intermediate adapters (small) for per-checkpoint samples; the zips stay in the work folder.
            (folder / "adapters").mkdir()
            for zpath in list_checkpoints(work):
                ck = read_checkpoint(zpath)
                steps.append(ck.step)
                mx.save_safetensors(
                    str(folder / "adapters" / f"{ck.step:07d}.safetensors"), ck.adapter, ck.adapter_metadata
                )
                if (averaged := ema_weights(ck)) is not None:
                    mx.save_safetensors(
                        str(folder / "adapters" / f"{ck.step:07d}_ema.safetensors"), *averaged
                    )
        (folder / "train.json").write_text(
            json.dumps(
                {"checkpoint_steps": steps, "skipped_items": skipped, "final_step": result.step}, indent=1
            )
        )


# --- sample (per prompt x seed; every adapter of the run) -------------------------------------------------


def _final_weights(train_dir: Path, use_ema: bool = False) -> Path:
    """The train entry's final adapter (LoRA) or transformer (full), or their EMA."""
    from zrecipe.training.ema import ema_name

    final = train_dir / "adapter.safetensors"
    if not final.exists():
        final = train_dir / "transformer.safetensors"
    return final.with_name(ema_name(final.name)) if use_ema else final


def _sample_adapters(train_dir: Path, every: int | None, use_ema: bool = False) -> list[tuple[str, Path]]:
    info = json.loads((train_dir / "train.json").read_text())
    out = []
    suffix = "_ema" if use_ema else ""
    if every:
        for step in info["checkpoint_steps"]:
            if step % every == 0 and step != info["final_step"]:
                out.append((f"step {step}", train_dir / "adapters" / f"{step:07d}{suffix}.safetensors"))
    out.append(("final", _final_weights(train_dir, use_ema)))
    return out


def run_sample(tasks, ctx) -> None:
    import mlx.core as mx

    from zrecipe.generation.generate import (
        GenerationSettings,
        decode_latents,
        png_metadata,
        sample_latents,
        save_png,
    )
    from zrecipe.generation.samples import swap_in
    from zrecipe.models.z_image.sampler import read_scheduler_config
    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.models.z_image.vae import load_vae

    model_path = resolve_model_path(ctx.data)
    scheduler = read_scheduler_config(model_path)
    transformer = load_transformer(model_path)
    train_dir = ctx.input_dir(tasks[0], 0)
    # Embeddings and settings once per task; only the adapter changes between passes.
    prepared = []
    for task in tasks:
        p = task.params
        pos = mx.load(str(ctx.input_dir(task, 1) / EMBEDDING_FILE))["embedding"]
        neg = (
            mx.load(str(ctx.input_dir(task, 2) / EMBEDDING_FILE))["embedding"] if p["guidance"] > 0 else None
        )
        settings = GenerationSettings(
            prompt=p["prompt"], negative_prompt=p["negative_prompt"], guidance=p["guidance"], steps=p["steps"],
            width=p["width"], height=p["height"], seeds=(p["seed"],),
            cfg_normalization=p["cfg_normalization"], cfg_truncation=p["cfg_truncation"],
        )  # fmt: skip
        prepared.append((task, settings, pos, neg))
    rendered = {}
    for label, adapter in _sample_adapters(
        train_dir, tasks[0].params["every"], tasks[0].params.get("use_ema", False)
    ):
        restore = swap_in(transformer, adapter, Path(model_path))
        for task, settings, pos, neg in prepared:
            p = task.params
            latents = sample_latents(transformer, scheduler, settings, p["seed"], pos, neg)
            mx.eval(latents)
            rendered.setdefault(task.key, []).append((label, settings, latents))
        restore()
    del transformer
    _free()
    vae = load_vae(model_path)
    for task in tasks:
        with ctx.output(task) as folder:
            labels = []
            for index, (label, settings, latents) in enumerate(rendered[task.key]):
                image = decode_latents(vae, latents)[0]
                meta = png_metadata(settings, ctx.data.model_spec)
                meta.update({"seed": str(task.params["seed"]), "adapter": label})
                save_png(image, folder / f"{index:02d}.png", meta)
                labels.append(label)
            (folder / "labels.json").write_text(json.dumps(labels))
    del vae
    _free()


def run_contact_sheet(tasks, ctx) -> None:
    from PIL import Image

    from zrecipe.generation.samples import contact_sheet

    (task,) = tasks
    rows, row_labels, col_labels = [], [], None
    for index, item in enumerate(task.params["items"]):
        folder = ctx.input_dir(task, index)
        labels = json.loads((folder / "labels.json").read_text())
        col_labels = col_labels or labels
        rows.append([Image.open(folder / f"{i:02d}.png").convert("RGB") for i in range(len(labels))])
        node = ctx.data.recipe.sample
        p_index, seed = item[1:].split("-s")
        row_labels.append(f"{node.prompts[int(p_index)]} (seed {seed})")
    with ctx.output(task) as folder:
        contact_sheet(rows, row_labels, col_labels or [], folder / "contact_sheet.png")


# --- export (per format) ----------------------------------------------------------------------------------


def run_export(tasks, ctx) -> None:
    from zrecipe.export.sources import run_export as export

    recipe = ctx.data.recipe
    stem = Path(recipe.source).stem
    for task in tasks:
        train_dir = ctx.input_dir(task, 0)
        full = not (train_dir / "adapter.safetensors").exists()
        final = _final_weights(train_dir, task.params.get("use_ema", False))
        fmt = task.params["format"]
        with ctx.output(task) as folder:
            dest = folder / (f"{stem}_{fmt}" if full else f"{stem}_{fmt}.safetensors")
            export(
                final, [fmt], output=dest, dtype=task.params["dtype"], model=str(resolve_model_path(ctx.data))
            )
