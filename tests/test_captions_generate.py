"""Generated captions as build outputs (`captions: {generate: ...}`) on the tiny Z-Image and `tiny-vlm`:
what the caption keys cover, incrementality (new images are the only ones captioned), precedence with
human captions and hand edits (plan reasons), determinism across runs and ranks, bad input, `zrecipe
caption`, and the recipe keys. Caption quality is not the point: tiny-vlm has random weights."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zrecipe.cli.main import app, run_app
from zrecipe.engine import Record, Ref, StatCache, Store, hash_file, plan
from zrecipe.errors import ModelError, RecipeError, StepFailed
from zrecipe.pipeline import build_recipe
from zrecipe.pipeline.captions import CAPTION_FILE, MARKS_FILE, produced_item, text_item, write_sidecars
from zrecipe.pipeline.graph import build_graph
from zrecipe.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
needs_vlm = pytest.mark.skipif(
    importlib.util.find_spec("mlx_vlm") is None, reason="the captions extra (mlx-vlm) is not installed"
)

RECIPE = """\
model: {model}
seed: 1
cache: cache
datasets:
  - name: d
    path: data
    resolution: {resolution}
    trigger: {trigger}
    on_error: {on_error}
    captions:
      generate: {{model: {vlm}, prompt: "{prompt}", max_tokens: 6}}
      prefer: {prefer}
training_loop: {{max_steps: 2, batch_size: 2}}
lora: {{rank: 2, targets: [{{blocks: layers, layer_types: [attention.to_q]}}]}}
save: {{checkpoint_frequency: 2, output_path: out}}
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("captions") / "tiny")


def add_images(root: Path, indexes) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    for i in indexes:
        rng = np.random.RandomState(i)
        pixels = np.kron(rng.rand(4, 4, 3), np.ones((12, 12, 1)))  # 48x48 blocks: distinct images
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / "data" / f"{i}.png")


def project(root: Path, model: Path, images=range(3), **values) -> Path:
    add_images(root, images)
    settings = {"model": model, "resolution": 64, "trigger": "zc", "on_error": "fail", "vlm": "tiny-vlm",
                "prompt": "Describe this image.", "prefer": "sidecar", **values}  # fmt: skip
    (root / "recipe.yaml").write_text(RECIPE.format(**settings))
    return root / "recipe.yaml"


def graph_and_plan(recipe_path: Path, until=None):
    recipe = load_recipe(recipe_path)
    cache = recipe_path.parent / "cache"
    graph, data = build_graph(recipe, cache, until=until)
    store = Store(cache)
    return graph, data, plan(graph, store, Record.load(store.root, graph.graph_id))


def keys(recipe_path: Path, kind: str) -> dict[str, str]:
    _, _, p = graph_and_plan(recipe_path)
    return {n.node.item: n.key for n in p.nodes.get(kind, [])}


def stale(recipe_path: Path) -> dict[str, int]:
    _, _, p = graph_and_plan(recipe_path)
    return {k: len(p.stale(k)) for k in p.order if p.stale(k)}


def build(recipe_path: Path, until=None):
    return build_recipe(load_recipe(recipe_path), until=until, progress=False)


def ran(outcome) -> dict[str, tuple[int, int]]:
    return {k: (r.ran, r.cached) for k, r in outcome.report.kinds.items()}


# --- keys -------------------------------------------------------------------------------------------------


def test_the_caption_key_covers_the_image_model_prompt_and_decoding(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model)
    graph, _, _ = graph_and_plan(recipe)
    node = graph.node("caption", "d/1.png")
    assert node.inputs == [hash_file(tmp_path / "data" / "1.png"), "tiny-vlm-v1"]
    assert node.params == {"prompt": "Describe this image.", "max_tokens": 6, "repetition_penalty": None,
                           "decoding": "greedy"}  # fmt: skip
    text = graph.node("encode-text", produced_item(Ref("caption", "d/1.png")))
    assert text.inputs[0] == Ref("caption", "d/1.png")
    assert text.params == {"max_length": 512, "trigger": "zc", "template": None}
    captions = keys(recipe, "caption")
    produced = {item: key for item, key in keys(recipe, "encode-text").items() if item.startswith("caption/")}
    # A new training resolution re-resizes and retrains, never re-captions (the key is the source image).
    project(tmp_path, tiny_model, resolution=128)
    assert keys(recipe, "caption") == captions
    # A new trigger re-encodes every text and retrains, it never re-captions.
    project(tmp_path, tiny_model, trigger="zz")
    assert keys(recipe, "caption") == captions
    assert set(keys(recipe, "encode-text").values()).isdisjoint(produced.values())
    # A new prompt recaptions everything, and `explain` / the plan says why.
    project(tmp_path, tiny_model, prompt="Name the colours.")
    assert set(keys(recipe, "caption").values()).isdisjoint(captions.values())


@needs_vlm
def test_a_changed_prompt_is_the_reason_every_caption_is_stale(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model)
    build(recipe, until="caption")
    project(tmp_path, tiny_model, prompt="Name the colours.")
    _, _, p = graph_and_plan(recipe, until="caption")
    assert [n.reason for n in p.stale("caption")] == [
        'changed parameter: prompt "Describe this image." → "Name the colours."'
    ] * 3


# --- incremental builds, determinism ----------------------------------------------------------------------


@needs_vlm
def test_adding_images_captions_only_the_new_ones(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model, images=range(3))
    first = build(recipe)
    assert ran(first)["caption"] == (3, 0) and ran(first)["train"] == (1, 0)
    add_images(tmp_path, [3, 4])
    assert stale(recipe) == {"resize": 2, "caption": 2, "encode-image": 2, "encode-text": 2, "train": 1}
    second = build(recipe)
    assert ran(second)["caption"] == (2, 3)
    assert ran(second)["encode-text"][0] == 2 and ran(second)["train"] == (1, 0)
    assert stale(recipe) == {}
    rows = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [(r["image"], r["origin"]) for r in rows] == [(f"{i}.png", "generated") for i in range(5)]
    assert all(r["caption"].startswith("zc, ") and r["caption"] == "zc, " + r["generated"] for r in rows)


@needs_vlm
def test_captions_are_the_same_bytes_in_another_store(tmp_path, tiny_model):
    entries = []
    for name in ("one", "two"):
        recipe = project(tmp_path / name, tiny_model)
        outcome = build(recipe, until="caption")
        store = Store(outcome.cache_dir)
        entries.append(
            {
                p.node.item: (p.key, (store.path(p.key) / CAPTION_FILE).read_bytes())
                for p in outcome.plan.nodes["caption"]
            }
        )
    assert entries[0] == entries[1] and len(entries[0]) == 3
    assert all(text for _, text in entries[0].values())


@pytest.mark.distributed
@needs_vlm
@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not installed")
def test_two_ranks_caption_like_one(tmp_path, tiny_model):
    one = project(tmp_path / "one", tiny_model, images=range(5))
    two = project(tmp_path / "two", tiny_model, images=range(5))
    build(one, until="caption")
    proc = subprocess.run([sys.executable, "-m", "zrecipe.cli.main", "build", str(two), "-n", "2",
                           "--until", "caption"], capture_output=True, text=True, timeout=400)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caption: 5 items on 2 ranks" in proc.stderr  # sharded: each rank captioned its share

    def entries(recipe):
        _, _, p = graph_and_plan(recipe, until="caption")
        assert p.stale_count == 0
        store = Store(recipe.parent / "cache")
        return {n.node.item: (n.key, store.manifest(n.key)) for n in p.nodes["caption"]}

    assert entries(one) == entries(two)  # same keys, same file hashes


# --- human captions, precedence and edits ------------------------------------------------------------------


@needs_vlm
def test_human_captions_precedence_and_edits(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model, images=range(4))
    (tmp_path / "data" / "0.txt").write_text("a hand-written caption\n")
    graph, data, _ = graph_and_plan(recipe)
    assert sorted(graph.nodes["caption"]) == ["d/1.png", "d/2.png", "d/3.png"]  # the sidecar wins for 0
    assert data.examples[0].text == text_item("zc, a hand-written caption")
    build(recipe)

    # Writing the generated captions as sidecars changes no key: an unedited sidecar is the model's text.
    assert run_app(app, ["caption", str(recipe), "-q", "--write-sidecars"]) == 0
    assert sorted(p.name for p in (tmp_path / "data").glob("*.txt")) == ["0.txt", "1.txt", "2.txt", "3.txt"]
    assert (tmp_path / "data" / "0.txt").read_text() == "a hand-written caption\n"  # never overwritten
    assert set(json.loads((tmp_path / "data" / MARKS_FILE).read_text())["sidecars"]) == {
        "1.txt",
        "2.txt",
        "3.txt",
    }
    assert stale(recipe) == {}

    # Editing one re-encodes that caption and retrains; nothing is recaptioned.
    (tmp_path / "data" / "2.txt").write_text("a red and green mosaic\n")
    _, _, p = graph_and_plan(recipe)
    assert {k: len(p.stale(k)) for k in p.order if p.stale(k)} == {"encode-text": 1, "train": 1}
    (edited,) = p.stale("encode-text")
    assert edited.node.item == text_item("zc, a red and green mosaic") and edited.reason == "new input"
    (train,) = p.stale("train")
    assert train.category == "changed parameter" and "examples" in train.reason
    assert {k: n for k, n in p.removed.items() if n} == {"caption": 1, "encode-text": 1}  # image 2 left them
    build(recipe)

    # prefer: generated — a person's own sidecar loses, an edited written one still wins.
    project(tmp_path, tiny_model, images=range(4), prefer="generated")
    graph, data, p = graph_and_plan(recipe)
    assert sorted(graph.nodes["caption"]) == ["d/0.png", "d/1.png", "d/3.png"]
    assert [n.node.item for n in p.stale("caption")] == ["d/0.png"]  # captioned now, the rest are cached
    texts = {e.image: e.text for e in data.examples}
    assert texts["d/2.png"] == text_item("zc, a red and green mosaic")
    assert texts["d/0.png"] == produced_item(Ref("caption", "d/0.png"))
    # An emptied sidecar is no caption: the model's is used again (still cached).
    (tmp_path / "data" / "2.txt").write_text("  \n")
    graph, _, p = graph_and_plan(recipe)
    assert "d/2.png" in graph.nodes["caption"] and not any(
        n.node.item == "d/2.png" for n in p.stale("caption")
    )


def test_write_sidecars_never_replaces_a_persons_caption(tmp_path):
    (tmp_path / "a.txt").write_text("mine")
    written, kept = write_sidecars(tmp_path, {"a.png": "model a", "b.png": "model b"}, ".txt")
    assert (written, kept) == (["b.txt"], ["a.txt"])
    written, kept = write_sidecars(tmp_path, {"b.png": "model b, new prompt"}, ".txt")  # still ours
    assert written == ["b.txt"] and (tmp_path / "b.txt").read_text() == "model b, new prompt\n"
    (tmp_path / "b.txt").write_text("edited")
    assert write_sidecars(tmp_path, {"b.png": "model b again"}, ".txt") == ([], ["b.txt"])
    assert (tmp_path / "b.txt").read_text() == "edited"


def test_manifest_captions_mix_with_generated_ones(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model, images=range(3))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"file": "1.png", "caption": "from the manifest"}) + "\n")
    text = recipe.read_text().replace(
        "prefer: sidecar", "manifest: caps.jsonl\n      template: '{caption}, photo'"
    )
    recipe.write_text(text)
    graph, data, _ = graph_and_plan(recipe)
    assert sorted(graph.nodes["caption"]) == ["d/0.png", "d/2.png"]
    assert {e.image: e.text for e in data.examples}["d/1.png"] == text_item("zc, from the manifest, photo")
    assert (
        graph.node("encode-text", produced_item(Ref("caption", "d/0.png"))).params["template"]
        == "{caption}, photo"
    )


# --- bad input ---------------------------------------------------------------------------------------------


@needs_vlm
def test_bad_images_fail_naming_the_item_or_are_skipped(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model, images=range(3))
    Image.new("RGB", (2, 600), "red").save(tmp_path / "data" / "1.png")  # decodes, but no VLM reads it
    with pytest.raises(
        StepFailed,
        match=r"caption:d/1.png: .*data/1.png: the captioning model tiny-vlm cannot read this image",
    ) as failed:
        build(recipe, until="caption")
    assert failed.value.exit_code == 2
    project(tmp_path, tiny_model, images=range(3), on_error="skip")
    Image.new("RGB", (2, 600), "red").save(tmp_path / "data" / "1.png")
    (tmp_path / "data" / "2.png").write_bytes(b"not an image")
    outcome = build(recipe)
    kinds = outcome.report.kinds
    # 0.png was captioned by the failed build (on_error is not part of a key): kept, not redone.
    assert (kinds["caption"].ran, kinds["caption"].cached, kinds["caption"].skipped) == (0, 1, 2)
    assert kinds["train"].ran == 1
    train = outcome.plan.by_id()[("train", "train")]
    skipped = json.loads((Store(outcome.cache_dir).path(train.key) / "train.json").read_text())[
        "skipped_items"
    ]
    assert skipped == ["d/1.png", "d/2.png"]


@needs_vlm
def test_an_image_changed_after_planning_is_not_captioned_under_its_old_key(tmp_path, tiny_model):
    from zrecipe.engine import build as run

    recipe = project(tmp_path, tiny_model, images=range(2))
    graph, data = build_graph(load_recipe(recipe), tmp_path / "cache", until="caption")
    add_images(tmp_path, [5])
    (tmp_path / "data" / "5.png").replace(tmp_path / "data" / "1.png")  # new bytes under the planned name
    with pytest.raises(StepFailed, match=r"caption:d/1.png: .*1.png: the file changed during the build"):
        run(graph, Store(tmp_path / "cache"), data, progress=False)


def test_a_captioning_model_that_is_not_a_vlm_stops_the_plan(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model, vlm=str(tiny_model))  # a Z-Image pipeline folder
    with pytest.raises(ModelError, match="a diffusers pipeline, not a vision-language model"):
        graph_and_plan(recipe)


def test_without_the_extra_a_build_says_what_to_install(tmp_path, tiny_model):
    recipe = project(tmp_path, tiny_model)
    # A fresh process in which mlx_vlm cannot be imported, whether or not it is installed here.
    code = ("import sys; sys.modules['mlx_vlm'] = None; from zrecipe.cli.main import main; "
            f"main(['build', {str(recipe)!r}, '-q'])")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'zrecipe[captions]'" in proc.stderr and "Traceback" not in proc.stderr
    _, _, p = graph_and_plan(recipe)
    assert len(p.stale("caption")) == 3  # nothing was stored, nothing skipped


# --- zrecipe caption ---------------------------------------------------------------------------------------


@needs_vlm
def test_zrecipe_caption_shows_every_caption(tmp_path, tiny_model, capsys):
    recipe = project(tmp_path, tiny_model, images=range(3))
    (tmp_path / "data" / "2.txt").write_text("mine")
    assert run_app(app, ["caption", str(recipe), "-q", "--sheet", str(tmp_path / "sheet.png")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[:3]] == [["d/0.png", "generated"], ["d/1.png", "generated"],
                                                      ["d/2.png", "sidecar"]]  # fmt: skip
    assert out[2].split(None, 2)[2] == "zc, mine"
    assert "3 images: 2 generated, 1 sidecar (2 captioned now, 0 before)" in out
    assert Image.open(tmp_path / "sheet.png").size[0] > 3 * 160
    assert run_app(app, ["caption", str(recipe), "-q", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["origin"] for r in rows] == ["generated", "generated", "sidecar"] and rows[0]["tokens"] <= 6
    # Only the captions were built: no latents, no training.
    _, _, p = graph_and_plan(recipe)
    assert not p.stale("caption") and len(p.stale("encode-image")) == 3


def test_zrecipe_caption_needs_a_generate_dataset(tmp_path, capsys):
    assert run_app(app, ["caption", str(REPO / "recipes" / "tiny.yaml")]) == 2
    assert "no dataset has `captions: {generate" in capsys.readouterr().err


# --- the recipe ----------------------------------------------------------------------------------------------


def test_the_example_recipe_plans_its_captions():
    recipe = load_recipe(REPO / "recipes" / "captioned.yaml")
    (ds,) = recipe.datasets
    assert ds.captions.kind == "generate" and ds.captions.generate.model == "tiny-vlm"
    with StatCache(":memory:") as sc:
        graph, _ = build_graph(recipe, REPO / "recipes" / "cache", stat_cache=sc)
    assert len(graph.nodes["caption"]) == 4 and len(graph.nodes["resize"]) == 6  # 2 images have sidecars


def test_generate_recipe_keys_round_trip_and_are_checked(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "vlm").mkdir()
    base = "model: tiny\ntraining_loop: {max_steps: 1}\ndatasets:\n  - path: data\n    captions: "
    (tmp_path / "r.yaml").write_text(base + "{generate: {model: ./vlm, max_tokens: 10, repetition_penalty: 1.1}, "
                                     "template: 'photo, {caption}'}\n")  # fmt: skip
    recipe = load_recipe(tmp_path / "r.yaml")
    src = recipe.datasets[0].captions
    assert (src.kind, src.human, src.prefer, src.generate.model) == (
        "generate",
        "sidecar",
        "sidecar",
        str(tmp_path / "vlm"),
    )
    assert dataclasses.replace(recipe) == type(recipe).from_dict(recipe.to_dict(), source=recipe.source)
    bad = {
        "{generate: {model: tiny-vlm, max_token: 4}}": "max_token: unknown key; did you mean `max_tokens`",
        "{generate: {prompt: hi}}": "generate.model: missing",
        "{generate: {model: tiny-vl}}": "not a captioning model",
        "{generate: {model: tiny-vlm, max_tokens: 0}}": "must be at least 1",
        "{generate: {model: tiny-vlm}, prefer: human}": "must be one of sidecar, generated",
        "{generate: {model: tiny-vlm}, manifest: a.jsonl, inline: []}": "choose one source of human captions",
        "{generate: {model: tiny-vlm}, filename: true}": "filename: unknown key",
        "{generate: {model: tiny-vlm}, prefer: generated, inline: [{image: a.png, caption: x}]}": "would ignore every inline caption",
        "{generat: {model: tiny-vlm}}": "did you mean `generate`",
    }
    for value, message in bad.items():
        (tmp_path / "r.yaml").write_text(base + value + "\n")
        with pytest.raises(RecipeError, match=message):
            load_recipe(tmp_path / "r.yaml")
