"""Same key, same bytes; `--until` any kind; `--force train` over a foreign checkpoint; a clean stop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_e2e_build import make_project, write_recipe, zrecipe

from zrecipe.engine import Store
from zrecipe.pipeline import plan_recipe
from zrecipe.recipe import load_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from zrecipe.models.z_image.tiny import create_tiny_model

    return create_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


def entries(recipe: Path, kinds=None) -> dict[str, dict[str, tuple]]:
    """{kind: {item: (key, {file: (size, hash)})}} of a built recipe, read back from its store."""
    outcome = plan_recipe(load_recipe(recipe))
    store = Store(outcome.cache_dir)
    assert outcome.plan.stale_count == 0
    return {
        k: {p.node.item: (p.key, store.manifest(p.key)) for p in outcome.plan.nodes[k]}
        for k in outcome.plan.order
        if kinds is None or k in kinds
    }


def train_key(recipe: Path) -> str:
    (node,) = plan_recipe(load_recipe(recipe)).plan.nodes["train"]
    return node.key


def test_same_key_same_bytes_from_two_folders_and_after_a_sample_edit(tmp_path, tiny_model):
    a = make_project(tmp_path / "a", tiny_model, prompts=("a red circle",))
    b = make_project(tmp_path / "elsewhere" / "b", tiny_model, prompts=("a blue square", "a green dot"))
    assert zrecipe("build", a, "-q") == 0 and zrecipe("build", b, "-q") == 0
    kinds = ("resize", "encode-image", "train", "export")
    ours, theirs = entries(a, kinds), entries(b, kinds)
    for kind in kinds:
        assert ours[kind] == theirs[kind], kind  # same items, keys and every file's bytes (metadata too)
    adapter = json.dumps(dict(__import__("mlx.core").core.load(
        str(tmp_path / "a" / "out" / "adapter.safetensors"), return_metadata=True)[1]))  # fmt: skip
    assert str(tmp_path) not in adapter and "a red circle" not in adapter


def test_until_any_kind_builds_only_what_it_needs(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, images=2)
    assert zrecipe("build", recipe, "--until", "encode-text", "-q") == 0
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert {k: v["ran"] for k, v in report["kinds"].items()} == {"encode-text": 3}  # 2 captions and ""
    assert zrecipe("build", recipe, "--until", "export", "-q") == 0
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert sorted(report["kinds"]) == ["encode-image", "encode-text", "export", "resize", "train"]


def test_force_train_clears_a_foreign_checkpoint(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model, images=2, prompts=(), formats=())
    assert zrecipe("build", recipe, "-q") == 0
    store = Store(tmp_path / "cache")
    first = store.work_dir(train_key(recipe)) / "checkpoints" / "0000002_checkpoint.zip"
    recipe.write_text(recipe.read_text().replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3"))
    planted = store.work_dir(train_key(recipe)) / "checkpoints" / first.name
    planted.parent.mkdir(parents=True)
    shutil.copy2(first, planted)  # another run's checkpoint where this run's would be
    capsys.readouterr()
    assert zrecipe("build", recipe, "-q") == 2
    err = capsys.readouterr().err
    assert "another training run" in err and "--force train" in err
    assert zrecipe("build", recipe, "-q", "--force", "train") == 0
    forced = (tmp_path / "out" / "adapter.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "cache")
    assert zrecipe("build", recipe, "-q") == 0  # from scratch in a fresh store: the same bytes
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == forced


def test_a_stopped_training_says_where_and_resumes_bit_exactly(tmp_path, tiny_model):
    recipe = make_project(tmp_path / "p", tiny_model, images=4, steps=14, every=2, prompts=(), formats=())
    ref = make_project(tmp_path / "ref", tiny_model, images=4, steps=14, every=2, prompts=(), formats=())
    assert zrecipe("build", ref, "-q") == 0
    proc = subprocess.Popen([sys.executable, "-m", "zrecipe.cli.main", "train", "--train-config", str(recipe)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    work = tmp_path / "p" / "cache" / "work"
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.rglob("0000002_checkpoint.zip")):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    (line,) = [ln for ln in err.splitlines() if "training stopped" in ln]
    assert (
        " (received SIGINT); checkpoint: " in line
        and "; resume with: zrecipe train --train-checkpoint " in line
    )
    resume = line.split("--train-checkpoint ")[1]
    assert zrecipe("train", "--train-checkpoint", resume) == 0
    # The interrupted and resumed run stored exactly what the uninterrupted one did.
    assert entries(ref, ("train",)) == entries(recipe, ("train",))


@pytest.mark.parametrize("kind", ["nope"])
def test_until_unknown_kind_names_the_choices(tmp_path, kind, capsys):
    recipe = tmp_path / "recipe.yaml"
    write_recipe(recipe, "tiny")
    (tmp_path / "data").mkdir()
    assert zrecipe("plan", recipe, "--until", kind) == 2
    assert "choose one of resize, mask, encode-image, encode-text, train" in capsys.readouterr().err
