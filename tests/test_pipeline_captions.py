"""A caption made by a step during the build feeds encode-text and train (captions as planned nodes).

The captioning step here is defined by the test: it names each resized image's dominant colour, a real
if simple captioner, registered as a caption producer the way a VLM captioner would be.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zrecipe.engine import Node, Record, Ref, Store, build, plan
from zrecipe.pipeline.captions import CAPTION_FILE, produced_item, text_item
from zrecipe.pipeline.graph import build_graph
from zrecipe.pipeline.kinds import Kind
from zrecipe.recipe import CaptionSource, load_recipe

REPO = Path(__file__).resolve().parent.parent
COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def run_colour_caption(tasks, ctx) -> None:
    for task in tasks:
        with ctx.output(task) as folder:
            image = Image.open(ctx.input_dir(task, 0) / "image.png").convert("RGB")
            mean = np.asarray(image, dtype=np.float64).reshape(-1, 3).mean(0)
            colour = ("red", "green", "blue")[int(mean.argmax())]
            (folder / CAPTION_FILE).write_text(f"a mostly {colour} picture")


class ColourCaptioner:
    kind = Kind(
        "caption-colour", 1, run_colour_caption, "dominant colour", ("resize",), distribution="sharded"
    )

    def node_maker(self, dataset, stat_cache, data):
        # Reads the resized image, so its key covers the image content and the resize settings.
        def node(item: str, source_hash: str) -> Node:
            return Node(self.kind.name, item, {}, [Ref("resize", item)], on_error=dataset.on_error)

        return node


RECIPE = """\
model: {model}
mode: lora
seed: 1
datasets:
  - name: d
    path: data
    resolution: 64
    trigger: zc
training_loop: {{max_steps: 2, batch_size: 2}}
lora: {{rank: 2, targets: [{{blocks: layers, layer_types: [attention.to_q]}}]}}
save: {{checkpoint_frequency: 2, output_path: out}}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("captions") / "tiny")


def project(root: Path, model: Path, colours: list[str]):
    (root / "data").mkdir(parents=True)
    for i, colour in enumerate(colours):
        Image.new("RGB", (64, 64), COLOURS[colour]).save(root / "data" / f"{i}.png")
    (root / "recipe.yaml").write_text(RECIPE.format(model=model))
    recipe = load_recipe(root / "recipe.yaml")
    # The recipe language has no captioning source yet: the dataset is pointed at the test's producer.
    ds = dataclasses.replace(recipe.datasets[0], captions=CaptionSource(kind="colour"))
    return dataclasses.replace(recipe, datasets=(ds,))


def graph_of(recipe, cache: Path, until=None):
    return build_graph(recipe, cache, until=until, producers={"colour": ColourCaptioner()})


def stale(recipe, cache: Path) -> dict[str, int]:
    graph, _ = graph_of(recipe, cache)
    store = Store(cache)
    the_plan = plan(graph, store, Record.load(store.root, graph.graph_id))
    return {k: len(the_plan.stale(k)) for k in the_plan.order}


def test_a_produced_caption_feeds_encode_text_and_train(tmp_path, tiny_model):
    import mlx.core as mx

    from zrecipe.models.z_image.text_encoder import encode_prompts, load_text_encoder
    from zrecipe.models.z_image.tokenizer import load_tokenizer

    recipe = project(tmp_path, tiny_model, ["red", "green", "red"])
    cache = tmp_path / "cache"
    graph, data = graph_of(recipe, cache)
    produced = [produced_item(Ref("caption-colour", f"d/{i}.png")) for i in range(3)]
    # The encode-text nodes of produced captions read the producer's entry; the empty prompt stays keyed
    # by its text, as every known caption is.
    assert sorted(graph.nodes["encode-text"]) == sorted([*produced, text_item("")])
    assert [e.text for e in data.examples] == produced
    train_refs = {i.item for i in graph.node("train", "train").inputs if isinstance(i, Ref)}
    assert set(produced) <= train_refs
    assert graph.order().index("caption-colour") < graph.order().index("encode-text")

    store = Store(cache)
    the_plan, report = build(graph, store, data, progress=False)
    assert report.status == "ok" and report.kinds["caption-colour"].ran == 3
    assert report.kinds["train"].ran == 1
    nodes = the_plan.by_id()
    texts = [
        (store.path(nodes[("caption-colour", f"d/{i}.png")].key) / CAPTION_FILE).read_text() for i in range(3)
    ]
    # The producer stores its own text; the dataset's trigger is added when it is encoded.
    assert texts == ["a mostly red picture", "a mostly green picture", "a mostly red picture"]
    # Each embedding is the text encoder's output for the produced text.
    encoder, tokenizer = load_text_encoder(tiny_model, dtype=mx.float32), load_tokenizer(tiny_model)
    expected = encode_prompts(encoder, tokenizer, ["zc, " + texts[1]])[0]
    got = mx.load(str(store.path(nodes[("encode-text", produced[1])].key) / "embedding.safetensors"))
    assert np.array_equal(np.array(got["embedding"]), np.array(expected.astype(mx.float32)))

    # Incremental: nothing is stale; a changed image is captioned, encoded and trained on again.
    assert sum(stale(recipe, cache).values()) == 0
    Image.new("RGB", (64, 64), COLOURS["blue"]).save(tmp_path / "data" / "2.png")
    assert stale(recipe, cache) == {"resize": 1, "caption-colour": 1, "encode-text": 1, "encode-image": 1,
                                    "train": 1}  # fmt: skip
    # --until encode-text plans the producer and what it reads, nothing for the VAE or training.
    graph, _ = graph_of(recipe, cache, until="encode-text")
    assert set(graph.kinds) == {"resize", "caption-colour", "encode-text"}


def test_a_failed_caption_drops_its_image_from_training(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model, ["red", "green", "blue"])
    ds = dataclasses.replace(recipe.datasets[0], on_error="skip")
    recipe = dataclasses.replace(recipe, datasets=(ds,))
    (tmp_path / "data" / "1.png").write_bytes(b"not an image")  # resize fails: no caption, no latents
    graph, data = graph_of(recipe, tmp_path / "cache")
    store = Store(tmp_path / "cache")
    the_plan, report = build(graph, store, data, progress=False)
    assert report.kinds["resize"].skipped == 1 and report.kinds["caption-colour"].skipped == 1
    assert report.kinds["train"].ran == 1
    train = json.loads((store.path(the_plan.by_id()[("train", "train")].key) / "train.json").read_text())
    assert train["skipped_items"] == ["d/1.png"]
