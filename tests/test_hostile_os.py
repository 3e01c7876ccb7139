"""Hostile: OS faults. An unreadable image, a read-only or misplaced store, an impossible output folder, a
full disk: each ends with exit 2, a message naming the path, what is wrong and what to do, no traceback,
no temp file left behind and a consistent store. Permission cases run unprivileged for real (setpriv as
root); full disks are small tmpfs mounts (root) or an injected ENOSPC."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from helpers_hostile import (
    assert_store_consistent,
    clean_adapter,
    make_project,
    remount,
    run_cli,
    run_subprocess,
    temp_files,
    tmpfs,
    write_recipe,
    zrecipe,
)

import zrecipe.engine.store as store_module
from zrecipe.engine import StatCache


def _no_traceback(proc: subprocess.CompletedProcess) -> str:
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, text
    return text


# --- permissions (real, unprivileged) --------------------------------------------------------------------


@pytest.mark.parametrize("on_error", ["fail", "skip"])
def test_unreadable_image_at_plan_time(tmp_path, on_error):
    recipe = make_project(tmp_path, "tiny", on_error=on_error)
    victim = sorted((tmp_path / "data").glob("*.png"))[0]
    victim.chmod(0)
    proc = run_subprocess("plan", recipe, unprivileged=True)
    text = _no_traceback(proc)
    assert str(victim) in text and "cannot read the image" in text
    if on_error == "fail":
        assert proc.returncode == 2 and "fix its permissions" in text
    else:
        assert proc.returncode == 0 and "skipped (on_error: skip)" in text
        assert "3 stale / 3" in text  # the three readable images are planned


def test_read_only_store_plan_and_build(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model)
    assert zrecipe("build", recipe, "--quiet") == 0
    cache = tmp_path / "cache"
    for path in [cache, *cache.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    try:
        for command in ("plan", "build"):
            proc = run_subprocess(command, recipe, unprivileged=True)
            text = _no_traceback(proc)
            assert proc.returncode == 2, text
            assert f"{cache}: permission denied" in text and "--cache" in text
    finally:
        for path in [cache, *cache.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert_store_consistent(cache)


def test_read_only_file_system_store(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model)
    with tmpfs(tmp_path / "cache", "16m") as cache:
        assert zrecipe("build", recipe, "--quiet") == 0
        remount(cache, "ro")
        rc, _, err = run_cli(capsys, "plan", recipe)
        assert rc == 2 and f"{cache}: the file system is read-only" in err
        remount(cache, "rw")
        assert zrecipe("plan", recipe, "--check") == 0


def test_unwritable_output_folder_fails_before_any_step(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        proc = run_subprocess("build", recipe, "--quiet", unprivileged=True)
    finally:
        out.chmod(0o755)
    text = _no_traceback(proc)
    assert proc.returncode == 2 and f"save.output_path {out}: permission denied" in text
    assert not list((tmp_path / "cache").glob("objects/*/*"))  # nothing ran


# --- paths that cannot work -------------------------------------------------------------------------------


def test_cache_that_is_a_file(tmp_path, capsys):
    recipe = make_project(tmp_path, "tiny")
    (tmp_path / "afile").write_text("x")
    for command in ("plan", "build"):
        rc, _, err = run_cli(capsys, command, recipe, "--cache", tmp_path / "afile")
        assert rc == 2 and "afile is a file; the store is a folder" in err


@pytest.mark.parametrize("output", ["afile", "afile/sub", "x" * 300])
def test_impossible_output_path(tmp_path, capsys, output):
    recipe = make_project(tmp_path, "tiny", out=output)
    (tmp_path / "afile").write_text("x")
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2 and "save.output_path" in err and "choose another `save.output_path`" in err
    assert not list((tmp_path / "cache").glob("objects/*/*"))


@pytest.mark.parametrize("where", ["afile/project", "x" * 300, "/proc/zrecipe-project"])
def test_init_into_impossible_folder(tmp_path, capsys, where):
    (tmp_path / "afile").write_text("x")
    target = where if where.startswith("/") else tmp_path / where
    rc, _, err = run_cli(capsys, "init", target)
    assert rc == 2 and "init: cannot create the project in" in err and "choose another folder" in err


# --- full disks ---------------------------------------------------------------------------------------------


def test_disk_full_while_publishing(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model)
    with tmpfs(tmp_path / "out", "48k") as out:
        rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
        assert rc == 2 and "no space left on the device" in err and "publishing the outputs to" in err
        assert temp_files(out) == []
        assert_store_consistent(tmp_path / "cache")
        remount(out, "size=8m")
        assert zrecipe("build", recipe, "--quiet") == 0  # nothing to rebuild: only publishing
        report = json.loads((out / "build-report.json").read_text())
        assert sum(k["ran"] for k in report["kinds"].values()) == 0
        published = (out / "adapter.safetensors").read_bytes()
    assert published == clean_adapter(recipe)


def test_disk_full_in_the_store_during_a_step(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model)
    with tmpfs(tmp_path / "cache", "200k") as cache:
        rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
        assert rc == 2 and ("no space left" in err or "the disk is full" in err), err
        assert temp_files(cache / "objects") == []
        assert_store_consistent(cache)
        remount(cache, "size=16m")
        assert zrecipe("build", recipe, "--quiet") == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == clean_adapter(recipe)


class _FullFile:
    """A writable file on a disk that fills up after `room` bytes."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _disk_full_for(monkeypatch, module, marker: str) -> None:
    """Writes through `open` in `module` to files whose name contains `marker` hit a full disk."""
    real = open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        return _FullFile(f, 10) if "w" in mode and marker in os.fspath(file) else f

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_disk_full_writing_the_build_record(tmp_path, tiny_model, monkeypatch, capsys):
    recipe = make_project(tmp_path, tiny_model)
    _disk_full_for(monkeypatch, store_module, ".record-")  # write_atomic's temp file of the record
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2 and "writing the build record" in err and "no space left on the device" in err
    assert temp_files(tmp_path / "cache" / "roots") == []
    assert_store_consistent(tmp_path / "cache")
    monkeypatch.undo()
    assert zrecipe("build", recipe, "--quiet") == 0  # every entry is there: only the record is written


def test_disk_full_writing_the_record_does_not_hide_the_real_failure(
    tmp_path, tiny_model, monkeypatch, capsys
):
    recipe = make_project(tmp_path, tiny_model)
    (tmp_path / "data" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (tmp_path / "data" / "zz_broken.txt").write_text("broken")
    _disk_full_for(monkeypatch, store_module, ".record-")
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2 and "zz_broken.jpg: cannot decode image" in err  # the real failure...
    assert "warning: writing the build record" in err  # ...and the record problem as a warning


def test_disk_full_writing_the_report(tmp_path, tiny_model, monkeypatch, capsys):
    recipe = make_project(tmp_path, tiny_model)
    _disk_full_for(monkeypatch, store_module, "build-report.json")
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2 and "no space left on the device" in err and "Traceback" not in err
    assert temp_files(tmp_path / "out") == []


# --- the stat cache ---------------------------------------------------------------------------------------


def test_stat_cache_never_leaves_a_transaction_open(tmp_path):
    sc = StatCache(tmp_path / "stat.sqlite")
    bad = tmp_path / "bad\udcff.png"  # a name from a non-UTF-8 file system: SQLite cannot store it
    with pytest.raises(UnicodeEncodeError):
        sc._write([(os.fspath(bad), 1, 1, 1, 1, "h", 1)])
    assert not sc._db.in_transaction
    good = tmp_path / "good.txt"
    good.write_text("x")
    assert sc.hash_files([good])  # the cache still works
    sc.close()


def test_non_utf8_file_name(tmp_path, capsys):
    recipe = make_project(tmp_path, "tiny")
    bad = os.path.join(os.fsencode(tmp_path / "data"), b"bad\xff.png")
    with open(bad, "wb") as f:
        f.write(
            (tmp_path / "data" / sorted(p.name for p in (tmp_path / "data").glob("*.png"))[0]).read_bytes()
        )
    with open(bad[:-4] + b".txt", "w") as f:
        f.write("a caption")
    rc, _, err = run_cli(capsys, "plan", recipe)
    assert rc == 2 and "bad\\xff.png: the file name is not valid UTF-8; rename the file" in err
    write_recipe(recipe, "tiny", on_error="skip")
    rc, out, err = run_cli(capsys, "plan", recipe)
    assert rc == 0 and "not valid UTF-8" in err and "4 stale / 4" in out
