"""Helpers shared by the benchmark scripts: timing statistics, machine description, RESULTS.md tables.

Every comparison runs both sides in one process and interleaves their runs (A, B, A, B, ...), so load from
other processes on a shared machine hits both alike; medians of at least 5 runs are reported with min–max.
Import this module after `import zrecipe` (which selects MLX's BLAS before MLX loads).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MIN_RUNS = 5


def stats(samples: list[float]) -> dict:
    """Median, min, max and count of a list of seconds."""
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "runs": len(samples),
    }


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, dict]:
    """Time each callable `runs` times, round-robin, after `warmup` untimed calls of each; → {name: stats}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: stats(values) for name, values in samples.items()}


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
    from zrecipe.backend import blas_status

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(_ram_gib() or 0, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "blas": blas_status(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE", "(auto)"),
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


def machine_lines(info: dict) -> list[str]:
    """Markdown lines describing the machine (for a RESULTS.md section)."""
    return [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
        f"1-min load average at start {info['load_avg_1m']} (shared with other jobs).",
        f"Versions: mlx {info['mlx']} ({info['mlx_device']}), torch {info['torch']}"
        f" ({info.get('torch_threads', '?')} threads), diffusers {info['diffusers']}, "
        f"transformers {info['transformers']}, numpy {info['numpy']}, Python {info['python']}.",
        f"MLX BLAS: {info['blas']}; OPENBLAS_CORETYPE={info['openblas_coretype']}.",
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
