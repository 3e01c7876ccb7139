"""Z-Image-Turbo LoRAs: an assistant LoRA fused into the base for training and absent from the adapter,
its exports and samples; its content (not its path) in the train key; a Hub assistant downloaded by the
build, never by the plan; bit-exact resume over it; the tiny Turbo recipe built end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.models.z_image.transformer import load_transformer

REPO = Path(__file__).resolve().parent.parent
TINY_ASSISTANT = REPO / "recipes" / "data" / "tiny_assistant.safetensors"
ASSISTED = [f"layers.{i}.{t}" for i in (0, 1) for t in ("attention.to_q", "attention.to_k", "attention.to_v",
            "attention.to_out.0", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]  # fmt: skip
SHAPES = {"attention.to_q": (64, 64), "attention.to_k": (64, 64), "attention.to_v": (64, 64),
          "attention.to_out.0": (64, 64), "feed_forward.w1": (170, 64), "feed_forward.w2": (64, 170),
          "feed_forward.w3": (170, 64)}  # fmt: skip


def tiny_assistant_tensors(seed: int = 0, rank: int = 4) -> dict[str, np.ndarray]:
    """A seeded random rank-4 LoRA over the tiny model's attention and feed-forward layers, in ai-toolkit's
    / ComfyUI's naming (`diffusion_model.<path>.lora_A.weight`), strong enough to change every output."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for path in ASSISTED:
        out_dim, in_dim = SHAPES[path.split(".", 2)[2]]
        tensors[f"diffusion_model.{path}.lora_A.weight"] = rng.normal(0, 0.3, (rank, in_dim)).astype(
            np.float32
        )
        tensors[f"diffusion_model.{path}.lora_B.weight"] = rng.normal(0, 0.3, (out_dim, rank)).astype(
            np.float32
        )
    return tensors


def write_tiny_assistant(path: str | Path, seed: int = 0) -> Path:
    """Write `tiny_assistant_tensors(seed)` (recipes/data/tiny_assistant.safetensors is seed 0)."""
    mx.save_safetensors(str(path), {k: mx.array(v) for k, v in tiny_assistant_tensors(seed).items()})
    return Path(path)


def test_the_shipped_tiny_assistant_is_the_seeded_one():
    stored = mx.load(str(TINY_ASSISTANT))
    expected = tiny_assistant_tensors(0)
    assert sorted(stored) == sorted(expected)
    assert all(np.array_equal(np.array(stored[k]), v) for k, v in expected.items())


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("turbo") / "tiny")


def identity_of(path: Path) -> str:
    import xxhash

    return "lora:" + xxhash.xxh128_hexdigest(path.read_bytes())


def assistant_delta(path: str) -> np.ndarray:
    t = tiny_assistant_tensors(0)
    return (
        t[f"diffusion_model.{path}.lora_B.weight"].astype(np.float64)
        @ t[f"diffusion_model.{path}.lora_A.weight"]
    )


def params_for(steps: int, checkpoint_frequency: int = 1000) -> dict:
    """Train params as the graph makes them (JSON), for session.load_for_training."""
    from zrecipe.recipe import Recipe
    from zrecipe.training.settings import train_params

    recipe = Recipe.from_dict({
        "model": "tiny", "seed": 4, "datasets": [], "training_loop": {"max_steps": steps, "batch_size": 2,
        "gradient_accumulation_steps": 2, "sigma_sampling": "uniform"}, "optimizer": {"learning_rate": 1e-2},
        "lora": {"rank": 4, "targets": [{"blocks": "layers", "layer_types": ["attention.to_q", "feed_forward.w2"]}]},
        "save": {"checkpoint_frequency": checkpoint_frequency},
    })  # fmt: skip
    return json.loads(json.dumps(train_params(recipe)))


def train_over_assistant(tiny_path, out, steps=4, resume_from=None, assistant=True):
    from test_training import make_examples

    from zrecipe.models.z_image.tiny import TEXT_HIDDEN
    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.training.checkpointer import RunInfo
    from zrecipe.training.loop import train
    from zrecipe.training.session import load_for_training

    examples = make_examples(TEXT_HIDDEN, n=4, dropout=0.3)
    spec = (str(TINY_ASSISTANT), identity_of(TINY_ASSISTANT)) if assistant else None
    model, settings = load_for_training(params_for(steps, 2), tiny_path, examples, lambda _m: None, spec)
    objective = FlowMatchingObjective.from_settings(settings, np.zeros((2, TEXT_HIDDEN), np.float32))
    extra = {} if resume_from is None else {"resume_from": resume_from}
    result = train(model, examples, objective, settings, out, run=RunInfo(model_identity="tiny+assistant"),
                   callbacks=[], **extra)  # fmt: skip
    return model, result


def test_the_exported_lora_is_the_trained_adapter_and_applies_without_the_assistant(tiny_path, tmp_path):
    from zrecipe.export.apply import apply_loras
    from zrecipe.export.lora_formats import read_lora
    from zrecipe.export.sources import run_export
    from zrecipe.lora.layers import LoRALinear

    clean = load_transformer(tiny_path, dtype="float32")
    model, result = train_over_assistant(tiny_path, tmp_path / "run")
    modules, bases = dict(model.named_modules()), dict(clean.named_modules())
    # training ran over W + ΔW_assistant: the trained layers wrap the fused weights, the others are fused
    for path in ASSISTED:
        layer = modules[path]
        weight = np.array((layer.base_layer() if isinstance(layer, LoRALinear) else layer).weight, np.float64)
        expected = np.array(bases[path].weight, np.float64) + assistant_delta(path)
        assert np.abs(weight - expected).max() < 1e-5, path
    trained = {p: m for p, m in modules.items() if isinstance(m, LoRALinear)}
    assert sorted(trained) == [
        f"layers.{i}.{t}" for i in (0, 1) for t in ("attention.to_q", "feed_forward.w2")
    ]
    # the adapter file and an export hold exactly the trained factors, nothing of the assistant
    exported = tmp_path / "lora.safetensors"
    run_export(result.final_path, ["mflux"], output=exported, dtype="float32", model=str(tiny_path))
    for source in (result.final_path, exported):
        lora = read_lora(source)
        assert sorted(lora.deltas) == sorted(trained)
        for path, delta in lora.deltas.items():
            assert np.array_equal(np.array(delta.A), np.array(trained[path].lora_a).T), (source, path)
            assert np.array_equal(
                np.array(delta.B) * delta.scale, np.array(trained[path].lora_b).T * trained[path].scale
            )
    # applied to the clean base, the export is base + ΔW_trained: the assistant is gone
    apply_loras(clean, [exported], fuse=True)
    applied = dict(clean.named_modules())
    base = dict(load_transformer(tiny_path, dtype="float32").named_modules())
    for path, layer in trained.items():
        delta = np.array(layer.to_delta().weight_delta(), np.float64)
        got = np.array(applied[path].weight, np.float64)
        assert np.abs(got - (np.array(base[path].weight, np.float64) + delta)).max() < 1e-5, path
        assert np.abs(got - np.array(base[path].weight) - delta - assistant_delta(path)).max() > 0.1
    untouched = [p for p in ASSISTED if p not in trained]
    assert all(np.array_equal(np.array(applied[p].weight), np.array(base[p].weight)) for p in untouched)


def test_training_over_the_assistant_resumes_bit_exactly(tiny_path, tmp_path):
    from test_training import _assert_identical

    _, straight = train_over_assistant(tiny_path, tmp_path / "straight")
    half = tmp_path / "straight" / "checkpoints" / "0000002_checkpoint.zip"
    _, resumed = train_over_assistant(tiny_path, tmp_path / "resumed", resume_from=half)
    _assert_identical(mx.load(str(straight.final_path)), mx.load(str(resumed.final_path)))
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    _, bare = train_over_assistant(tiny_path, tmp_path / "bare", assistant=False)
    assert bare.history[0]["loss"] != straight.history[0]["loss"]  # the assistant was in the forward pass


def test_a_changed_assistant_file_is_refused_when_fusing(tiny_path, tmp_path):
    from zrecipe.errors import ModelError
    from zrecipe.training.assistant import fuse_assistant

    copy = tmp_path / "assistant.safetensors"
    shutil.copy(TINY_ASSISTANT, copy)
    planned = identity_of(copy)
    write_tiny_assistant(copy, seed=1)
    with pytest.raises(ModelError, match="changed since the build was planned"):
        fuse_assistant(load_transformer(tiny_path, dtype="float32"), copy, planned)


# --- in the plan and the build ------------------------------------------------------------------------


def turbo_project(tmp_path: Path, assistant: str | None = None) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    if not (tmp_path / "data" / "tiny").exists():
        (tmp_path / "data" / "tiny").symlink_to(REPO / "recipes" / "data" / "tiny")
    shutil.copy(TINY_ASSISTANT, tmp_path / "data" / "tiny_assistant.safetensors")
    text = (REPO / "recipes" / "turbo_tiny.yaml").read_text()
    if assistant is not None:
        text = text.replace("data/tiny_assistant.safetensors", assistant)
    (tmp_path / "turbo.yaml").write_text(text + f"cache: {tmp_path / 'cache'}\n")
    return tmp_path / "turbo.yaml"


def plan_nodes(recipe: Path):
    from zrecipe.pipeline import plan_recipe
    from zrecipe.recipe import load_recipe

    return plan_recipe(load_recipe(recipe)).plan


def test_the_assistant_content_enters_the_train_key_and_its_path_does_not(tmp_path):
    recipe = turbo_project(tmp_path)
    (train,) = plan_nodes(recipe).nodes["train"]
    assert train.node.inputs[1] == identity_of(TINY_ASSISTANT)
    assert "assistant_lora" not in train.node.params["training_loop"]
    shutil.copy(TINY_ASSISTANT, tmp_path / "moved.safetensors")
    moved = turbo_project(tmp_path, "moved.safetensors")
    assert plan_nodes(moved).nodes["train"][0].key == train.key  # same bytes elsewhere: same key
    write_tiny_assistant(tmp_path / "moved.safetensors", seed=2)
    changed = plan_nodes(moved).nodes["train"][0]
    assert changed.key != train.key and changed.node.inputs[1] != train.node.inputs[1]
    without = (
        (REPO / "recipes" / "turbo_tiny.yaml")
        .read_text()
        .replace("  assistant_lora: data/tiny_assistant.safetensors\n", "")
    )
    (tmp_path / "plain.yaml").write_text(without)
    plain = plan_nodes(tmp_path / "plain.yaml").nodes["train"][0]
    assert plain.key != train.key and not any(str(i).startswith("lora:") for i in plain.node.inputs)


def test_a_hub_assistant_is_downloaded_by_the_build_and_never_by_the_plan(tmp_path, monkeypatch):
    from hub_server import FakeHub

    from zrecipe.errors import ModelError
    from zrecipe.pipeline import build_graph, plan_recipe
    from zrecipe.recipe import load_recipe

    with FakeHub() as hub:
        files = {"README.md": b"adapter", "v1/adapter.safetensors": TINY_ASSISTANT.read_bytes()}
        hub.add_repo("ostris/tiny_adapter", files)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        recipe = load_recipe(turbo_project(tmp_path, "ostris/tiny_adapter:v1/adapter.safetensors"))
        with pytest.raises(
            ModelError, match="not in the local Hugging Face cache yet. `zrecipe build` downloads"
        ):
            plan_recipe(recipe)
        assert hub.requests == []  # the plan asked nothing
        _, data = build_graph(recipe, tmp_path / "cache")  # what a build does first
        assert Path(data.assistant_lora).read_bytes() == TINY_ASSISTANT.read_bytes()
        fetched = [r for r in hub.requests if r[0] == "GET" and r[3] in (200, 206)]
        assert [r[1].rsplit("/", 2)[-2:] for r in fetched] == [["v1", "adapter.safetensors"]]
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now cached: planning needs no network
        (train,) = plan_recipe(recipe).plan.nodes["train"]
        assert train.node.inputs[1] == identity_of(TINY_ASSISTANT)
        # `org/repo` alone: the repo's only .safetensors, found by listing the repo (a fresh cache)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub2"))
        single = load_recipe(turbo_project(tmp_path, "ostris/tiny_adapter"))
        found = Path(build_graph(single, tmp_path / "cache")[1].assistant_lora)
        assert found.name == "adapter.safetensors" and found.read_bytes() == TINY_ASSISTANT.read_bytes()
        hub.add_repo("ostris/two", {"a.safetensors": b"1", "b.safetensors": b"2"})
        with pytest.raises(
            ModelError,
            match=r"ostris/two holds 2 .safetensors files \(a.safetensors, b.safetensors\); name one",
        ):
            build_graph(load_recipe(turbo_project(tmp_path, "ostris/two")), tmp_path / "cache")


def test_the_tiny_turbo_recipe_builds_and_its_samples_and_export_leave_the_assistant_out(tmp_path, capsys):
    from zrecipe.cli.main import app, run_app
    from zrecipe.export.lora_formats import read_lora
    from zrecipe.generation.generate import GenerationSettings, generate
    from zrecipe.models.z_image.resolve import resolve_model

    recipe = turbo_project(tmp_path)
    assert run_app(app, ["build", str(recipe), "--quiet"]) == 0
    out = tmp_path / "output" / "turbo"
    adapter = read_lora(out / "adapter.safetensors")
    exported = read_lora(out / "exports" / "turbo_mflux.safetensors")
    assert (
        sorted(exported.deltas)
        == sorted(adapter.deltas)
        == sorted(
            f"layers.{i}.{t}" for i in (0, 1) for t in ("attention.to_q", "attention.to_v", "feed_forward.w1")
        )
    )
    for path, delta in adapter.deltas.items():
        assert np.array_equal(np.array(delta.weight_delta()), np.array(exported.deltas[path].weight_delta()))
    # the sample is base + trained LoRA: generate() with the export alone renders it, with the assistant not
    from PIL import Image

    (sample,) = [p for p in (out / "samples").rglob("*.png") if "contact" not in p.name]
    pixels = np.asarray(Image.open(sample).convert("RGB"), np.float64)
    settings = GenerationSettings(prompt="zshapes, a red circle on a orange background", guidance=0.0, steps=9,
                                  width=64, height=64, seeds=(5,))  # fmt: skip
    model = resolve_model("tiny")
    mine = np.asarray(
        generate(model, settings, [out / "exports" / "turbo_mflux.safetensors"])[0].image, np.float64
    )
    with_assistant = np.asarray(generate(model, settings, [out / "exports" / "turbo_mflux.safetensors",
                                                           TINY_ASSISTANT])[0].image, np.float64)  # fmt: skip
    assert np.abs(mine - pixels).mean() < 0.5
    assert np.abs(with_assistant - pixels).mean() > 5 * max(np.abs(mine - pixels).mean(), 0.1)
    # another assistant file: explain names the train step's changed input
    write_tiny_assistant(tmp_path / "data" / "tiny_assistant.safetensors", seed=2)
    capsys.readouterr()
    assert run_app(app, ["explain", str(recipe), "train"]) == 0
    assert f"changed input: #1 {identity_of(TINY_ASSISTANT)[:12]} → lora:" in capsys.readouterr().out
