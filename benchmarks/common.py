"""Helpers shared by the benchmark scripts: per-side child processes, timing statistics, machine
description, RESULTS.md tables.

Every zrecipe-vs-PyTorch comparison measures each side in its own fresh process: `import zrecipe` preloads
a system OpenBLAS for MLX, and with it in the same process PyTorch ran 4.6x slower than alone (OpenBLAS's
spinning worker threads against PyTorch's OpenMP threads). The parent builds a fixture once (reference
weights saved with `save_pretrained`, inputs as .npy, a `spec.json`), then runs R rounds of one child per
side, alternating torch, zrecipe, torch, ... so that load from other processes hits both alike
(`alternate_sides`, `run_side`). A child (`python SCRIPT --side SIDE --fixture DIR`) loads the fixture,
warms up, times k runs (`timed`), saves its final output for the parent's max-relative-difference check and
prints one JSON line. Torch children get `ZRECIPE_BLAS=off`, all cores as PyTorch threads, and never import
zrecipe; zrecipe children import zrecipe before MLX (`prepare_side`). Medians over all R×k samples are
reported with min–max (`pooled`).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MIN_RUNS = 5
SIDES = ("torch", "zrecipe")  # the order of the children in each round
# Environment per side on top of the parent's. The torch side runs as a user would run PyTorch: no OpenBLAS
# preloaded into its process.
SIDE_ENV = {"torch": {"ZRECIPE_BLAS": "off"}, "zrecipe": {}}


def stats(samples: list[float]) -> dict:
    """Median, min, max and count of a list of seconds."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
    }


def timed(fn: Callable[[], Any], runs: int, warmup: int = 1) -> tuple[list[float], Any]:
    """Call `fn` `warmup` times untimed, then `runs` times timed; → (seconds per call, last return value)."""
    for _ in range(warmup):
        fn()
    samples, out = [], None
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        samples.append(time.perf_counter() - start)
    return samples, out


def prepare_side(side: str, threads: int | None = None) -> dict:
    """Set up a child process for `side` before its heavy imports; → facts about it for the report.

    zrecipe: import zrecipe first (it selects MLX's BLAS before mlx.core loads). torch: use `threads`
    (default: every core) and leave zrecipe unimported, so no OpenBLAS of ours shares the process.
    """
    if side == "zrecipe":
        import zrecipe  # noqa: F401  (before mlx.core, see zrecipe.backend)
        from zrecipe.backend import blas_status, heap_status

        return {"blas": blas_status(), "heap": heap_status()}
    if side != "torch":
        raise ValueError(f"unknown side {side!r}; expected one of {SIDES}")
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)
    return {"threads": torch.get_num_threads()}


def run_side(
    script: str | Path, side: str, fixture: str | Path | None = None, args: Sequence[str] = ()
) -> Any:
    """Run `python SCRIPT --side SIDE [--fixture DIR] ARGS` in a fresh process; → its last JSON stdout line.

    The child's environment is this one plus `SIDE_ENV[side]`. A failure (non-zero exit, no JSON line)
    raises RuntimeError carrying the end of the child's stderr, so the cause is not lost.
    """
    cmd = [sys.executable, str(script), "--side", side]
    cmd += ["--fixture", str(fixture)] if fixture is not None else []
    cmd += list(args)
    env = {**os.environ, **SIDE_ENV[side]}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        for line in reversed(proc.stdout.strip().splitlines()):  # libraries may print before the result
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    why = f"exited with {proc.returncode}" if proc.returncode else "printed no JSON line"
    raise RuntimeError(
        f"{Path(script).name} --side {side} {why}: {' '.join(cmd[1:])}\n"
        f"--- stderr (end) ---\n{proc.stderr[-4000:]}\n--- stdout (end) ---\n{proc.stdout[-1000:]}"
    )


def alternate_sides(
    script: str | Path, fixture: str | Path, rounds: int, args: Sequence[str] = ()
) -> dict[str, list]:
    """`rounds` rounds of one child per side (torch, zrecipe, torch, ...); → {side: [child result per round]}."""
    results: dict[str, list] = {side: [] for side in SIDES}
    for _ in range(rounds):
        for side in SIDES:
            results[side].append(run_side(script, side, fixture, args))
    return results


def pooled(children: list[dict], key: str) -> dict:
    """Stats over the samples under `key` of every child result (`{"samples": {key: [...]}}`) of one side."""
    return stats([s for child in children for s in child["samples"][key]])


def max_relative_difference(ours, reference) -> float:
    """max |ours − reference| / max |reference|, in float64."""
    import numpy as np

    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def fmt_s(st: dict, scale: float = 1000.0, unit: str = "ms") -> str:
    """'123.4 ms (110.0–140.2)' from a stats dict."""
    return f"{st['median'] * scale:.1f} {unit} ({st['min'] * scale:.1f}–{st['max'] * scale:.1f})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: report it, don't fail the benchmark
        return "absent"
    return getattr(mod, "__version__", "?")


def machine_info() -> dict:
    """CPU model, cores, RAM, load, library versions and the BLAS MLX uses in this process."""
    from zrecipe.backend import blas_status, heap_status

    # What the environment asked for, read before blas_status() applies ZRECIPE_OPENBLAS_CORETYPE.
    inherited = os.environ.get("OPENBLAS_CORETYPE", "(unset)")
    for_zrecipe = os.environ.get("ZRECIPE_OPENBLAS_CORETYPE", "(unset)")
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_gib() or 0, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "blas": blas_status(),
        "heap": heap_status(),
        "openblas_coretype": f"{inherited} in the environment, ZRECIPE_OPENBLAS_CORETYPE={for_zrecipe}",
    }
    for module in ("mlx", "torch", "diffusers", "transformers", "numpy"):
        if module == "mlx":
            import mlx.core as mx

            info["mlx"] = mx.__version__
            info["mlx_device"] = str(mx.default_device())
        else:
            info[module] = _version(module)
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def add_child_facts(info: dict, children: dict[str, list]) -> dict:
    """`info` with the BLAS and PyTorch thread count that the measuring child processes reported.

    `children` is what `alternate_sides` returned; each result carries the `"info"` of `prepare_side`.
    """
    info["blas"] = children["zrecipe"][-1]["info"]["blas"]
    info["heap"] = children["zrecipe"][-1]["info"].get("heap", "?")
    info["torch_threads"] = children["torch"][-1]["info"]["threads"]
    return info


def machine_lines(info: dict) -> list[str]:
    """Markdown lines describing the machine (for a RESULTS.md section)."""
    return [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"1-min load average at start {info['load_avg_1m']} (shared with other jobs).",
        f"Versions: mlx {info['mlx']} ({info['mlx_device']}), torch {info['torch']}"
        f" ({info.get('torch_threads', '?')} threads), diffusers {info['diffusers']}, "
        f"transformers {info['transformers']}, numpy {info['numpy']}, Python {info['python']}.",
        f"MLX BLAS: {info['blas']}; OPENBLAS_CORETYPE={info['openblas_coretype']}; "
        f"heap: {info.get('heap', '?')}.",
    ]


def write_section(name: str, lines: list[str], path: Path = RESULTS) -> None:
    """Write or replace the block between `<!-- table:NAME -->` and `<!-- /table:NAME -->` in RESULTS.md.

    A missing section is appended at the end; text outside the markers is never touched.
    """
    begin, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    block = "\n".join([begin, *lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table as lines."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out
