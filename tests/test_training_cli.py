"""`zrecipe train` / `zrecipe memory` end to end on the tiny model with the seed's JSON config form."""

from __future__ import annotations

import json
import shutil
import zipfile

import mlx.core as mx
import pytest
import typer
from PIL import Image

from zrecipe.cli import memory as memory_cli
from zrecipe.cli import train as train_cli
from zrecipe.cli.main import run_app
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.training.checkpoint import MEMBERS


@pytest.fixture(scope="module")
def app():
    application = typer.Typer()
    train_cli.register(application)
    memory_cli.register(application)
    return application


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("cli") / "tiny")


def seed_lora_config(tmp_path, tiny_path) -> dict:
    """The seed's lora_config.json with only the machine-specific values changed (and the block range cut to
    the tiny model's 2 blocks: a range past the model's last block is an error, not silently clamped)."""
    images = tmp_path / "images"
    images.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(images / f"img{i + 1}.jpg")
    return {
        "model": str(tiny_path),
        "mode": "lora",
        "seed": 42,
        "steps": 50,
        "guidance": 3.5,
        "width": 64,
        "height": 64,
        "training_loop": {"num_epochs": 2, "batch_size": 2},
        "optimizer": {"name": "AdamW", "learning_rate": 1e-4},
        "lora_layers": {
            "main_layers": {
                "block_range": {"start": 0, "end": 2},
                "layer_types": ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"],
                "lora_rank": 32,
            }
        },
        "save": {"checkpoint_frequency": 1, "output_path": str(tmp_path / "out")},
        "examples": {
            "path": "./images",
            "images": [
                {"image": "img1.jpg", "prompt": "description 1"},
                {"image": "img2.jpg", "prompt": "description 2"},
            ],
        },
    }


def test_train_seed_config_then_resume_from_checkpoint(app, tmp_path, tiny_path, capsys):
    config = tmp_path / "lora_config.json"
    config.write_text(json.dumps(seed_lora_config(tmp_path, tiny_path), indent=2))
    assert run_app(app, ["train", "--train-config", str(config), "--cache", str(tmp_path / "cache")]) == 0
    out = tmp_path / "out"
    adapter, meta = mx.load(str(out / "adapter.safetensors"), return_metadata=True)
    assert meta["format"] == "zrecipe" and meta["rank"] == "32" and meta["base_model"].startswith("model:")
    assert str(tmp_path) not in json.dumps(meta)  # nothing in a keyed entry names where the project lives
    assert len(adapter) == 3 * 4 * 2  # (A, B, alpha) × 4 layer types × the tiny model's 2 blocks
    first = out / "checkpoints" / "0000001_checkpoint.zip"
    with zipfile.ZipFile(first) as zf:
        assert sorted(zf.namelist()) == sorted(MEMBERS)
        assert json.loads(zf.read("config.json"))["mode"] == "lora"
    final = (out / "adapter.safetensors").read_bytes()
    err = capsys.readouterr().err
    peak = float(err.split("peak memory ")[1].split(" GB")[0])
    assert peak > 0.01  # the process's peak RSS on the CPU (MLX's own counter misses most of it)
    # A fresh store: the checkpoint's own recipe, its step-1 state, the remaining step: bit-exact.
    saved = tmp_path / "saved.zip"
    saved.write_bytes(first.read_bytes())
    shutil.rmtree(out)
    assert run_app(app, ["train", "--train-checkpoint", str(saved), "--cache", str(tmp_path / "fresh")]) == 0
    assert (out / "adapter.safetensors").read_bytes() == final
    assert "train: resuming from 0000001_checkpoint.zip" in capsys.readouterr().err


def test_train_and_build_train_the_same_adapter(app, tmp_path, tiny_path):
    """The seed's examples form over a folder with unlisted files: `train` and `build` agree byte for byte."""
    from zrecipe.cli import build as build_cli

    data = seed_lora_config(tmp_path, tiny_path)
    for name in ("extra.jpg", "notes.png"):  # in the folder, not in the list: not part of the dataset
        Image.new("RGB", (64, 64), "green").save(tmp_path / "images" / name)
    # An absolute path inside the dataset folder names the same image as the relative one.
    data["examples"]["images"][1]["image"] = str(tmp_path / "images" / "img2.jpg")
    config = tmp_path / "lora_config.json"
    config.write_text(json.dumps(data))
    build_cli.register(app)
    assert run_app(app, ["build", str(config), "--cache", str(tmp_path / "a")]) == 0
    built = (tmp_path / "out" / "adapter.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "out")
    assert run_app(app, ["train", "--train-config", str(config), "--cache", str(tmp_path / "b")]) == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == built
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert report["kinds"]["resize"]["ran"] == 2 and "sample" not in report["kinds"]


def test_checkpoint_of_the_uncorrected_adamw_is_refused_before_encoding(app, tmp_path, tiny_path, capsys):
    """Older zrecipe wrote optimizer.safetensors without an update rule: its AdamW skipped bias correction."""
    from zrecipe.training.checkpoint import write_checkpoint

    config = seed_lora_config(tmp_path, tiny_path)
    old = write_checkpoint(tmp_path / "old", 1, ({"x": mx.zeros((1,))}, {}), {"step": mx.array(1)},
                           {"epoch": 0}, [], config, {"mode": "lora", "recipe_source": str(tmp_path / "r.json")})  # fmt: skip
    assert run_app(app, ["train", "--train-checkpoint", str(old), "--cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert f"{old}: optimizer.safetensors" in err and "bias" in err and "Start the training again" in err
    assert not (tmp_path / "cache").exists()  # refused before the model was resolved or anything encoded


def test_train_flags_are_checked(app, tmp_path):
    assert run_app(app, ["train"]) == 2
    bad = tmp_path / "full.json"
    bad.write_text(json.dumps({"model": "tiny", "mode": "full", "full_finetune": {"train_vae": True}}))
    assert run_app(app, ["train", "--train-config", str(bad), "--cache", str(tmp_path)]) == 2


def test_the_seed_command_keeps_its_flags(app):
    command = typer.main.get_command(app).commands["train"]
    flags = {opt for param in command.params for opt in param.opts}
    assert {
        "--train-config",
        "--train-checkpoint",
        "--low-ram",
        "--battery-percentage-stop-limit",
        "-B",
    } <= flags


def test_memory_command(app, capsys):
    assert run_app(app, ["memory", "--mode", "lora", "--available-memory-gb", "512"]) == 0
    out = capsys.readouterr().out
    assert "Recommended batch size" in out and "trainable parameters 29,491,200" in out
    assert run_app(app, ["memory", "--mode", "full", "--available-memory-gb", "64", "--quantize", "4"]) == 2
