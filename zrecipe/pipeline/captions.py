"""Where an image's caption comes from, as a planned step.

A caption is either *known at plan time* — a human caption (sidecar, manifest, file name, inline list,
template), resolved while planning through the stat cache — or *produced by a step* of the build, such as
a captioning model. Both feed encode-text and train through the same kind of node:

    known text      encode-text item = text_item(text), params {text, max_length}, inputs [text encoder]
                    (keyed by the text: identical known captions and prompts are encoded once)
    produced        encode-text item = "<kind>/<image item>", params {max_length},
                    inputs [Ref(<kind>, <image item>), text encoder]; the step reads the caption from
                    the producer's entry (CAPTION_FILE)

so a produced caption's embedding is keyed by the producing node's key (which covers the image, the
captioning model and its settings), and a plan never has to know a produced text in advance: `zrecipe
plan` shows the whole build, one plan runs it. The train node references each example's encode-text item,
whichever form it has; a produced caption's reference is optional, so an image whose captioning failed
under `on_error: skip` drops out of training like an image that failed to decode.

A caption producer is registered for a caption-source kind (`Dataset.captions.kind`); `build_graph`
asks it for one node per image of a dataset with that kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import xxhash

from zrecipe.engine import Node, Ref

CAPTION_FILE = "caption.txt"  # what a caption-producing step writes into each entry (UTF-8, final text)
# Max caption tokens: the pipeline's truncation length.
MAX_TEXT_TOKENS = 512


class CaptionProducer(Protocol):
    """Captions a dataset's images during the build.

    kind: its step kind (a `kinds.Kind`), whose run writes CAPTION_FILE for every task, the dataset's
    trigger already applied. node(): the node captioning one image; its params and inputs must cover
    everything its caption depends on (the image's content hash or its resize entry, the model)."""

    kind: Any

    def node(self, dataset: Any, item: str, source_hash: str) -> Node: ...


# Caption-source kind → producer. The recipe's own sources are all known at plan time; a captioning step
# (a VLM) registers here.
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


def produced_text_node(ref: Ref, text_encoder: str, on_error: str = "fail") -> Node:
    """The encode-text node of the caption that node `ref` produces."""
    return Node(
        "encode-text", produced_item(ref), {"max_length": MAX_TEXT_TOKENS}, [ref, text_encoder], (), on_error
    )


def producers_used(recipe: Any, producers: Mapping[str, CaptionProducer]) -> dict[str, CaptionProducer]:
    """{dataset name: producer} for the recipe's datasets whose captions a step produces."""
    return {ds.name: producers[ds.captions.kind] for ds in recipe.datasets if ds.captions.kind in producers}
