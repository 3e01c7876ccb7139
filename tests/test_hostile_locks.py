"""Hostile: the store lock. A build that has to wait says who holds the lock (pid, host, command); a lock
file that is a folder is a message, not a traceback; builds of two recipes on one store at once both
finish with an intact store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from helpers_hostile import (
    assert_store_consistent,
    make_project,
    run_cli,
    run_subprocess,
    write_recipe,
)

from zrecipe.engine import StoreLock
from zrecipe.errors import LockTimeout

HOLD = textwrap.dedent("""
    import sys, time
    from zrecipe.engine import StoreLock
    with StoreLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _holder(root, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds), "--the-holders-args"],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_waiting_build_says_who_holds_the_lock(tmp_path, capsys):
    recipe = make_project(tmp_path, "tiny")
    holder = _holder(tmp_path / "cache", 2.5)
    try:
        t0 = time.monotonic()
        rc, out, err = run_cli(capsys, "plan", recipe)
        assert rc == 0 and time.monotonic() - t0 >= 1.0  # it waited for the holder
    finally:
        holder.wait(timeout=30)
    assert f"waiting for the store lock {tmp_path / 'cache' / 'LOCK'}" in err
    assert f"pid {holder.pid}" in err and "--the-holders-args" in err


def test_lock_timeout_names_the_holder(tmp_path):
    holder = _holder(tmp_path, 5)
    try:
        with (
            pytest.raises(LockTimeout, match=f"pid {holder.pid} .*--the-holders-args"),
            StoreLock(tmp_path, timeout=0.2),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("command", ["plan", "build", "gc"])
def test_lock_file_that_is_a_folder(tmp_path, capsys, command):
    recipe = make_project(tmp_path, "tiny")
    (tmp_path / "cache" / "LOCK").mkdir(parents=True)
    args = ["gc", "--cache", tmp_path / "cache"] if command == "gc" else [command, recipe]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and f"the store's lock file {tmp_path / 'cache' / 'LOCK'} is a folder" in err


@pytest.mark.slow
def test_two_recipes_build_on_one_store_at_once(tmp_path, tiny_model):
    first = make_project(tmp_path / "a", tiny_model, cache=tmp_path / "cache")
    second = make_project(tmp_path / "b", tiny_model, cache=tmp_path / "cache")
    write_recipe(second, tiny_model, cache=tmp_path / "cache", lr="2.0e-3")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "zrecipe.cli.main", "build", str(r), "--quiet"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for r in (first, second)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert_store_consistent(tmp_path / "cache")
    for r in (first, second):
        assert run_subprocess("plan", r, "--check").returncode == 0


def test_forked_workers_do_not_keep_the_lock(tmp_path):
    # A parallel step's workers are forked while the build holds the lock; if they kept the lock file
    # open, a killed build's surviving workers would keep the store locked.
    with StoreLock(tmp_path):
        child = os.fork()
        if child == 0:
            time.sleep(5)
            os._exit(0)
    try:
        with StoreLock(tmp_path, timeout=1):  # the parent released it: free, though the child lives on
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
