"""Shared machinery of the hostile suite (tests/test_hostile_*.py): tiny projects, CLI runs in and out of
process, same-size corruption, unprivileged subprocesses, small tmpfs mounts, store consistency checks.

The tiny model fixture (`tiny_model`) is in conftest.py. Cases that need a real OS refusal use the real thing where the machine allows it: a subprocess without
CAP_DAC_OVERRIDE (`setpriv`) when running as root, so chmod'ed files are really unreadable; a small tmpfs
for a full disk. Where that is not possible the test skips (or a sibling test injects the failure).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
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
    path: {data}
    resolution: 64
    repeats: {repeats}
    on_error: {on_error}
training_loop:
  max_steps: {steps}
  batch_size: 2
optimizer:
  learning_rate: {lr}
lora:
  rank: {rank}
  targets:
    - blocks: layers
      range: {block_range}
      layer_types: [attention.to_q, attention.to_v]
save:
  checkpoint_frequency: {every}
  output_path: {out}
sample:
  prompts: {prompts}
  steps: 2
  width: 32
  height: 32
  seeds: [1]
export:
  formats: {formats}
"""


def write_recipe(path: Path, model, *, data="data", out="out", cache=None, steps=4, every=2, lr="1.0e-3",
                 prompts=(), formats=(), on_error="fail", repeats=1, rank=4, block_range="[0, 2]") -> Path:  # fmt: skip
    """A tiny LoRA recipe at `path` (data / out / cache relative to its folder unless absolute)."""
    path.write_text(
        RECIPE.format(
            model=model,
            cache=cache or path.parent / "cache",
            data=data,
            out=out,
            steps=steps,
            every=every,
            lr=lr,
            prompts=json.dumps(list(prompts)),
            formats=json.dumps(list(formats)),
            on_error=on_error,
            repeats=repeats,
            rank=rank,
            block_range=block_range,
        )  # fmt: skip
    )
    return path


def make_project(root: Path, model, images: int = 4, **recipe) -> Path:
    """`root/data` with `images` tiny images and their captions, and `root/recipe.yaml`."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for f in sorted(TINY_DATA.iterdir())[: images * 2]:
        shutil.copy2(f, data / f.name)
    return write_recipe(root / "recipe.yaml", model, **recipe)


def zrecipe(*args) -> int:
    """Run the CLI in this process; returns the exit code."""
    return run_app(app, [str(a) for a in args])


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr) of this call alone."""
    capsys.readouterr()
    rc = zrecipe(*args)
    out = capsys.readouterr()
    return rc, out.out, out.err


def unprivileged_prefix() -> list[str]:
    """A command prefix under which permission bits bind: nothing as a normal user, `setpriv` without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH as root (the test is skipped where neither works)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to bind")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def run_subprocess(*args, cwd=None, unprivileged=False, timeout=120, env=None) -> subprocess.CompletedProcess:
    """`python -m zrecipe.cli.main ARGS` in a fresh process (text output)."""
    prefix = unprivileged_prefix() if unprivileged else []
    cmd = [*prefix, sys.executable, "-m", "zrecipe.cli.main", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def flip_bytes(path: Path, offset: int | None = None) -> None:
    """Same-size damage: invert a few bytes in the middle (or at `offset`) and put the mtime back, the
    worst case for size/mtime checks."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    at = len(data) // 2 if offset is None else offset
    for i in range(at, min(at + 4, len(data))):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def entry_of(cache: Path, kind: str, item: str | None = None) -> Path:
    """The store folder of the recorded (kind, item) (the only node of `kind` when item is None)."""
    from zrecipe.engine import Record, Store, record_path

    roots = list((cache / "roots").glob("*.record"))
    assert len(roots) == 1, roots
    rec = Record.load_file(roots[0])
    assert rec is not None and record_path(cache, rec.graph_id) == roots[0]
    items = dict(rec.iter_kind(kind))
    entry = items[item] if item is not None else next(iter(items.values()))
    return Store(cache).path(entry.key)


def assert_store_consistent(cache: Path) -> None:
    """Every committed entry matches its manifest hashes; no half-written entry is visible as one."""
    from zrecipe.engine import Store

    store = Store(cache)
    bad = [k for k in store.iter_entries() if store.check(k, "hashes") != "ok"]
    assert not bad, f"damaged entries: {bad}"


def temp_files(folder: Path) -> list[Path]:
    """Temp files zrecipe writes beside their destination (`.<name>.tmp-...`, `.tmp-...`)."""
    return [p for p in folder.rglob("*") if ".tmp-" in p.name or p.name.startswith(".zrecipe-probe")]


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (TimeoutError) instead of hanging when the block blocks longer than `seconds` — e.g. an
    `open()` of a FIFO nobody writes to (the alarm interrupts the system call)."""

    def expire(signum, frame):
        raise TimeoutError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """Mount a tmpfs of `size` at `path` (skips the test when mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    """Change a mount's options (e.g. `size=64m`, `ro`)."""
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def clean_adapter(recipe: Path) -> bytes:
    """The adapter a clean build of `recipe` as it is now makes: its store and output folder are moved
    aside, a fresh build runs in the same place (so paths in metadata match), and they are put back."""
    root = recipe.parent
    moved = [(root / name, root / f"{name}.aside") for name in ("cache", "out") if (root / name).exists()]
    for a, b in moved:
        a.rename(b)
    try:
        assert zrecipe("build", recipe, "--quiet") == 0
        return (root / "out" / "adapter.safetensors").read_bytes()
    finally:
        for a, b in moved:
            shutil.rmtree(a, ignore_errors=True)
            b.rename(a)
