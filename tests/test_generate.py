"""`zrecipe generate` on the tiny model: determinism, PNG metadata, LoRAs, sizes, seeds; sample sheets."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import typer
from PIL import Image

from zrecipe.cli import generate as generate_cli
from zrecipe.cli.main import run_app
from zrecipe.errors import UserError
from zrecipe.generation.generate import check_size, initial_noise, output_paths
from zrecipe.generation.samples import SampleRequest, contact_sheet, render_samples
from zrecipe.models.z_image.tiny import create_tiny_model

ARGS = ["--prompt", "a red cube", "--steps", "3", "--width", "64", "--height", "48", "--guidance", "2.5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("gen") / "tiny", seed=2)


@pytest.fixture(scope="module")
def lora(tiny, tmp_path_factory):
    """An mflux-style LoRA on every attention output of the tiny model, strong enough to show."""
    rng = np.random.default_rng(0)
    tensors = {}
    for block in ("layers.0", "layers.1", "noise_refiner.0"):
        tensors[f"diffusion_model.{block}.attention.to_out.0.lora_A.weight"] = mx.array(
            rng.standard_normal((4, 64)).astype(np.float32) * 0.5
        )
        tensors[f"diffusion_model.{block}.attention.to_out.0.lora_B.weight"] = mx.array(
            rng.standard_normal((64, 4)).astype(np.float32) * 0.5
        )
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    mx.save_safetensors(str(path), tensors)
    return path


def _app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is addressed by name as in the real CLI
    generate_cli.register(app)
    return app


def _run(argv, capsys=None) -> int:
    return run_app(_app(), ["generate", *argv])


def test_generate_is_deterministic_and_writes_metadata(tiny, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert _run([*ARGS, "--model", str(tiny), "--seed", "1", "-o", str(a)]) == 0
    assert _run([*ARGS, "--model", str(tiny), "--seed", "1", "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    image = Image.open(a)
    assert image.size == (64, 48)
    assert image.text["prompt"] == "a red cube" and image.text["seed"] == "1"
    assert image.text["steps"] == "3" and image.text["guidance"] == "2.5"
    assert image.text["negative_prompt"] == "" and image.text["model"] == str(tiny)
    assert json.loads(image.text["loras"]) == []
    assert np.array(image).std() > 1  # not a flat image


def test_lora_changes_image_and_is_recorded(tiny, lora, tmp_path):
    base, styled = tmp_path / "base.png", tmp_path / "lora.png"
    assert _run([*ARGS, "--model", str(tiny), "-o", str(base)]) == 0
    assert (
        _run(
            [
                *ARGS,
                "--model",
                str(tiny),
                "-o",
                str(styled),
                "--lora-paths",
                str(lora),
                "--lora-scales",
                "0.8",
            ]
        )
        == 0
    )
    diff = np.abs(np.array(Image.open(base), np.int16) - np.array(Image.open(styled), np.int16))
    assert diff.mean() > 1
    assert json.loads(Image.open(styled).text["loras"]) == [{"path": str(lora), "scale": 0.8}]
    fused = tmp_path / "fused.png"
    assert (
        _run(
            [
                *ARGS,
                "--model",
                str(tiny),
                "-o",
                str(fused),
                "--lora-paths",
                str(lora),
                "--lora-scales",
                "0.8",
                "--fuse-loras",
            ]
        )
        == 0
    )
    close = np.abs(np.array(Image.open(fused), np.int16) - np.array(Image.open(styled), np.int16))
    assert close.max() <= 2  # fused and unfused agree up to rounding


def test_several_seeds_write_one_file_each(tiny, tmp_path):
    out = tmp_path / "img.png"
    assert _run([*ARGS, "--model", str(tiny), "--seed", "4", "--seed", "5", "-o", str(out), "--low-ram"]) == 0
    four, five = tmp_path / "img_4.png", tmp_path / "img_5.png"
    assert four.is_file() and five.is_file() and not out.exists()
    assert four.read_bytes() != five.read_bytes()
    assert Image.open(five).text["seed"] == "5"


def test_bad_inputs_exit_2_with_a_clear_message(tiny, lora, tmp_path, capsys):
    assert (
        _run(
            [
                "--prompt",
                "x",
                "--width",
                "100",
                "--height",
                "64",
                "--model",
                str(tiny),
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "width 100 (try 96 or 112)" in capsys.readouterr().err
    assert _run([*ARGS, "--model", str(tiny), "-o", str(tmp_path / "x.jpg")]) == 2
    assert (
        _run(
            [
                *ARGS,
                "--model",
                str(tiny),
                "--lora-paths",
                str(lora),
                "--lora-scales",
                "1",
                "--lora-scales",
                "2",
                "-o",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    assert "scale" in capsys.readouterr().err
    assert _run([*ARGS, "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2


def test_unmatched_lora_keys_fail_unless_allowed(tiny, lora, tmp_path, capsys):
    tensors = dict(mx.load(str(lora)))
    tensors["diffusion_model.layers.29.attention.to_q.lora_A.weight"] = mx.zeros((4, 64))
    tensors["diffusion_model.layers.29.attention.to_q.lora_B.weight"] = mx.zeros((64, 4))
    extra = tmp_path / "extra.safetensors"
    mx.save_safetensors(str(extra), tensors)
    argv = [*ARGS, "--model", str(tiny), "--lora-paths", str(extra), "-o", str(tmp_path / "u.png")]
    assert _run(argv) == 2
    assert "layers.29.attention.to_q.lora_A.weight" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="layers.29"):
        assert _run([*argv, "--allow-unmatched"]) == 0


def test_size_rules_noise_and_output_names():
    check_size(1024, 768)
    with pytest.raises(UserError, match="width 1000 .try 992 or 1008."):
        check_size(1000, 1024)
    noise = initial_noise(7, 64, 32)
    assert noise.shape == (1, 16, 4, 8) and noise.dtype == mx.float32
    assert np.array_equal(np.array(noise), np.array(initial_noise(7, 64, 32)))
    assert not np.array_equal(np.array(noise), np.array(initial_noise(8, 64, 32)))
    assert [p.name for p in output_paths("out", (1,))] == ["out.png"]
    assert [p.name for p in output_paths("a/out.png", (1, 2))] == ["out_1.png", "out_2.png"]


def test_render_samples_swaps_each_adapter_in_and_out(tiny, lora, tmp_path):
    from zrecipe.generation.generate import GenerationSettings, encode_text

    cat, dog, ugly = encode_text(tiny, ["a cat", "a dog", "ugly"])
    requests = [
        SampleRequest(GenerationSettings(prompt, "ugly", 2.0, 2, 32, 32, (seed,)), seed, emb, ugly)
        for prompt, emb in (("a cat", cat), ("a dog", dog))
        for seed in (0, 1)
    ]
    rows = render_samples(tiny, [("step_10", lora), ("base", None)], requests, "tiny")
    assert [[label for label, _, _ in row] for row in rows] == [["step_10", "base"]] * 4
    assert rows[1][1][2] == {
        **rows[1][1][2],
        "prompt": "a cat",
        "seed": "1",
        "adapter": "base",
        "model": "tiny",
    }
    # The LoRA was swapped out again: the base pass after it equals the base model rendered alone.
    (alone,) = render_samples(tiny, [("base", None)], requests[:1], "tiny")
    base, styled = np.asarray(rows[0][1][1]), np.asarray(rows[0][0][1])
    assert np.array_equal(np.asarray(alone[0][1]), base)
    assert not np.array_equal(base, styled)
    grid = [[image for _, image, _ in row] for row in rows]
    sheet = contact_sheet(grid, ["cat 0", "cat 1", "dog 0", "dog 1"], ["step_10", "base"], tmp_path / "s.png")
    assert Image.open(sheet).width > 2 * 32 and Image.open(sheet).height > 4 * 32


def test_contact_sheet_requires_images(tmp_path):
    with pytest.raises(ValueError):
        contact_sheet([[None]], ["r"], ["c"], tmp_path / "s.png")
    img = Image.new("RGB", (8, 8), "red")
    out = contact_sheet([[img, None]], ["row"], ["a", "b"], tmp_path / "s.png")
    assert Image.open(out).size[0] > 16
