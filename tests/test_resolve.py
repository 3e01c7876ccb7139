"""Model resolution: folders, presets, the local Hugging Face cache (a fake one), specs, `tiny`, identity files.

Downloads are tested against a real hub server in test_download.py; here the Hub is unreachable (conftest).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import types
from pathlib import Path

import pytest

from zrecipe.errors import ModelError
from zrecipe.models.z_image.hub import hf_hub_cache, pipeline_files, snapshot_problems
from zrecipe.models.z_image.resolve import (
    ModelSpec,
    model_cache_dir,
    model_weight_files,
    no_downloads,
    resolve_model,
)


def make_model(folder: Path) -> Path:
    """A minimal but complete diffusers-layout folder (what resolution and identity look at)."""
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        (folder / name).mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "ZImagePipeline",
                "transformer": ["diffusers", "ZImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "Qwen3Model"],
                "tokenizer": ["transformers", "Qwen2Tokenizer"],
                "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                "safety_checker": [None, None],
            }
        )
    )
    for name in ("transformer", "vae", "text_encoder"):
        (folder / name / "config.json").write_text("{}")
    (folder / "transformer" / "b.safetensors").write_bytes(b"b")
    (folder / "transformer" / "a.safetensors").write_bytes(b"a")
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"v")
    (folder / "text_encoder" / "model.safetensors").write_bytes(b"t")
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    return folder


def snapshot(hub: Path, repo_id: str, revision: str, mtime: int | None = None) -> Path:
    folder = make_model(hub / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision)
    if mtime is not None:
        os.utime(folder, (mtime, mtime))
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    return tmp_path / "hf" / "hub"


def test_existing_folder_resolves_to_itself(tmp_path):
    folder = make_model(tmp_path / "m")
    assert resolve_model(folder) == folder.resolve()
    assert resolve_model(str(folder)) == folder.resolve()


def test_folder_without_model_layout_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers-layout model folder"):
        resolve_model(tmp_path / "empty")


def test_an_mflux_save_folder_alone_asks_for_its_base(tmp_path):
    folder = tmp_path / "saved"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "0.safetensors").write_bytes(b"x")
    index = {"metadata": {"quantization_level": "4", "mflux_version": "0.24.0"}, "weight_map": {}}
    (folder / "transformer" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelError, match=r"mflux-save folder.*base: z-image, mflux_save"):
        resolve_model(folder)


def test_cache_location_follows_the_environment(tmp_path, monkeypatch, hub):
    assert hf_hub_cache() == hub
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "explicit"))
    assert hf_hub_cache() == tmp_path / "explicit"


def test_preset_uses_the_snapshot_that_refs_main_names(hub):
    snapshot(hub, "Tongyi-MAI/Z-Image", "old", mtime=2_000_000_000)  # newer mtime, but not refs/main
    wanted = snapshot(hub, "Tongyi-MAI/Z-Image", "abc123", mtime=1_000_000_000)
    refs = hub / "models--Tongyi-MAI--Z-Image" / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123\n")
    assert resolve_model("z-image") == wanted
    assert resolve_model("Tongyi-MAI/Z-Image") == wanted


def test_without_refs_the_newest_snapshot_wins(hub):
    snapshot(hub, "Tongyi-MAI/Z-Image-Turbo", "first", mtime=1_000_000_000)
    newest = snapshot(hub, "Tongyi-MAI/Z-Image-Turbo", "second", mtime=1_500_000_000)
    assert resolve_model("z-image-turbo") == newest


def test_an_incomplete_snapshot_is_never_resolved(hub, monkeypatch):
    """An interrupted download leaves a snapshot missing files: offline it is an error naming them."""
    folder = snapshot(hub, "org/partial", "abc")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "shard-1.safetensors", "y": "shard-2.safetensors"}})
    )
    (folder / "transformer" / "shard-1.safetensors").write_bytes(b"1")
    assert snapshot_problems(folder) == ["transformer/shard-2.safetensors"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"incomplete \(missing transformer/shard-2.safetensors\)"):
        resolve_model("org/partial")
    (folder / "transformer" / "shard-2.safetensors").write_bytes(b"2")
    assert resolve_model("org/partial") == folder


def test_offline_with_nothing_cached_says_how_to_download(hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError) as info:
        resolve_model("some-org/some-model")
    message = str(info.value)
    assert "some-org/some-model" in message and "not in the local Hugging Face cache" in message
    assert str(hub / "models--some-org--some-model") in message
    assert "zrecipe download some-org/some-model" in message


def test_planning_never_downloads(hub):
    """Under no_downloads a missing model is an error with the fix (the Hub here is unreachable)."""
    with no_downloads(), pytest.raises(ModelError) as info:
        resolve_model("z-image")
    assert "not in the local Hugging Face cache" in str(info.value)
    assert "zrecipe download z-image" in str(info.value)
    assert "Planning never downloads" in str(info.value)


def test_unreachable_hub_is_a_clear_error(hub):
    with pytest.raises(ModelError, match=r"org/model: cannot reach http://127\.0\.0\.1:\d+ to download it"):
        resolve_model("org/model")


def test_unrecognised_spec_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not a preset"):
        resolve_model(str(tmp_path / "does" / "not" / "exist"))


def test_spec_strings_parse_and_print_canonically(tmp_path):
    spec = ModelSpec.parse("z-image,vae=ae.safetensors,transformer=/m/z.safetensors", root=tmp_path)
    assert spec.base == "z-image"
    assert spec.files == (("transformer", "/m/z.safetensors"), ("vae", str(tmp_path / "ae.safetensors")))
    assert str(spec) == f"z-image,transformer=/m/z.safetensors,vae={tmp_path / 'ae.safetensors'}"
    assert ModelSpec.parse(str(spec)) == spec
    assert ModelSpec.parse("org/name") == ModelSpec("org/name")
    saved = ModelSpec.parse("z-image-turbo,mflux_save=/s,vae=/ae.safetensors")
    assert saved.sources == {
        "transformer": Path("/s/transformer"),
        "vae": Path("/ae.safetensors"),
        "text_encoder": Path("/s/text_encoder"),
    }
    with pytest.raises(ModelError, match="given twice"):
        ModelSpec.parse("z-image,vae=/a,vae=/b")


def test_tiny_is_created_once_in_the_model_cache_whatever_the_store(tmp_path, monkeypatch):
    calls = []

    def create_tiny_model(path, seed=0):
        calls.append((Path(path), seed))
        make_model(Path(path))
        return Path(path)

    fake = types.ModuleType("zrecipe.models.z_image.tiny")
    fake.create_tiny_model = create_tiny_model
    fake.TINY_VERSION = 7
    monkeypatch.setitem(sys.modules, "zrecipe.models.z_image.tiny", fake)
    monkeypatch.setenv("ZRECIPE_MODEL_CACHE", str(tmp_path / "models"))
    expected = tmp_path / "models" / "tiny-v7"
    assert resolve_model("tiny", cache_dir=tmp_path / "store-a") == expected
    assert resolve_model("tiny", cache_dir=tmp_path / "store-b") == expected
    assert resolve_model("tiny") == expected
    assert calls == [(expected, 0)]
    assert (expected / "model_index.json").is_file()


def test_model_cache_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("ZRECIPE_MODEL_CACHE")
    monkeypatch.setenv("ZRECIPE_CACHE", str(tmp_path / "zc"))
    assert model_cache_dir() == tmp_path / "zc" / "models"
    monkeypatch.delenv("ZRECIPE_CACHE")
    assert model_cache_dir() == Path.home() / ".cache" / "zrecipe" / "models"


def test_concurrent_tiny_creation_gives_one_complete_model(tmp_path, monkeypatch):
    """Four threads create the real tiny model at once: one rename wins, every caller gets the folder."""
    monkeypatch.setenv("ZRECIPE_MODEL_CACHE", str(tmp_path / "models"))
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model("tiny"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    target = tmp_path / "models" / "tiny-v1"
    assert results == [target] * 4
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-v1"]  # no temporary left
    assert (target / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()


def test_pipeline_files_take_only_what_the_pipeline_loads():
    listing = [
        ".gitattributes",
        "README.md",
        "assets/teaser.jpg",
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/generation_config.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "text_encoder/pytorch_model.bin",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.fp16.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.bin",
        "vae/diffusion_pytorch_model.safetensors",
        "vae/extra/thing.safetensors",
    ]
    assert pipeline_files(listing) == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/generation_config.json",
        "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model-00002-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    configs_only = pipeline_files(listing, weights=["vae"])
    assert "transformer/diffusion_pytorch_model.safetensors" not in configs_only
    assert (
        "transformer/config.json" in configs_only
        and "vae/diffusion_pytorch_model.safetensors" in configs_only
    )


def test_model_weight_files_are_sorted_and_limited_to_components(tmp_path):
    folder = make_model(tmp_path / "m")
    (folder / "README.md").write_text("docs")
    (folder / "other_checkpoint").mkdir()
    (folder / "other_checkpoint" / "x.safetensors").write_bytes(b"x")
    (folder / "transformer" / ".cache").mkdir()
    (folder / "transformer" / ".cache" / "y.json").write_text("{}")
    names = [f.relative_to(folder).as_posix() for f in model_weight_files(folder)]
    assert names == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.safetensors",
        "tokenizer/tokenizer.json",
        "transformer/a.safetensors",
        "transformer/b.safetensors",
        "transformer/config.json",
        "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors",
    ]


def test_model_weight_files_of_a_bare_component_folder(tmp_path):
    folder = make_model(tmp_path / "m") / "transformer"
    assert [f.name for f in model_weight_files(folder)] == ["a.safetensors", "b.safetensors", "config.json"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ModelError, match="no weight or config files"):
        model_weight_files(tmp_path / "none")
