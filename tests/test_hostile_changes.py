"""Hostile: source files changed during a build. A step hashes the bytes it actually read; when they are
not the content the plan hashed, the step fails ("changed during the build; run it again") and nothing is
stored under the old content's key — so putting the original back later rebuilds, never reuses."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers_hostile import (
    TINY_DATA,
    assert_store_consistent,
    clean_adapter,
    make_project,
    run_cli,
    write_recipe,
    zrecipe,
)

import zrecipe.engine.executor as executor


def _change_after_planning(monkeypatch, path, new_bytes) -> None:
    """Replace `path` once the plan is made and before any step runs (what a sync tool or an editor
    saving over the file does in the middle of a build)."""
    real = executor.execute

    def execute(plan, *args, **kwargs):
        path.write_bytes(new_bytes)
        monkeypatch.setattr(executor, "execute", real)  # only the first build is disturbed
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(executor, "execute", execute)


def test_image_replaced_during_build_fails_and_poisons_nothing(tmp_path, tiny_model, monkeypatch, capsys):
    recipe = make_project(tmp_path, tiny_model)
    victim = sorted((tmp_path / "data").glob("*.png"))[0]
    original = victim.read_bytes()
    other = next(p for p in sorted(TINY_DATA.iterdir()) if p.suffix == ".png" and p.read_bytes() != original)
    _change_after_planning(monkeypatch, victim, other.read_bytes())
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2
    assert f"{victim}: the file changed during the build" in err and "run the build again" in err
    # The content the plan hashed has no resize entry: nothing was stored under its key.
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert report["kinds"]["resize"]["failed"] == 1
    assert_store_consistent(tmp_path / "cache")
    # The next build sees the new content and builds it; putting the original back rebuilds it again
    # (no entry holds the new pixels under the original's key) and trains on the original.
    assert zrecipe("build", recipe, "--quiet") == 0
    victim.write_bytes(original)
    assert zrecipe("build", recipe, "--quiet") == 0
    assert json.loads((tmp_path / "out" / "build-report.json").read_text())["kinds"]["resize"]["ran"] == 1
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == clean_adapter(recipe)


def test_image_replaced_during_build_is_skipped_with_on_error_skip(tmp_path, tiny_model, monkeypatch, capsys):
    recipe = make_project(tmp_path, tiny_model, on_error="skip")
    victim = sorted((tmp_path / "data").glob("*.jpg"))[0]
    _change_after_planning(monkeypatch, victim, b"\xff\xd8 changed")
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 0
    report = json.loads((tmp_path / "out" / "build-report.json").read_text())
    assert report["kinds"]["resize"]["skipped"] == 1
    assert "changed during the build" in json.dumps(report["kinds"]["resize"]["skipped_items"])


def test_image_deleted_during_build_fails_with_its_name(tmp_path, tiny_model, monkeypatch, capsys):
    recipe = make_project(tmp_path, tiny_model)
    victim = sorted((tmp_path / "data").glob("*.png"))[0]
    real = executor.execute

    def execute(plan, *args, **kwargs):
        victim.unlink()
        monkeypatch.setattr(executor, "execute", real)
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(executor, "execute", execute)
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2 and str(victim) in err and "Traceback" not in err
    assert_store_consistent(tmp_path / "cache")


def test_recipe_edited_between_builds_never_mixes(tmp_path, tiny_model):
    # Not mid-build, but the same promise: what is built is a function of what was planned.
    recipe = make_project(tmp_path, tiny_model, images=3)
    assert zrecipe("build", recipe, "--quiet") == 0
    for f in sorted(TINY_DATA.iterdir())[6:8]:
        shutil.copy2(f, tmp_path / "data" / f.name)
    write_recipe(recipe, tiny_model, lr="2.0e-3")
    assert zrecipe("build", recipe, "--quiet") == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == clean_adapter(recipe)


def test_read_verified_refuses_other_bytes(tmp_path):
    import xxhash

    from zrecipe.engine.files import read_verified
    from zrecipe.errors import InputChanged

    f = tmp_path / "a.bin"
    f.write_bytes(b"planned")
    planned = xxhash.xxh128_hexdigest(b"planned")
    assert read_verified(f, planned) == b"planned"
    f.write_bytes(b"changed")
    with pytest.raises(InputChanged, match="changed during the build"):
        read_verified(f, planned)
