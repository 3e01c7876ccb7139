"""Model resolution: folders, presets, the local Hugging Face cache (a fake one), `tiny`, identity files."""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import pytest

from zrecipe.errors import ModelError
from zrecipe.models.z_image.resolve import hf_hub_cache, model_weight_files, resolve_model


def make_model(folder: Path) -> Path:
    """A minimal diffusers-layout folder (only what resolution and identity look at)."""
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "ZImagePipeline",
                "transformer": ["diffusers", "ZImageTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "safety_checker": [None, None],
            }
        )
    )
    (folder / "transformer" / "config.json").write_text("{}")
    (folder / "transformer" / "b.safetensors").write_bytes(b"b")
    (folder / "transformer" / "a.safetensors").write_bytes(b"a")
    (folder / "vae" / "config.json").write_text("{}")
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
    return tmp_path / "hf" / "hub"


def test_existing_folder_resolves_to_itself(tmp_path):
    folder = make_model(tmp_path / "m")
    assert resolve_model(folder) == folder.resolve()
    assert resolve_model(str(folder)) == folder.resolve()


def test_folder_without_model_layout_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a diffusers-layout model folder"):
        resolve_model(tmp_path / "empty")


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


def test_missing_repo_says_where_it_looked_and_how_to_download(hub):
    with pytest.raises(ModelError) as info:
        resolve_model("some-org/some-model")
    message = str(info.value)
    assert "model some-org/some-model not found locally" in message
    assert str(hub / "models--some-org--some-model") in message
    assert "huggingface-cli download some-org/some-model" in message


def test_unrecognised_spec_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="not a preset"):
        resolve_model(str(tmp_path / "does" / "not" / "exist"))


def test_tiny_is_created_once_in_the_cache(tmp_path, monkeypatch):
    calls = []

    def create_tiny_model(path, seed=0):
        calls.append((Path(path), seed))
        make_model(Path(path))
        return Path(path)

    fake = types.ModuleType("zrecipe.models.z_image.tiny")
    fake.create_tiny_model = create_tiny_model
    fake.TINY_VERSION = 7
    monkeypatch.setitem(sys.modules, "zrecipe.models.z_image.tiny", fake)
    expected = tmp_path / "cache" / "models" / "tiny-v7"
    assert resolve_model("tiny", cache_dir=tmp_path / "cache") == expected
    assert resolve_model("tiny", cache_dir=tmp_path / "cache") == expected
    assert calls == [(expected, 0)]
    assert (expected / "model_index.json").is_file()


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
        "transformer/a.safetensors",
        "transformer/b.safetensors",
        "transformer/config.json",
        "vae/config.json",
    ]


def test_model_weight_files_of_a_bare_component_folder(tmp_path):
    folder = make_model(tmp_path / "m") / "transformer"
    assert [f.name for f in model_weight_files(folder)] == ["a.safetensors", "b.safetensors", "config.json"]
    (tmp_path / "none").mkdir()
    with pytest.raises(ModelError, match="no weight or config files"):
        model_weight_files(tmp_path / "none")
