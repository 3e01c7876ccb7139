"""`load_recipe(path)`: read a YAML/JSON recipe file, validate every section, return a frozen Recipe.

Every problem found is collected and raised at once as one `RecipeError` whose lines read
`FILE:LINE: key.path: message` (with a did-you-mean for unknown keys and misspelt choices). Nothing but
`RecipeError` ever escapes, whatever the input.

`model:` (see `zrecipe/recipe/model.py`) is a preset (`z-image`, `z-image-turbo`, `tiny`), a folder, a
Hugging Face repo id (`org/name`), or a base with files per component (ComfyUI / mflux-save layouts).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from zrecipe.engine.files import read_regular
from zrecipe.errors import RecipeError
from zrecipe.recipe.datasets import RESOLUTION, read_datasets, read_examples
from zrecipe.recipe.fields import (
    MISSING,
    Bad,
    Context,
    Reader,
    format_path,
    integer,
    resolve_path,
    text,
)
from zrecipe.recipe.lora import read_lora
from zrecipe.recipe.model import read_model
from zrecipe.recipe.schema import (
    DEFAULT_MODE,
    DEFAULT_SEED,
    MAX_SEED,
    MODES,
    FullFinetune,
    Recipe,
)
from zrecipe.recipe.sections import (
    OPTIMIZER,
    SAMPLE,
    SAMPLE_SETTINGS,
    TRAINING_LOOP,
    read_export,
    read_full_finetune,
    read_optimizer,
    read_sample,
    read_save,
    read_training_loop,
    read_validation,
)
from zrecipe.recipe.yamlsource import parse_recipe_text

TOP_KEYS = (
    "model",
    "mode",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "datasets",
    "examples",
    "training_loop",
    "optimizer",
    "lora_layers",
    "lora",
    "full_finetune",
    "save",
    "sample",
    "export",
    "cache",
    "validation",
)
# Where a key written at the top level by mistake belongs (for the hint in the error).
_SECTION_OF = {
    **{k: "training_loop" for k in TRAINING_LOOP},
    **{k: "optimizer" for k in OPTIMIZER},
    **{k: "sample" for k in SAMPLE if k not in SAMPLE_SETTINGS},
    "checkpoint_frequency": "save",
    "output_path": "save",
    "keep_last": "save",
    "formats": "export",
    "dtype": "export",
    "rank": "lora",
    "alpha": "lora",
    "targets": "lora",
    "path": "datasets[]",
    "captions": "datasets[]",
    "repeats": "datasets[]",
    "resolution": "datasets[]",
    "trigger": "datasets[]",
    "caption_dropout": "datasets[]",
    "bucketing": "datasets[]",
}


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """Load and validate the recipe file at `path` (YAML or JSON). Raises RecipeError."""
    try:
        label = os.fspath(path)
        file = Path(label)
    except TypeError:
        msg = f"a recipe path must be a file path, got {type(path).__name__}"
        raise RecipeError(msg, [msg]) from None
    try:
        raw = read_regular(file)  # a FIFO or device named as the recipe is refused, not read forever
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            why = "no such recipe file"
        elif isinstance(exc, IsADirectoryError) or os.path.isdir(file):
            why = "is a folder; give the recipe file inside it"
        else:
            why = f"cannot read the recipe: {getattr(exc, 'strerror', None) or exc}"
        msg = f"{label}: {why}"
        raise RecipeError(msg, [msg]) from None
    try:
        text_ = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        msg = (
            f"{label}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save the recipe as UTF-8"
        )
        raise RecipeError(msg, [msg]) from None
    data, lines, structural = parse_recipe_text(text_, label)
    return build_recipe(data, source=file, lines=lines, label=label, structural=structural)


def build_recipe(
    data: Any,
    source: str | os.PathLike[str] | None = None,
    lines: dict | None = None,
    label: str | None = None,
    structural: list = (),
) -> Recipe:
    """Validate parsed recipe data. `lines` maps key paths to line numbers (from the YAML parser);
    `structural` are parser problems (duplicate keys...) to report with the rest."""
    try:
        source_path = None if source is None else Path(os.path.abspath(os.fspath(source)))
    except (TypeError, ValueError):
        msg = f"the recipe source must be a file path, got {source!r:.60}"
        raise RecipeError(msg, [msg]) from None
    label = label or (os.fspath(source) if source is not None else "<recipe>")
    root = source_path.parent if source_path else Path(os.path.abspath(os.curdir))
    ctx = Context(label, lines)
    for path, message, line in structural:
        ctx.add(path, message, line)
    top = Reader.open(ctx, (), data)
    if top is None:
        ctx.raise_if_any()  # Reader.open recorded why; this raises
        raise RecipeError(f"{label}: the recipe must be a mapping of keys")
    top.check_keys(TOP_KEYS, hints=_SECTION_OF)

    model = read_model(top, root)
    mode = top.get("mode", text(choices=MODES), DEFAULT_MODE)
    seed = top.get("seed", integer(min=0, max=MAX_SEED), DEFAULT_SEED)
    top_level = top.fill(SAMPLE_SETTINGS)
    datasets = _datasets(top, root, top_level)
    training_loop = read_training_loop(top, root)
    optimizer = read_optimizer(top)
    if training_loop.max_steps is not None and optimizer.warmup_steps > training_loop.max_steps:
        ctx.add(
            ("optimizer", "warmup_steps"),
            f"longer than training_loop.max_steps ({training_loop.max_steps}), got {optimizer.warmup_steps}",
        )
    if mode == "full" and training_loop.quantize:
        ctx.add(
            ("training_loop", "quantize"),
            "applies to LoRA only: full fine-tuning trains every weight, which must stay unquantised; "
            "remove it or use `mode: lora`",
        )
    if mode == "full" and training_loop.assistant_lora:
        ctx.add(
            ("training_loop", "assistant_lora"),
            "applies to LoRA only: it is fused into the base under a trained LoRA and left out of the "
            "exports; a full fine-tune would bake it into every weight. Remove it or use `mode: lora`",
        )
    if mode == "full" and training_loop.start_from:
        ctx.add(
            ("training_loop", "start_from"),
            "applies to LoRA only (it names the adapter weights training starts from); remove it or use "
            "`mode: lora`",
        )
    lora = read_lora(ctx, top, mode)
    full_finetune = (
        read_full_finetune(top, mode) if mode == "full" or top.has("full_finetune") else FullFinetune()
    )
    save = read_save(top, root, source_path.stem if source_path else "recipe")
    sample = read_sample(top, seed, top_level, model)
    validation = read_validation(top, tuple(d.name for d in datasets))
    export = read_export(top, root, save)
    for section, wants in (("sample", sample is not None and sample.use_ema), ("export", export.use_ema)):
        if wants and training_loop.ema is None:
            ctx.add((section, "use_ema"), "needs `training_loop.ema: {decay: ...}` (no EMA weights are kept)")
    cache = None
    if top.data.get("cache") is not None:
        cache = resolve_path(ctx, ("cache",), top.data["cache"], root)
    ctx.raise_if_any()
    return Recipe(
        source=source_path or Path(root, "<recipe>"),
        root=root,
        model=model,
        mode=mode,
        seed=seed,
        datasets=datasets,
        training_loop=training_loop,
        optimizer=optimizer,
        lora=lora,
        full_finetune=full_finetune,
        save=save,
        sample=sample,
        export=export,
        cache=cache,
        validation=validation,
    )


def _datasets(top: Reader, root: Path, top_level: dict[str, Any]) -> tuple:
    found = []
    if top.data.get("examples") is not None:
        sides = [(k, top_level[k]) for k in ("width", "height") if k in top_level]
        resolution = None
        if sides:
            key, resolution = max(sides, key=lambda kv: kv[1])
            try:
                RESOLUTION(resolution)
            except Bad as exc:
                top.ctx.add((key,), f"also the training resolution of `examples`: {exc.items[0][1]}")
                resolution = None
        dataset = read_examples(top.ctx, top.data["examples"], root, resolution)
        if dataset is not None:
            found.append((("examples",), dataset))
    found += read_datasets(top.ctx, top.data.get("datasets", MISSING), root)
    first: dict[str, tuple] = {}
    for path, dataset in found:
        if dataset.name in first:
            top.ctx.add(
                path + ("name",),
                f"dataset name {dataset.name!r} is already used by "
                f"{format_path(first[dataset.name])}; set a different `name:`",
            )
        first.setdefault(dataset.name, path)
    return tuple(d for _, d in found)
