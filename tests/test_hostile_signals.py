"""Hostile: kill -9 and Ctrl-C at many moments of a build. Whatever the moment, the store stays
consistent (every visible entry matches its hashes), the next build finishes the work, and its adapter is
byte-identical to a clean build's. Slow: each case runs a real build in a subprocess."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_hostile import (
    assert_store_consistent,
    clean_adapter,
    make_project,
    zrecipe,
)

pytestmark = pytest.mark.slow


def _entries(cache: Path) -> list[Path]:
    return [p for p in cache.glob("objects/*/*") if not p.name.startswith(".")]


# Moments to strike, each as a condition on the store the running build is filling.
POINTS = {
    "first resize entry": lambda c: len(_entries(c)) >= 1,
    "half the per-item entries": lambda c: len(_entries(c)) >= 10,
    "encode-image running": lambda c: any(c.glob("objects/*/*/latents.safetensors")),
    "first checkpoint": lambda c: any(c.glob("work/*/checkpoints/*_checkpoint.zip")),
    "second checkpoint": lambda c: len(list(c.glob("work/*/checkpoints/*_checkpoint.zip"))) >= 2,
    "train entry committed": lambda c: any(c.glob("objects/*/*/train.json")),
    "samples being written": lambda c: any(c.glob("objects/*/*/labels.json")),
    "a temp entry being written": lambda c: any(c.glob("objects/*/.tmp-*")),
}


def _children(pid: int) -> list[int]:
    """Child pids of `pid` (Linux /proc), e.g. a parallel step's worker processes."""
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _assert_gone(pids: list[int]) -> None:
    """The worker processes of a killed build die with it (they would hold its files and keep working)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.05)
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    assert not alive, f"workers outlived the build: {alive}"


def _build(recipe: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "zrecipe.cli.main", "build", str(recipe), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _strike(recipe: Path, when, sig: int) -> int:
    proc = _build(recipe)
    cache = recipe.parent / "cache"
    deadline = time.monotonic() + 300
    while not when(cache):
        assert proc.poll() is None, (
            "the build finished before the moment came: " + proc.stdout.read().decode()
        )
        assert time.monotonic() < deadline
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    _assert_gone(workers)
    return proc.returncode


@pytest.mark.parametrize("point", list(POINTS))
def test_kill_9_then_rebuild_is_exact(tmp_path, tiny_model, point):
    recipe = make_project(tmp_path, tiny_model, images=8, steps=6, every=2, prompts=("a red circle",),
                          formats=("mflux",))  # fmt: skip
    assert _strike(recipe, POINTS[point], signal.SIGKILL) == -signal.SIGKILL
    assert_store_consistent(tmp_path / "cache")
    assert zrecipe("build", recipe, "--quiet") == 0
    assert_store_consistent(tmp_path / "cache")
    assert zrecipe("plan", recipe, "--check") == 0
    adapter = (tmp_path / "out" / "adapter.safetensors").read_bytes()
    assert zrecipe("gc", "--cache", tmp_path / "cache") == 0  # also clears the killed build's temp folders
    assert not list((tmp_path / "cache").glob("objects/*/.tmp-*"))
    assert adapter == clean_adapter(recipe)


def test_ctrl_c_during_parallel_resize(tmp_path, tiny_model):
    recipe = make_project(tmp_path, tiny_model, images=8)
    proc = subprocess.Popen([sys.executable, "-m", "zrecipe.cli.main", "build", str(recipe), "--quiet", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    cache = tmp_path / "cache"
    while not _entries(cache):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.005)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    _assert_gone(workers)
    assert proc.returncode == 130 and "Traceback" not in out, out
    assert_store_consistent(cache)
    assert zrecipe("build", recipe, "--quiet") == 0
    assert (tmp_path / "out" / "adapter.safetensors").read_bytes() == clean_adapter(recipe)
