"""The captioning models: `tiny-vlm` in the real Hugging Face layouts (Qwen2-VL, Qwen2.5-VL), resolving a
captioning model and refusing what is not one, its content identity, and captioning through mlx-vlm
(greedy, deterministic; bad images and empty generations as per-item errors)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from zrecipe.errors import DatasetError, ModelError
from zrecipe.models.vlm.resolve import check_vlm_folder, resolve_vlm, vlm_identity
from zrecipe.models.vlm.tiny import FAMILIES, TINY_VLM, TINY_VLM_VERSION, create_tiny_vlm

needs_vlm = pytest.mark.skipif(
    importlib.util.find_spec("mlx_vlm") is None, reason="the captions extra (mlx-vlm) is not installed"
)


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlm")
    return {family: create_tiny_vlm(root / family, family) for family in FAMILIES}


def picture(seed: int = 0, size=(96, 128)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(*size, 3) * 255).astype(np.uint8))


def test_tiny_vlm_files_are_a_function_of_the_seed(tmp_path, vlms):
    again = create_tiny_vlm(tmp_path / "again", "qwen2_vl")
    names = sorted(p.name for p in again.iterdir())
    assert names == sorted(p.name for p in vlms["qwen2_vl"].iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "chat_template.json", "generation_config.json"} <= set(names)  # fmt: skip
    for name in names:
        assert (again / name).read_bytes() == (vlms["qwen2_vl"] / name).read_bytes(), name
    other = create_tiny_vlm(tmp_path / "seed1", "qwen2_vl", seed=1)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()
    with pytest.raises(ModelError, match="not empty"):
        create_tiny_vlm(again, "qwen2_vl")


def test_tiny_vlm_config_is_the_hub_checkpoints_flat_form(vlms):
    config = json.loads((vlms["qwen2_5_vl"] / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == [
        "Qwen2_5_VLForConditionalGeneration"
    ]
    tokens = json.loads((vlms["qwen2_5_vl"] / "tokenizer.json").read_text())["added_tokens"]
    ids = {t["content"]: t["id"] for t in tokens}
    assert (
        config["image_token_id"] == ids["<|image_pad|>"]
        and config["vision_start_token_id"] == ids["<|vision_start|>"]
    )
    assert config["hidden_size"] == 64 and "text_config" not in config  # text settings at the top level


@pytest.mark.parity
@needs_vlm
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vlm_loads_in_transformers_and_mlx_vlm_alike(vlms, family):
    """The layout is the real one: transformers loads every tensor (nothing missing, unexpected or
    mis-shaped) and mlx-vlm computes the same next-token logits and the same greedy tokens from it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import mlx.core as mx
    from mlx_vlm import generate, load
    from mlx_vlm.prompt_utils import apply_chat_template
    from mlx_vlm.utils import prepare_inputs

    folder = vlms[family]
    reference, info = transformers.AutoModelForImageTextToText.from_pretrained(
        folder, output_loading_info=True
    )
    assert not any(info.values()), info
    model, processor = load(str(folder))
    prompt = apply_chat_template(processor, model.config, "Describe this image.", num_images=1)
    image = picture()
    inputs = prepare_inputs(
        processor, images=[image], prompts=[prompt], image_token_index=model.config.image_token_id
    )
    ours = model(inputs["input_ids"], inputs["pixel_values"], mask=inputs["attention_mask"],
                 image_grid_thw=inputs["image_grid_thw"]).logits[0, -1]  # fmt: skip
    ids = torch.tensor(np.array(inputs["input_ids"]))
    kwargs = {
        "input_ids": ids,
        "pixel_values": torch.tensor(np.array(inputs["pixel_values"])),
        "image_grid_thw": torch.tensor(np.array(inputs["image_grid_thw"])),
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == model.config.image_token_id).long(),
    }
    with torch.no_grad():
        theirs = reference.eval()(**kwargs).logits[0, -1].numpy()
        tokens = reference.generate(**kwargs, max_new_tokens=10, do_sample=False)[0, ids.shape[1] :].tolist()
    mx.eval(ours)
    assert np.abs(np.array(ours) - theirs).max() <= 1e-4 * np.abs(theirs).max()
    result = generate(model, processor, prompt, image=[image], max_tokens=10, temperature=0.0)
    assert result.token_ids == tokens


@needs_vlm
def test_captions_are_greedy_and_repeatable(vlms):
    from zrecipe.models.vlm.caption import Captioner

    one, two = Captioner(vlms["qwen2_vl"]), Captioner(vlms["qwen2_vl"])
    first = [one.caption(picture(i), f"d/{i}.png", "Describe this image.", 12) for i in range(3)]
    # The same in another process-like order and after other images: each caption is computed alone.
    again = [two.caption(picture(i), f"d/{i}.png", "Describe this image.", 12) for i in (2, 1, 0)][::-1]
    assert first == again
    assert first[0].text and first[0].tokens <= 12 and first[0].finish in ("stop", "length")
    assert one.caption(picture(0), "d/0.png", "Another prompt entirely.", 12) != first[0]


@needs_vlm
def test_an_image_the_model_cannot_read_and_an_empty_generation_name_the_item(vlms, tmp_path):
    from zrecipe.models.vlm.caption import Captioner

    captioner = Captioner(vlms["qwen2_vl"])
    with pytest.raises(DatasetError, match=r"d/thin.png: .*cannot read this image .*aspect ratio"):
        captioner.caption(Image.new("RGB", (2, 600), "red"), "d/thin.png", "Describe.", 4)
    # A model that ends every generation at once (every token is an end-of-sequence token).
    mute = shutil.copytree(vlms["qwen2_vl"], tmp_path / "mute")
    for name in ("config.json", "generation_config.json"):
        data = json.loads((mute / name).read_text())
        data["eos_token_id"] = list(range(json.loads((mute / "config.json").read_text())["vocab_size"]))
        (mute / name).write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"d/a.png: .*generated an empty caption"):
        Captioner(mute).caption(picture(), "d/a.png", "Describe.", 4)


def test_a_folder_that_is_not_a_vision_language_model_is_refused(tmp_path, vlms):
    text_only = shutil.copytree(vlms["qwen2_vl"], tmp_path / "text-only")
    config = json.loads((text_only / "config.json").read_text())
    del config["vision_config"]
    config["model_type"] = "qwen2"
    (text_only / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="model_type 'qwen2' has no vision_config: a text-only model"):
        resolve_vlm(str(text_only))
    pipeline = tmp_path / "z-image"
    pipeline.mkdir()
    (pipeline / "model_index.json").write_text("{}")
    with pytest.raises(ModelError, match="a diffusers pipeline, not a vision-language model"):
        resolve_vlm(str(pipeline))
    code = shutil.copytree(vlms["qwen2_vl"], tmp_path / "code")
    config = json.loads((code / "config.json").read_text())
    (code / "config.json").write_text(json.dumps({**config, "model_file": "model.py"}))
    with pytest.raises(ModelError, match="run Python code from the model folder"):
        check_vlm_folder(code, "code")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(vlms["qwen2_vl"] / "config.json", tmp_path / "no-weights")
    shutil.copy(vlms["qwen2_vl"] / "tokenizer.json", tmp_path / "no-weights")
    with pytest.raises(ModelError, match=r"incomplete, missing \*\.safetensors"):
        resolve_vlm(str(tmp_path / "no-weights"))
    with pytest.raises(ModelError, match="not tiny-vlm or a Hugging Face repo id"):
        resolve_vlm("no such model")


def test_a_repo_that_is_not_cached_is_not_downloaded_by_a_plan(monkeypatch):
    from zrecipe.models.z_image.resolve import no_downloads

    with (
        no_downloads(),
        pytest.raises(ModelError, match="not in the local Hugging Face cache .* Planning never"),
    ):
        resolve_vlm("Qwen/Qwen2-VL-2B-Instruct")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="downloads are off"):
        resolve_vlm("Qwen/Qwen2-VL-2B-Instruct")


def test_a_cached_hub_snapshot_resolves_offline(monkeypatch, vlms):
    from zrecipe.models.z_image.hub import repo_folder

    snapshot = repo_folder("org/tiny-vl") / "snapshots" / ("0" * 40)
    shutil.copytree(vlms["qwen2_5_vl"], snapshot)
    (repo_folder("org/tiny-vl") / "refs").mkdir()
    (repo_folder("org/tiny-vl") / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_vlm("org/tiny-vl") == snapshot


def test_identity_is_the_content_of_the_model_files(tmp_path, vlms):
    from zrecipe.engine import StatCache

    with StatCache(tmp_path / "stat.sqlite") as sc:
        original = vlm_identity(str(vlms["qwen2_vl"]), sc)
        moved = vlm_identity(str(shutil.copytree(vlms["qwen2_vl"], tmp_path / "elsewhere")), sc)
        (tmp_path / "elsewhere" / "README.md").write_text("not part of the model")
        assert vlm_identity(str(tmp_path / "elsewhere"), sc) == moved == original
        prompt = json.loads((tmp_path / "elsewhere" / "chat_template.json").read_text())
        prompt["chat_template"] += " "
        (tmp_path / "elsewhere" / "chat_template.json").write_text(json.dumps(prompt))
        assert vlm_identity(str(tmp_path / "elsewhere"), sc) != original
        assert vlm_identity(str(vlms["qwen2_5_vl"]), sc) != original
        assert vlm_identity(TINY_VLM, sc) == f"tiny-vlm-v{TINY_VLM_VERSION}"  # no model needed to plan


def test_a_captioning_model_downloads_only_what_it_needs_from_the_hub(vlms, tmp_path, monkeypatch):
    """The real huggingface_hub client against the loopback hub (tests/hub_server.py): configs, tokenizer,
    templates and non-variant weights are fetched; READMEs, images, `.bin` and fp16 copies are not. A plan
    never downloads; a repo without a config or weights is not a captioning model."""
    from hub_server import COMMIT, FakeHub

    from zrecipe.models.z_image.resolve import no_downloads

    files = FakeHub.folder_files(vlms["qwen2_vl"])
    extra = {"README.md": b"# vlm\n", "assets/demo.png": b"png", "model.fp16.safetensors": b"x" * 64,
             "pytorch_model.bin": b"pickle"}  # fmt: skip
    with FakeHub() as hub:
        hub.add_repo("org/vlm", {**files, **extra})
        hub.add_repo("org/text", {"README.md": b"no model here"})
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        with no_downloads(), pytest.raises(ModelError, match=r"\(9 files, .* MB\)"):
            resolve_vlm("org/vlm")
        folder = resolve_vlm("org/vlm")
        assert folder == tmp_path / "hub" / "models--org--vlm" / "snapshots" / COMMIT
        fetched = {
            name
            for method, name, _, status in hub.requests
            if method == "GET" and not name.startswith("/api/")
        }
        assert fetched == set(files)
        with pytest.raises(ModelError, match="no config.json or no safetensors weights"):
            resolve_vlm("org/text")
