"""The Z-Image step kinds: what each build step does with its tasks (see zrecipe.engine for the contract).

Each run function loads what it needs once (a model per kind, not per item), batches where the model
allows, writes one store entry per task and frees its model before returning, so the next kind's peak
memory is its own (the text encoder and VAE are gone before training starts).
"""

from __future__ import annotations

import gc
import json
import sys
from collections import defaultdict
from pathlib import Path

from zrecipe.pipeline.captions import produced_text
from zrecipe.pipeline.identity import resolve_model_path

# One item per model call: batched numerics depend on the batch (padding length, BLAS blocking by matrix
# height — measured: every item of an 8-item VAE or text batch differed in its last bits from the same item
# encoded alone). A store entry must be a function of its key alone, or a fresh build and an incremental
# build (which re-encodes a different set of items together) would train on different bytes.
ENCODE_BATCH = 1
LATENTS_FILE = "latents.safetensors"
EMBEDDING_FILE = "embedding.safetensors"
# What a train entry holds beside its per-checkpoint adapters (the EMA weights when the run keeps one).


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
                expected_hash=task.inputs[0],  # decode the bytes the key was made from, or fail
            )
            (folder / "size.json").write_text(json.dumps({"width": w, "height": h}))


# --- encode-image (per image, batched per bucket) ---------------------------------------------------------


def run_encode_image(tasks, ctx) -> None:
    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from zrecipe.models.z_image.vae import load_vae, to_model_latents

    vae = load_vae(resolve_model_path(ctx.data), dtype=mx.float32)
    for batch in image_batches(tasks, ctx):
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


def image_batches(tasks, ctx) -> list[list]:
    """The VAE batches: tasks grouped by image size (size order), then runs of ENCODE_BATCH in task order."""
    by_size: dict[tuple[int, int], list] = defaultdict(list)
    for task in tasks:
        size = json.loads((ctx.input_dir(task, 0) / "size.json").read_text())
        by_size[(size["height"], size["width"])].append(task)
    groups = [group for _, group in sorted(by_size.items())]
    return [group[i : i + ENCODE_BATCH] for group in groups for i in range(0, len(group), ENCODE_BATCH)]


def text_batches(tasks, ctx=None) -> list[list]:
    """The text-encoder batches: runs of ENCODE_BATCH in task order."""
    return [tasks[i : i + ENCODE_BATCH] for i in range(0, len(tasks), ENCODE_BATCH)]


# --- encode-text (per distinct text) ----------------------------------------------------------------------


def run_encode_text(tasks, ctx) -> None:
    import mlx.core as mx

    from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
    from zrecipe.models.z_image.tokenizer import load_tokenizer

    model_path = resolve_model_path(ctx.data)
    tokenizer = load_tokenizer(model_path)
    encoder = load_text_encoder(model_path, dtype=mx.float32)
    for batch in text_batches(tasks):
        texts = [_text(task, ctx) for task in batch]
        embeds = encode_prompts(encoder, tokenizer, texts, max(t.params["max_length"] for t in batch))
        for task, emb in zip(batch, embeds, strict=True):
            with ctx.output(task) as folder:
                mx.save_safetensors(str(folder / EMBEDDING_FILE), {"embedding": emb.astype(mx.float32)})
    del encoder
    _free()


def _text(task, ctx) -> str:
    """A known text (params) or the caption a producing step wrote (its entry is the first input)."""
    if "text" in task.params:
        return task.params["text"]
    return produced_text(task.params, task.item, ctx.input_dir(task, 0))


# --- train (one task) -------------------------------------------------------------------------------------


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on request (a signal, the battery limit) after writing `checkpoint`: the build stops
    (exit code 75); the next build resumes from the checkpoint. A KeyboardInterrupt, so that the engine
    treats it as an interrupt (the build record is written, nothing is committed for the train node)."""

    exit_code = 75

    def __init__(self, step: int, total: int, reason: str, checkpoint: Path | None):
        super().__init__(f"training stopped at step {step}/{total} ({reason}); checkpoint: {checkpoint}")
        self.step, self.total, self.reason, self.checkpoint = step, total, reason, checkpoint


def _load_examples(task, ctx):
    """Training and held-out examples from the encode-image / encode-text / mask entries the train node
    references: (examples, validation examples, the empty caption's embedding, skipped image items)."""
    import mlx.core as mx
    import numpy as np

    from zrecipe.engine import Ref
    from zrecipe.pipeline.masks import MASK_FILE
    from zrecipe.training.data import Example

    image_dirs, text_dirs, mask_dirs = {}, {}, {}
    for index, ref in enumerate(task.node.inputs):
        if not isinstance(ref, Ref):
            continue
        folder = ctx.input_dir(task, index)
        if ref.kind == "encode-image":
            image_dirs[ref.item] = (folder, task.inputs[index])
        elif ref.kind == "mask":
            mask_dirs[ref.item] = folder
        elif folder is not None:
            text_dirs[ref.item] = folder
    embeddings = {item: mx.load(str(d / EMBEDDING_FILE))["embedding"] for item, d in text_dirs.items()}
    examples, held_out, skipped = [], [], []
    for e in ctx.data.examples:
        folder, key = image_dirs.get(e.image, (None, None))
        caption = embeddings.get(e.text)
        mask_dir = mask_dirs.get(e.image) if e.mask else None
        if folder is None or caption is None or (e.mask and mask_dir is None):  # skipped upstream
            skipped.append(e.image)
            continue
        latents = mx.load(str(folder / LATENTS_FILE))["latents"]
        bucket = (int(latents.shape[1]), int(latents.shape[2]))
        mask = None if mask_dir is None else np.load(mask_dir / MASK_FILE, allow_pickle=False)
        if mask is not None and tuple(mask.shape) != bucket:
            from zrecipe.errors import StepFailed

            raise StepFailed(f"{e.image}: its mask is {mask.shape} but its latents are {bucket}.")
        example = Example(latents, caption, bucket, e.dataset, e.repeats, e.caption_dropout, key,
                          e.loss_weight, mask)  # fmt: skip
        (held_out if e.holdout else examples).append(example)
    return examples, held_out, embeddings[ctx.data.empty_text], skipped


def run_train(tasks, ctx) -> None:
    import dataclasses

    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.pipeline.train_work import (
        assistant_input,
        commit_train,
        resume_point,
        start_input,
        training_identity,
    )
    from zrecipe.training.callbacks import default_callbacks
    from zrecipe.training.checkpointer import RunInfo
    from zrecipe.training.distributed import world
    from zrecipe.training.loop import train
    from zrecipe.training.session import load_for_training, peak_memory
    from zrecipe.training.settings import params_hash

    (task,) = tasks
    w, options, recipe = world(), ctx.data.options, ctx.data.recipe
    log = _log if w.main else (lambda _msg: None)
    examples, held_out, empty, skipped = _load_examples(task, ctx)
    # Checkpoints live in the step's persistent work folder, keyed like the step: an interrupted build
    # resumes from the newest one of the *same* key (same data, parameters, model and code).
    work = ctx.work_dir(task)
    resume = resume_point(task, ctx, work, examples, log)
    assistant = assistant_input(task, ctx)
    transformer, settings = load_for_training(task.params, resolve_model_path(ctx.data), examples, log,
                                              assistant)  # fmt: skip
    # Runtime options: `--low-ram` changes when memory is released, TensorBoard only logs; neither changes a
    # value, so neither is in the key.
    settings = dataclasses.replace(
        settings,
        low_ram=recipe.training_loop.low_ram or bool(options.get("low_ram")),
        tensorboard=recipe.training_loop.tensorboard,
    )
    if settings.tensorboard and w.main:  # live while training; published from the work folder
        log(f"train: TensorBoard events in {work / 'tensorboard'}")
    # Everything written under the key depends only on what it covers: the base model's identity and a
    # hash of the train parameters, not the recipe's paths, sample prompts or exports. The adapter's base
    # is the clean transformer (an assistant LoRA is not in it); checkpoints record what they trained on.
    meta = {"base_model": task.inputs[0], "recipe_hash": params_hash(task.params), "train_step_key": task.key}
    run = RunInfo(
        model_identity=training_identity(task),
        train_step_key=task.key,
        config=recipe.to_dict(),  # the resolved recipe, for --train-checkpoint (work folder, not keyed)
        adapter_metadata=meta,
        checkpoint_meta={"recipe_source": str(recipe.source)},
    )
    objective = FlowMatchingObjective.from_settings(settings, empty)
    callbacks = default_callbacks(options.get("progress", True), options.get("battery_limit"))
    if settings.validation is not None:
        from zrecipe.training.validation import ValidationLoss

        callbacks.append(ValidationLoss(held_out, objective, settings.validation,
                                        settings.checkpoint_frequency, log))  # fmt: skip
    start = start_input(task, ctx, work, log) if resume is None else None  # only a fresh run starts
    result = train(transformer, examples, objective, settings, work, run=run, resume_from=resume,
                   callbacks=callbacks, start=start)  # fmt: skip
    del transformer
    _free()
    if result.stopped:
        raise TrainingStopped(result.step, result.total_steps, result.stopped, result.checkpoint)
    log(f"train: {result.trainable_parameters:,} trainable parameters; peak memory {peak_memory(result)}")
    if result.world_size > 1 and not w.main:
        return  # a distributed build: rank 0 commits the entry, the others learn its outcome from it
    commit_train(task, ctx, work, result, skipped, settings)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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

    from zrecipe.generation.generate import GenerationSettings, save_png
    from zrecipe.generation.samples import SampleRequest, render_samples

    requests = []
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
        requests.append(SampleRequest(settings, p["seed"], pos, neg))
    # Every sample node reads the one train node and shares `every`.
    adapters = _sample_adapters(
        ctx.input_dir(tasks[0], 0), tasks[0].params["every"], tasks[0].params.get("use_ema", False)
    )
    # The model named in the PNGs is the transformer's identity (an input of the key), not its path.
    rows = render_samples(resolve_model_path(ctx.data), adapters, requests, tasks[0].inputs[3])
    for task, row in zip(tasks, rows, strict=True):
        with ctx.output(task) as folder:
            for index, (_label, image, meta) in enumerate(row):
                save_png(image, folder / f"{index:02d}.png", meta)
            (folder / "labels.json").write_text(json.dumps([label for label, _, _ in row]))


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

    model = str(resolve_model_path(ctx.data))
    for task in tasks:
        train_dir = ctx.input_dir(task, 0)
        full = not (train_dir / "adapter.safetensors").exists()
        final = _final_weights(train_dir, task.params.get("use_ema", False))
        name = task.params["name"]
        with ctx.output(task) as folder:
            dest = folder / (name if full else f"{name}.safetensors")
            export(final, [task.params["format"]], output=dest, dtype=task.params["dtype"], model=model)
