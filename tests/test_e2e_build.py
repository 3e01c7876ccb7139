"""End to end on the tiny model: the whole graph, incremental rebuilds, interrupted builds, bad input."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zrecipe.cli.main import app, run_app

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = REPO / "recipes" / "data" / "tiny"

RECIPE = """\
model: {model}
mode: lora
seed: 3
cache: {cache}
datasets:
  - name: shapes
    path: data
    resolution: 64
    caption_dropout: 0.2
training_loop:
  max_steps: {steps}
  batch_size: 2
  gradient_accumulation_steps: 2
optimizer:
  learning_rate: 1.0e-3
lora:
  rank: 4
  targets:
    - blocks: layers
      layer_types: [attention.to_q, attention.to_v]
save:
  checkpoint_frequency: {every}
  output_path: out
sample:
  prompts: {prompts}
  steps: 2
  width: 32
  height: 32
  seeds: [1]
export:
  formats: {formats}
"""


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def make_project(root: Path, model: Path, images: int = 6, steps: int = 4, every: int = 2,
                 prompts=("a red circle",), formats=("mflux",)) -> Path:  # fmt: skip
    (root / "data").mkdir(parents=True, exist_ok=True)
    for f in sorted(TINY_DATA.iterdir())[: images * 2]:
        shutil.copy2(f, root / "data" / f.name)
    recipe = root / "recipe.yaml"
    write_recipe(recipe, model, steps=steps, every=every, prompts=prompts, formats=formats)
    return recipe


def write_recipe(recipe: Path, model: Path, steps=4, every=2, prompts=("a red circle",), formats=("mflux",)):
    recipe.write_text(
        RECIPE.format(
            model=model,
            cache=recipe.parent / "cache",
            steps=steps,
            every=every,
            prompts=json.dumps(list(prompts)),
            formats=json.dumps(list(formats)),
        )  # fmt: skip
    )


def zrecipe(*args: str) -> int:
    return run_app(app, [str(a) for a in args])


def plan_counts(recipe: Path, capsys) -> dict:
    capsys.readouterr()
    assert zrecipe("plan", recipe, "--json") in (0, 1)
    return {k: v["stale"] for k, v in json.loads(capsys.readouterr().out)["kinds"].items()}


def ran(recipe: Path) -> dict:
    report = json.loads((recipe.parent / "out" / "build-report.json").read_text())
    return {k: v["ran"] for k, v in report["kinds"].items()}


def test_incremental_rebuilds(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model)
    assert zrecipe("build", recipe) == 0
    out = tmp_path / "out"
    assert (out / "adapter.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "0000002_checkpoint.zip",
        "0000004_checkpoint.zip",
    ]
    assert (out / "samples" / "contact_sheet.png").exists()
    assert (out / "exports" / "recipe_mflux.safetensors").exists()
    assert ran(recipe) == {"resize": 6, "encode-text": 8, "encode-image": 6, "train": 1, "sample": 1,
                           "export": 1, "contact-sheet": 1}  # fmt: skip

    # No-op: nothing is stale, nothing runs.
    assert all(v == 0 for v in plan_counts(recipe, capsys).values())
    t0 = time.perf_counter()
    assert zrecipe("build", recipe) == 0
    assert time.perf_counter() - t0 < 2.0
    assert sum(ran(recipe).values()) == 0

    # Add 2 images (one with a caption seen before): only they are resized and encoded.
    for f in sorted(TINY_DATA.iterdir())[12:16]:
        shutil.copy2(f, tmp_path / "data" / f.name)
    assert zrecipe("build", recipe) == 0
    r = ran(recipe)
    assert (r["resize"], r["encode-image"], r["train"], r["sample"]) == (2, 2, 1, 1)
    assert r["encode-text"] == 2

    # Edit one caption: one text encode, retrain, resample; no image work.
    cap = sorted((tmp_path / "data").glob("*.txt"))[0]
    cap.write_text("a completely new caption\n")
    assert zrecipe("build", recipe) == 0
    r = ran(recipe)
    assert (r["resize"], r["encode-image"], r["encode-text"], r["train"], r["sample"]) == (0, 0, 1, 1, 1)

    # Only the sample prompts change: only samples (and the new prompt's embedding).
    write_recipe(recipe, tiny_model, prompts=("a blue square",))
    assert zrecipe("build", recipe) == 0
    r = ran(recipe)
    assert (r["resize"], r["encode-image"], r["train"], r["sample"], r["encode-text"]) == (0, 0, 0, 1, 1)

    # Only the export formats change: only export.
    write_recipe(recipe, tiny_model, prompts=("a blue square",), formats=("mflux", "kohya"))
    assert zrecipe("build", recipe) == 0
    r = ran(recipe)
    assert r["export"] == 1 and sum(r.values()) == 1
    assert (out / "exports" / "recipe_kohya.safetensors").exists()

    # explain names the changed training parameter.
    text = recipe.read_text().replace("learning_rate: 1.0e-3", "learning_rate: 5.0e-4")
    recipe.write_text(text)
    capsys.readouterr()
    assert zrecipe("explain", recipe, "train") == 0
    assert "optimizer.learning_rate 0.001 → 0.0005" in capsys.readouterr().out


def _build_subprocess(recipe: Path, env=None):
    return subprocess.Popen(
        [sys.executable, "-m", "zrecipe.cli.main", "build", str(recipe), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


def test_kill_during_training_resumes_bit_exactly(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, steps=40, every=5, prompts=(), formats=())
    assert zrecipe("build", recipe) == 0
    expected = (tmp_path / "out" / "adapter.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "out")
    shutil.rmtree(tmp_path / "cache")

    proc = _build_subprocess(recipe)
    work = tmp_path / "cache" / "work"
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.rglob("*_checkpoint.zip")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in work.rglob("*_checkpoint.zip"))
    assert done and "0000040_checkpoint.zip" not in done, done
    assert zrecipe("build", recipe) == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == expected


def test_concurrent_builds_share_the_store(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, prompts=(), formats=())
    procs = [_build_subprocess(recipe) for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    from zrecipe.engine import Store

    store = Store(tmp_path / "cache")
    assert all(store.check(k, "hashes") == "ok" for k in store.iter_entries())
    assert zrecipe("plan", recipe, "--check") == 0


def test_corrupt_image_fails_with_its_name_or_is_skipped(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model, prompts=(), formats=())
    assert zrecipe("build", recipe, "--until", "resize") == 0
    (tmp_path / "data" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "data" / "zz_broken.txt").write_text("broken\n")
    capsys.readouterr()
    assert zrecipe("build", recipe) == 2
    assert "zz_broken.jpg" in capsys.readouterr().err
    assert zrecipe("plan", recipe, "--until", "resize", "--check") == 1  # only the broken item is stale

    recipe.write_text(
        recipe.read_text().replace("caption_dropout: 0.2", "caption_dropout: 0.2\n    on_error: skip")
    )
    assert zrecipe("build", recipe) == 0
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert report["kinds"]["resize"]["skipped"] == 1
    assert "zz_broken.jpg" in json.dumps(report)
    assert (tmp_path / "out" / "adapter.safetensors").exists()


def test_seed_lora_config_builds(tmp_path, tiny_model):
    config = json.loads((REPO / "tests" / "fixtures" / "seed" / "lora_config.json").read_text())
    config["model"] = str(tiny_model)
    # The seed's range is the real model's 30 blocks; the tiny model has 2 (a range past the last block is
    # refused, not clamped: tests/test_hostile_values.py).
    config["lora_layers"]["main_layers"]["block_range"]["end"] = 2
    config["training_loop"] = {"num_epochs": 2, "batch_size": 2}
    config["save"]["output_path"] = str(tmp_path / "lora_out")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy2(TINY_DATA / "00_red_circle.png", images / "img1.jpg")  # the seed's names, any image type
    shutil.copy2(TINY_DATA / "01_blue_square.jpg", images / "img2.jpg")
    path = tmp_path / "lora_config.json"
    path.write_text(json.dumps(config, indent=2))
    assert zrecipe("build", path, "--cache", tmp_path / "cache") == 0
    assert (tmp_path / "lora_out" / "adapter.safetensors").exists()


def test_full_config_without_dataset_says_so(tmp_path, capsys):
    path = tmp_path / "full_config.json"
    shutil.copy2(REPO / "tests" / "fixtures" / "seed" / "full_config.json", path)
    capsys.readouterr()
    assert zrecipe("plan", path, "--cache", tmp_path / "cache") == 2
    assert "nothing to train on" in capsys.readouterr().err


def test_until_resize_needs_no_model(tmp_path, capsys, monkeypatch):
    recipe = make_project(tmp_path, Path("/nonexistent/model"), prompts=(), formats=())
    recipe.write_text(recipe.read_text().replace("model: /nonexistent/model", "model: z-image"))
    assert zrecipe("build", recipe, "--until", "resize") == 0
    capsys.readouterr()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zrecipe("plan", recipe) == 2
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
