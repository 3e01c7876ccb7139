"""Where an image's caption comes from, as a planned step.

A caption is either *known at plan time* — a human caption (sidecar, manifest, file name, inline list,
template), resolved while planning through the stat cache — or *produced by a step* of the build, such as
a captioning model. Both feed encode-text and train through the same kind of node:

    known text      encode-text item = text_item(text), params {text, max_length}, inputs [text encoder]
                    (keyed by the text: identical known captions and prompts are encoded once)
    produced        encode-text item = "<kind>/<image item>", params {max_length, trigger, template},
                    inputs [Ref(<kind>, <image item>), text encoder]; the step reads the caption from
                    the producer's entry (CAPTION_FILE) and applies the dataset's template and trigger

so a produced caption's embedding is keyed by the producing node's key (which covers the image, the
captioning model and its settings), and a plan never has to know a produced text in advance: `zrecipe
plan` shows the whole build, one plan runs it. The producer stores the model's own text: a changed trigger
or template re-encodes, it never re-captions. The train node references each example's encode-text item,
whichever form it has; a produced caption's reference is optional, so an image whose captioning failed
under `on_error: skip` drops out of training like an image that failed to decode.

A caption producer is registered for a caption-source kind (`Dataset.captions.kind`; `generate` is the
vision-language model of `vlm_captions.py`); `build_graph` asks it for one node per image of a dataset
with that kind that has no winning human caption.

Mixing human and generated captions (`captions: {generate: ..., prefer: sidecar | generated}`), per image:

    human caption (sidecar, manifest, inline) present     prefer sidecar: it wins; generated: the model's
    sidecar written by `zrecipe caption --write-sidecars`  unedited: the model's caption (the file is a
                                                           copy of it); edited: the sidecar, always
    none (or an empty sidecar)                             the model's caption

`--write-sidecars` records what it wrote in `.zrecipe-captions.json` in the dataset folder (each sidecar's
text hash), which is how an edit is told from a copy: writing the sidecars changes no key, and editing one
re-encodes that image's caption and retrains, nothing else.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import xxhash

from zrecipe.engine import Node, Ref

CAPTION_FILE = "caption.txt"  # what a caption-producing step writes into each entry (UTF-8, the model's text)
# Max caption tokens: the pipeline's truncation length.
MAX_TEXT_TOKENS = 512
MARKS_FILE = ".zrecipe-captions.json"  # in a dataset folder: the sidecars `--write-sidecars` wrote
MARKS_FORMAT = 1


class CaptionProducer(Protocol):
    """Captions a dataset's images during the build.

    kind: its step kind (a `kinds.Kind`), whose run writes CAPTION_FILE (the caption text, before the
    dataset's template and trigger) for every task. node_maker(): for one dataset of the graph being built
    (`stat_cache` for content identities, `data` the PipelineData, where it may leave what its run needs),
    a function (image item, image content hash) → the node captioning that image; its params and inputs
    must cover everything its caption depends on (the image's content or its resize entry, the model)."""

    kind: Any

    def node_maker(self, dataset: Any, stat_cache: Any, data: Any) -> Callable[[str, str], Node]: ...


# Caption-source kind → producer. The recipe's own sources are all known at plan time; a captioning step
# (a VLM) registers here (see the end of this module).
CAPTION_PRODUCERS: dict[str, CaptionProducer] = {}


def text_item(text: str) -> str:
    """Item id of a caption / prompt text: identical texts are one item (encoded once)."""
    return xxhash.xxh64_hexdigest(text.encode("utf-8"))


def produced_item(ref: Ref) -> str:
    """encode-text item of a produced caption (never a text item: those are 16 hex digits)."""
    return f"{ref.kind}/{ref.item}"


def text_node(item: str, text: str, text_encoder: str) -> Node:
    """The encode-text node of a text known at plan time."""
    return Node("encode-text", item, {"text": text, "max_length": MAX_TEXT_TOKENS}, [text_encoder], watch=())


def produced_text_node(ref: Ref, text_encoder: str, dataset: Any) -> Node:
    """The encode-text node of the caption that node `ref` produces for an image of `dataset`."""
    params = {
        "max_length": MAX_TEXT_TOKENS,
        "trigger": dataset.trigger,
        "template": dataset.captions.template if dataset.captions.kind == "generate" else None,
    }
    return Node("encode-text", produced_item(ref), params, [ref, text_encoder], None, dataset.on_error)


def produced_text(params: Mapping[str, Any], item: str, entry: Path) -> str:
    """The final text of a produced caption: the producer's entry `entry` (its CAPTION_FILE), with the
    template and trigger of encode-text node `params` (item: the encode-text item)."""
    raw = (entry / CAPTION_FILE).read_text(encoding="utf-8")
    rel = item.split("/", 2)[-1]  # "<kind>/<dataset>/<rel path>"
    return final_caption(raw, rel, params.get("trigger"), params.get("template"))


def final_caption(text: str, rel_path: str, trigger: str | None, template: str | None) -> str:
    """A caption as training sees it: `template` (if any) formatted over it, then the trigger added."""
    from zrecipe.data.captions import add_trigger, apply_template

    if template:
        text = apply_template(template, rel_path, text, trigger)
    return add_trigger(text, trigger.strip()) if trigger and trigger.strip() else text


def producers_used(recipe: Any, producers: Mapping[str, CaptionProducer]) -> dict[str, CaptionProducer]:
    """{dataset name: producer} for the recipe's datasets whose captions a step produces."""
    return {ds.name: producers[ds.captions.kind] for ds in recipe.datasets if ds.captions.kind in producers}


# --- human captions of a dataset whose captions a step produces -----------------------------------------


@dataclass
class HumanCaptions:
    """The human captions that win over the generated ones (final text: template and trigger applied),
    where each came from (`sidecar`, `edited` — a written sidecar changed by hand —, `manifest`, `inline`),
    and the problems met (unreadable sidecars, manifest lines naming missing images); `failed`: the images
    whose sidecar could not be read (left out under `on_error: skip`)."""

    captions: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed: set[str] = field(default_factory=set)


def human_captions(dataset: Any, files: Sequence[Any], read=None) -> HumanCaptions:
    """The winning human captions of `dataset` (a `generate` source; other kinds have none here) for the
    scanned `files`; `read` reads sidecars in one batch (the stat cache's, when planning)."""
    from zrecipe.data.captions import read_files, read_sidecars, resolve_captions
    from zrecipe.data.manifest import inline_entries, manifest_entries, normalise_name

    src = dataset.captions
    out = HumanCaptions()
    if src.kind != "generate":
        return out
    kept: dict[str, str] = {}
    if src.human == "sidecar":
        marks = read_marks(dataset.path)
        sidecars = read_sidecars(files, src.extension, read or read_files, required=False)
        for f, (text, problem) in zip(files, sidecars, strict=True):
            if problem:
                out.problems.append(problem)
                out.failed.add(f.rel_path)
                continue
            if not text:
                continue  # no sidecar (or an empty one): the model's caption
            mark = marks.get(sidecar_rel(f.rel_path, src.extension))
            if mark == text_hash(text):
                continue  # a copy of a generated caption, unedited
            if mark is None and src.prefer == "generated":
                continue
            kept[f.rel_path] = text
            out.origin[f.rel_path] = "sidecar" if mark is None else "edited"
    else:
        entries = manifest_entries(src.file) if src.human == "manifest" else inline_entries(src.items)
        listed = {normalise_name(name, dataset.path) for _, name, _, _ in entries if name}
        files = [f for f in files if f.rel_path in listed]  # the others are the model's to caption
        result = resolve_captions(files, dataset.path, src.human, manifest=src.file, inline=src.items)
        out.problems += result.problems
        kept = result.captions
        out.origin = dict.fromkeys(kept, src.human)
    for rel, text in kept.items():
        out.captions[rel] = final_caption(text, rel, dataset.trigger, src.template)
    return out


# --- the sidecars `zrecipe caption --write-sidecars` writes ------------------------------------------------


def text_hash(text: str) -> str:
    """What a mark records of a written sidecar: a hash of its (stripped) caption text."""
    return xxhash.xxh3_64_hexdigest(text.strip().encode("utf-8"))


def sidecar_rel(rel_path: str, extension: str) -> str:
    """The sidecar of image `rel_path`, relative to the dataset folder (posix)."""
    return os.path.splitext(rel_path)[0] + extension


def read_marks(folder: str | os.PathLike[str]) -> dict[str, str]:
    """{sidecar rel path: text hash} of the sidecars zrecipe wrote into dataset `folder`. A missing or
    unreadable marks file marks nothing: every sidecar then counts as written by a person."""
    try:
        data = json.loads((Path(folder) / MARKS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    marks = data.get("sidecars") if isinstance(data, dict) and data.get("format") == MARKS_FORMAT else None
    if not isinstance(marks, dict):
        return {}
    return {k: v for k, v in marks.items() if isinstance(k, str) and isinstance(v, str)}


def write_sidecars(
    folder: str | os.PathLike[str], captions: Mapping[str, str], extension: str
) -> tuple[list[str], list[str]]:
    """Write `captions` ({image rel path: generated caption}) as sidecar files of dataset `folder` and
    mark them as written (so an unedited one still counts as the model's caption). A sidecar that a person
    wrote or edited is never overwritten. Each file is written atomically; the marks file last. Returns
    (sidecars written, sidecars kept), as rel paths."""
    from zrecipe.engine.store import write_atomic

    folder = Path(folder)
    marks = read_marks(folder)
    written, kept = [], []
    for rel, text in sorted(captions.items()):
        side = sidecar_rel(rel, extension)
        try:
            existing = (folder / side).read_text(encoding="utf-8")
        except FileNotFoundError:
            existing = None
        except (OSError, ValueError):  # unreadable or not UTF-8: not ours to replace
            kept.append(side)
            continue
        if existing is not None and existing.strip() and marks.get(side) != text_hash(existing):
            kept.append(side)
            continue
        write_atomic(folder / side, (text.strip() + "\n").encode("utf-8"), fsync=False)
        marks[side] = text_hash(text)
        written.append(side)
    body = {"format": MARKS_FORMAT, "sidecars": dict(sorted(marks.items()))}
    write_atomic(folder / MARKS_FILE, (json.dumps(body, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return written, kept


def _register() -> None:
    # Imported here, at the end: the producer module uses this module's names.
    from zrecipe.pipeline.vlm_captions import VLM_CAPTIONER

    CAPTION_PRODUCERS["generate"] = VLM_CAPTIONER


_register()
