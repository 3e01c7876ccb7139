"""Hostile: unusual reads. Caption sidecars and manifests that are FIFOs, devices or huge files are refused
without blocking or filling memory; dangling and looping symlinks are bad items that `on_error: skip`
skips; the hint to set `on_error: skip` is only given where it would help."""

from __future__ import annotations

import os

import pytest
from helpers_hostile import deadline, make_project, run_subprocess, write_recipe

MANIFEST_RECIPE = """\
model: tiny
datasets:
  - name: d
    path: data
    resolution: 64
    captions: {{manifest: {manifest}}}
training_loop:
  max_steps: 2
"""


def _plan(recipe) -> tuple[int, str]:
    """`zrecipe plan` in a subprocess, so a hang is a timeout here and not a frozen test run."""
    proc = run_subprocess("plan", recipe, timeout=60)
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    return proc.returncode, text


def _sidecar(tmp_path):
    return sorted((tmp_path / "data").glob("*.txt"))[0]


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_caption_sidecar_that_is_a_fifo(tmp_path, on_error):
    recipe = make_project(tmp_path, "tiny", on_error=on_error)
    side = _sidecar(tmp_path)
    side.unlink()
    os.mkfifo(side)
    rc, text = _plan(recipe)
    assert f"{side.name}: the caption file is a FIFO (named pipe), not a regular file" in text
    assert rc == (2 if on_error == "fail" else 0)


def test_caption_sidecar_linked_to_dev_zero(tmp_path):
    recipe = make_project(tmp_path, "tiny")
    side = _sidecar(tmp_path)
    side.unlink()
    side.symlink_to("/dev/zero")
    rc, text = _plan(recipe)
    assert rc == 2 and "is a character device, not a regular file" in text


def test_caption_sidecar_that_is_huge(tmp_path):
    recipe = make_project(tmp_path, "tiny")
    side = _sidecar(tmp_path)
    with open(side, "wb") as f:
        f.truncate((1 << 20) + 1)  # sparse: cheap to make, expensive to read whole
    rc, text = _plan(recipe)
    assert rc == 2 and "is larger than 1,048,576 bytes" in text and "is it the right file?" in text


def test_caption_manifest_that_is_a_fifo(tmp_path):
    make_project(tmp_path, "tiny")
    fifo = tmp_path / "captions.jsonl"
    os.mkfifo(fifo)
    recipe = tmp_path / "manifest.yaml"
    recipe.write_text(MANIFEST_RECIPE.format(manifest=fifo))
    rc, text = _plan(recipe)  # the recipe loader refuses it (not a file) before anything opens it
    assert rc == 2 and "datasets[0].captions.manifest" in text
    # Swapped in after loading, the manifest reader refuses it too, without blocking.
    from zrecipe.data.manifest import manifest_entries

    with deadline(10):
        ((_, _, _, problem),) = manifest_entries(fifo)
    assert problem == f"{fifo}: the manifest is a FIFO (named pipe), not a regular file; fix `captions.file`"


@pytest.mark.parametrize("link", ["dangling", "loop"])
def test_broken_symlinks_are_skipped_with_on_error_skip(tmp_path, link):
    recipe = make_project(tmp_path, "tiny", on_error="skip")
    bad = tmp_path / "data" / "zz.png"
    bad.symlink_to("nowhere.png" if link == "dangling" else "zz.png")
    rc, text = _plan(recipe)
    assert rc == 0 and "skipped (on_error: skip)" in text and str(bad) in text
    assert (
        "a symbolic link to a missing file (nowhere.png)" if link == "dangling" else "a symbolic link loop"
    ) in text
    write_recipe(recipe, "tiny", on_error="fail")
    rc, text = _plan(recipe)
    assert rc == 2 and "zz.png" in text and "set `on_error: skip`" in text


def test_skip_hint_is_not_given_when_skip_is_set(tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = make_project(tmp_path, "tiny", on_error="skip", data="empty")
    rc, text = _plan(recipe)
    assert rc == 2 and "no images found" in text
    assert "set `on_error: skip`" not in text


def test_readers_refuse_non_regular_files_directly(tmp_path):
    from zrecipe.data.captions import read_files
    from zrecipe.engine import StatCache
    from zrecipe.engine.files import FileTooLarge, NotRegularFile, read_regular

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with deadline(10):
        with pytest.raises(NotRegularFile):
            read_regular(fifo)  # returns at once: opened non-blocking, checked with fstat
        with pytest.raises(FileTooLarge):
            read_regular(_sparse(tmp_path), limit=10)
        result = read_files([str(fifo)])
        assert isinstance(result[str(fifo)], NotRegularFile)
        with StatCache(tmp_path / "stat.sqlite") as sc:
            assert isinstance(sc.read_small_files([fifo])[str(fifo)], NotRegularFile)


def _sparse(tmp_path):
    p = tmp_path / "big"
    with open(p, "wb") as f:
        f.truncate(1000)
    return p
