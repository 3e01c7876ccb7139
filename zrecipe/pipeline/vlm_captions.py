"""The `caption` step: a vision-language model captions each image (`captions: {generate: {...}}`).

    caption   item = image item, params {prompt, max_tokens, repetition_penalty, decoding: greedy},
              inputs [image content hash, captioning model identity]

The key covers the image's *source* content (what the user sees; the model's processor resizes it itself,
so a new training resolution or bucketing does not re-caption anything), the model's files (through the
stat cache, like the base model's), the prompt and the decoding settings, and the step version. The entry
holds CAPTION_FILE (the model's text) and `caption.json` (tokens generated, and whether it stopped or ran
into max_tokens). A multi-rank build shards the images (one per batch: every caption is computed alone).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from zrecipe.engine import Node
from zrecipe.pipeline.kinds import Kind

CAPTION_KIND = "caption"
CAPTION_INFO = "caption.json"


def run_caption(tasks, ctx) -> None:
    """Caption every task's image with its model (loaded once per model), one image per generation."""
    from zrecipe.models.vlm.caption import Captioner, require_mlx_vlm
    from zrecipe.models.vlm.resolve import resolve_vlm
    from zrecipe.pipeline.captions import CAPTION_FILE
    from zrecipe.pipeline.steps import _free

    require_mlx_vlm()  # before any item: a missing extra stops the build (exit 2), it skips nothing
    models = ctx.data.options["caption_models"]
    by_model: dict[str, list] = defaultdict(list)
    for task in tasks:
        by_model[task.node.inputs[1]].append(task)
    for identity, group in by_model.items():
        captioner = Captioner(resolve_vlm(models[identity]), name=models[identity])
        for task in group:
            p = task.params
            with ctx.output(task) as folder:
                path, image = source_image(task, ctx)
                caption = captioner.caption(
                    image, str(path), p["prompt"], p["max_tokens"], p["repetition_penalty"]
                )
                (folder / CAPTION_FILE).write_text(caption.text, encoding="utf-8")
                info = {"tokens": caption.tokens, "finish": caption.finish}
                (folder / CAPTION_INFO).write_text(json.dumps(info, sort_keys=True))
        del captioner
        _free()


def source_image(task, ctx):
    """(path, image): the task's source image, decoded upright (EXIF orientation) to RGB from bytes that
    are checked against the planned content hash (a file changed since planning fails this item, never
    stored under the old key)."""
    from zrecipe.data.images import load_image
    from zrecipe.errors import DatasetError

    dataset, rel = task.item.split("/", 1)
    path = Path(ctx.data.dataset_folders[dataset]) / rel
    try:
        return path, load_image(path, expected_hash=task.node.inputs[0])
    except DatasetError as exc:
        raise DatasetError(str(exc), items=[task.item]) from exc


class VLMCaptioner:
    """The caption producer of `captions: {generate: ...}` datasets."""

    kind = Kind(CAPTION_KIND, 1, run_caption, "VLM captions", distribution="sharded")

    def node_maker(self, dataset, stat_cache, data) -> Callable[[str, str], Node]:
        from zrecipe.models.vlm.resolve import vlm_identity

        generate = dataset.captions.generate
        identity = vlm_identity(generate.model, stat_cache)
        data.options.setdefault("caption_models", {})[identity] = generate.model
        params = {
            "prompt": generate.prompt,
            "max_tokens": generate.max_tokens,
            "repetition_penalty": generate.repetition_penalty,
            "decoding": "greedy",
        }
        on_error = dataset.on_error

        def node(item: str, source_hash: str) -> Node:
            return Node(CAPTION_KIND, item, params, [source_hash, identity], None, on_error)

        return node


VLM_CAPTIONER = VLMCaptioner()
