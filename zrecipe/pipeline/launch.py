"""`zrecipe build -n N | --hosts | --hostfile`: re-run the same build under `mlx.launch`, a process per rank.

mlx.launch exits 0 whatever its ranks did, so each rank prints one marker line with its exit code on
stdout (`rank_status`), and the parent reads them back out of the stream (dropping them) to exit with the
build's real status. A rank killed before it could print counts as failed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from zrecipe.errors import UserError, ZRecipeError

STATUS_ENV = "ZRECIPE_RANK_STATUS"
MARKER = "@@zrecipe-rank-status"
_MARKER_RE = re.compile(rf"^{re.escape(MARKER)} (\d+) (-?\d+)\s*$")
BACKENDS = ("ring", "mpi", "nccl", "jaccl")


def launch_command(
    args: Sequence[str], ranks: int | None, hosts: str | None, hostfile: Path | None, backend: str | None
) -> list[str]:
    """The mlx.launch command line that runs `zrecipe build <args>` on every rank."""
    launcher = shutil.which("mlx.launch")
    if launcher is None:
        raise UserError("mlx.launch was not found on PATH; it comes with MLX (pip install mlx / mlx[cuda]).")
    if backend is not None and backend not in BACKENDS:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(BACKENDS)}.")
    if ranks is not None and ranks < 1:
        raise UserError(f"-n/--ranks {ranks}: needs at least 1 rank.")
    # No --backend: mlx.launch takes the hostfile's, else NCCL with CUDA, else the ring.
    cmd = [launcher] + (["--backend", backend] if backend else [])
    if hostfile is not None:
        if not Path(hostfile).is_file():
            raise UserError(f"--hostfile {hostfile}: no such file (mlx.launch's JSON host list).")
        cmd += ["--hostfile", str(Path(hostfile).resolve())]
    elif hosts:
        cmd += ["--hosts", hosts]
    if ranks is not None:
        cmd += ["-n", str(ranks)]  # with hosts: ranks per host (mlx.launch --repeat-hosts)
    cmd += ["--env", f"{STATUS_ENV}=1", "--", sys.executable, "-m", "zrecipe.cli.main", "build", *args]
    return cmd


def expected_ranks(ranks: int | None, hosts: str | None, hostfile: Path | None) -> int | None:
    """How many ranks the launch starts (None when the hostfile cannot be read here)."""
    per_host = ranks or 1
    if hostfile is not None:
        try:
            return per_host * len(json.loads(Path(hostfile).read_text())["hosts"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return per_host * (len(hosts.split(",")) if hosts else 1)


def relaunch(args: Sequence[str], ranks: int | None, hosts: str | None, hostfile: Path | None,
             backend: str | None = None) -> int:  # fmt: skip
    """Run `zrecipe build <args>` under mlx.launch; returns the build's exit code (rank 0's if it failed,
    else the first failing rank's; 1 when a rank never reported)."""
    cmd = launch_command(args, ranks, hosts, hostfile, backend)
    codes: dict[int, int] = {}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = _MARKER_RE.match(line)
            if m:
                codes[int(m[1])] = int(m[2])
            else:
                sys.stdout.write(line)
                sys.stdout.flush()
        proc.wait()
    except KeyboardInterrupt:
        # The local ranks got the same Ctrl-C: they agree on a step, checkpoint and exit. Give them time;
        # a second Ctrl-C (or a minute) terminates mlx.launch, which stops its ranks.
        try:
            proc.wait(timeout=60)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.terminate()
            proc.wait()
        return 130
    return combine_codes(codes, expected_ranks(ranks, hosts, hostfile))


def combine_codes(codes: dict[int, int], expected: int | None) -> int:
    """One exit code for the whole job from the ranks' codes."""
    if codes.get(0):
        return codes[0]
    failed = [c for _, c in sorted(codes.items()) if c]
    if failed:
        return failed[0]
    if not codes or (expected is not None and len(codes) < expected):
        return 1  # a rank died without reporting (killed, crashed)
    return 0


@contextmanager
def rank_status() -> Iterator[None]:
    """Around a launched rank's build: print its exit code as a marker line for `relaunch`."""
    if not os.environ.get(STATUS_ENV):
        yield
        return
    import click

    code = 1
    try:
        yield
        code = 0
    except ZRecipeError as exc:
        code = exc.exit_code
        raise
    except click.exceptions.Exit as exc:
        code = exc.exit_code
        raise
    except KeyboardInterrupt:
        code = 130
        raise
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        raise
    finally:
        from zrecipe.training.distributed import world

        print(f"{MARKER} {world().rank} {code}", flush=True)
