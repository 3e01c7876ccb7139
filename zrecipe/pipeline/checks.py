"""Plan-time checks of values that validate on their own but cannot work with this data or this model.

The recipe loader checks each value alone (types, ranges); these need what only planning knows — how many
images a dataset has, the model's config.json, its tokenizer — and run before any step, without MLX:

- unreadable images (the stat cache could not hash them): a dataset problem, skipped with `on_error: skip`;
- `repeats` × images per epoch within MAX_EPOCH_EXAMPLES (an epoch's order is held in memory and saved in
  every checkpoint);
- LoRA block ranges within the model's blocks (they used to be clamped silently) and ranks within the
  layers' sizes;
- texts longer than the text encoder's window: a warning with their count (the tail is ignored). Only
  texts whose encode-text node is stale are tokenized, so a no-op plan pays nothing.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from zrecipe.errors import DatasetError, RecipeError, ZRecipeWarning

# An epoch lists every example `repeats` times; its order lives in memory and in each checkpoint's
# iterator.json. Ten million entries is ~100 MB of JSON per checkpoint: far past any real dataset.
MAX_EPOCH_EXAMPLES = 10_000_000
# Width of the timestep conditioning the adaLN Linear reads (transformer_blocks.ADALN_EMBED_DIM).
ADALN_EMBED_DIM = 256


def drop_unreadable(recipe, scan, errors: dict[str, OSError]) -> None:
    """Take images the stat cache could not read out of `scan`; `on_error: skip` datasets record them as
    skipped, the others raise one DatasetError naming every such file."""
    if not errors:
        return
    problems: list[str] = []
    for ds in recipe.datasets:
        files = scan.images.get(ds.name, [])
        bad = [f for f in files if f.path in errors]
        if not bad:
            continue
        scan.images[ds.name] = [f for f in files if f.path not in errors]
        for f in bad:
            exc = errors[f.path]
            line = f"dataset {ds.name!r}: {f.path}: cannot read the image ({exc.strerror or exc}); fix its permissions or remove it"
            (scan.skipped if ds.on_error == "skip" else problems).append(line)
    if problems:
        raise DatasetError(
            f"{recipe.source}: {len(problems)} unreadable image(s):\n  " + "\n  ".join(problems)
            + "\nFix them, or set `on_error: skip` on the dataset to leave those items out.",
            items=problems,
        )  # fmt: skip


def check_values(recipe, scan, data, wanted: set[str]) -> None:
    """Every plan-time value check that applies to the kinds being built."""
    if "train" in wanted:
        check_epoch_size(recipe, scan)
        check_lora_targets(recipe, transformer_config(recipe, data.model_path))


def check_epoch_size(recipe, scan) -> None:
    """Refuse `repeats` that make an epoch too long to hold in memory."""
    problems = []
    total = 0
    for index, ds in enumerate(recipe.datasets):
        n = len(scan.images.get(ds.name, [])) * int(ds.repeats)
        total += n
        if n > MAX_EPOCH_EXAMPLES:
            problems.append(
                f"datasets[{index}].repeats: {ds.repeats:,} × {len(scan.images[ds.name]):,} images = {n:,} "
                f"examples per epoch, more than the {MAX_EPOCH_EXAMPLES:,} an epoch can hold; lower `repeats` "
                "(training_loop.max_steps sets a long run's length)"
            )
    if not problems and total > MAX_EPOCH_EXAMPLES:
        problems.append(
            f"datasets: {total:,} examples per epoch (images × repeats of every dataset), more than the "
            f"{MAX_EPOCH_EXAMPLES:,} an epoch can hold; lower `repeats`"
        )
    if problems:
        raise RecipeError(f"{recipe.source}: " + "; ".join(problems), problems)


def transformer_config(recipe, model_path: str | None) -> dict[str, Any] | None:
    """The transformer's config.json as a dict (the built-in tiny model's without creating it), or None
    when the model folder has none (then the model checks are left to the train step)."""
    if recipe.model == "tiny":
        from zrecipe.models.z_image.tiny import TRANSFORMER_CONFIG

        return dict(TRANSFORMER_CONFIG)
    if not model_path:
        return None
    try:
        data = json.loads((Path(model_path) / "transformer" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def block_counts(config: dict[str, Any]) -> dict[str, int]:
    """Blocks per block type of a Z-Image transformer config."""
    return {
        "layers": int(config["n_layers"]),
        "noise_refiner": int(config["n_refiner_layers"]),
        "context_refiner": int(config["n_refiner_layers"]),
    }


def layer_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of every LoRA-able Linear of a block, from the transformer config (K and V use
    every head, as the reference builds them; SwiGLU hidden width `int(dim / 3 * 8)`)."""
    dim = int(config["dim"])
    hidden = int(dim / 3 * 8)
    shapes = {f"attention.{n}": (dim, dim) for n in ("to_q", "to_k", "to_v", "to_out.0")}
    shapes |= {
        "feed_forward.w1": (dim, hidden),
        "feed_forward.w3": (dim, hidden),
        "feed_forward.w2": (hidden, dim),
    }
    shapes["adaLN_modulation.0"] = (min(dim, ADALN_EMBED_DIM), 4 * dim)
    return shapes


def check_lora_targets(recipe, config: dict[str, Any] | None) -> None:
    """Block ranges inside the model's blocks and ranks no larger than the layers they adapt."""
    if recipe.mode != "lora" or recipe.lora is None or config is None:
        return
    try:
        counts, shapes = block_counts(config), layer_shapes(config)
    except (KeyError, TypeError, ValueError):
        return  # not a config these checks understand: the train step's own checks apply
    problems = []
    for t in recipe.lora.targets:
        count = counts.get(t.block_type)
        if count is None:
            continue
        end = count if t.end is None else t.end
        where = f"lora target {t.block_type}[{t.start}:{'' if t.end is None else t.end}]"
        if t.start >= count or end > count:
            problems.append(
                f"{where}: the model has {count} {t.block_type} block{'s' if count != 1 else ''} "
                f"(0..{count - 1}, end is exclusive): use a range within [0, {count}]"
            )
        for layer_type in t.layer_types:
            shape = shapes.get(layer_type)
            if shape is not None and t.rank > min(shape):
                problems.append(
                    f"{where}: rank {t.rank} is larger than {layer_type} ({shape[0]} → {shape[1]} features); "
                    f"a rank above {min(shape)} adds nothing: lower `rank`"
                )
    if problems:
        raise RecipeError(f"{recipe.source}: " + "; ".join(problems), problems)


def warn_long_texts(plan, data) -> None:
    """Warn about stale encode-text texts longer than the encoder's window once templated (one warning
    with the count and a few of them). Texts already encoded were warned about when they were new."""
    # Produced captions (a captioning step) are not known yet at plan time: only texts the plan knows.
    stale = [p for p in plan.nodes.get("encode-text", []) if p.stale and "text" in p.node.params]
    if not stale:
        return
    tokenizer = _tokenizer(data)
    if tokenizer is None:
        return
    texts = [p.node.params["text"] for p in stale]
    limit = int(stale[0].node.params["max_length"])
    counts = [
        len(e.ids) for e in tokenizer.tokenizer.encode_batch([tokenizer.apply_template(t) for t in texts])
    ]
    long = [(n, t) for n, t in zip(counts, texts, strict=True) if n > limit]
    if not long:
        return
    images = {}
    by_text = {p.node.item: p.node.params["text"] for p in stale}
    for e in data.examples:
        text = by_text.get(e.text)
        if text is not None:
            images.setdefault(text, e.image)
    shown = [f"{images.get(t, repr(t[:40] + '...'))} ({n} tokens)" for n, t in sorted(long, reverse=True)[:3]]
    warnings.warn(
        f"{len(long)} caption(s)/prompt(s) are longer than the text encoder's {limit} tokens once templated "
        f"and will be truncated (the ignored tail still counts as an edit): {', '.join(shown)}"
        + (f" and {len(long) - 3} more" if len(long) > 3 else "")
        + "; shorten them to use all of their text.",
        ZRecipeWarning,
        stacklevel=2,
    )


def _tokenizer(data):
    """The model's tokenizer, when planning resolved a model folder (`model: tiny` is created only when a
    step needs it, and its test captions are short: it is not checked)."""
    from zrecipe.models.z_image.tokenizer import load_tokenizer

    folder = data.model_path
    if folder is None or not (Path(folder) / "tokenizer" / "tokenizer.json").is_file():
        return None
    try:
        return load_tokenizer(folder)
    except Exception:  # noqa: BLE001 — an unreadable tokenizer fails the encode-text step with its own error
        return None
