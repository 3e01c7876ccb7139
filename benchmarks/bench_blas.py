"""The machine's matmul peak: 2048² sgemm GFLOP/s through numpy, MLX (bundled BLAS / OpenBLAS) and PyTorch.

    python benchmarks/bench_blas.py [--quick] [--n 2048] [--runs 5] [--write]

Each variant runs in its own subprocess (so one library's spinning BLAS threads never steal cores from
another's), round-robin over `--runs` rounds; each sample is the median of 3 timed calls after a warm-up.
Variants: numpy (its own OpenBLAS), MLX with the reference BLAS bundled in the wheel (`ZRECIPE_BLAS=off`),
MLX with the OpenBLAS zrecipe preloads (as configured), the same with `OPENBLAS_CORETYPE` set from the CPU
flags (an old OpenBLAS that does not know the CPU model falls back to its slowest kernels), PyTorch fp32,
and bf16 through MLX and PyTorch — the numbers behind "fp32 on CPU" in `zrecipe.backend`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

VARIANTS = {
    # name: (library, dtype, extra environment)
    "numpy fp32": ("numpy", "float32", {}),
    "MLX fp32, bundled BLAS": ("mlx", "float32", {"ZRECIPE_BLAS": "off"}),
    "MLX fp32, OpenBLAS (zrecipe default)": ("mlx", "float32", {}),
    "MLX fp32, OpenBLAS + OPENBLAS_CORETYPE": ("mlx", "float32", {"OPENBLAS_CORETYPE": "<cpu>"}),
    "PyTorch fp32": ("torch", "float32", {}),
    "MLX bf16": ("mlx", "bfloat16", {}),
    "PyTorch bf16": ("torch", "bfloat16", {}),
}


def coretype_for_cpu() -> str | None:
    """The OpenBLAS kernel family this CPU supports (zrecipe.backend's choice)."""
    from zrecipe.backend import openblas_coretype

    return openblas_coretype()


def worker(library: str, dtype: str, n: int) -> float:
    """GFLOP/s of an n×n @ n×n matmul: median of 3 timed calls after one warm-up."""
    import numpy as np

    import zrecipe  # noqa: F401  before mlx.core (imported below): selects the BLAS

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    if library == "numpy":
        fn = lambda: a @ b  # noqa: E731
    elif library == "mlx":
        import mlx.core as mx

        x, y = mx.array(a).astype(getattr(mx, dtype)), mx.array(b).astype(getattr(mx, dtype))
        mx.eval(x, y)
        fn = lambda: mx.eval(x @ y)  # noqa: E731
    else:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        x, y = (torch.from_numpy(m).to(getattr(torch, dtype)) for m in (a, b))
        fn = lambda: x @ y  # noqa: E731
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def _installed(library: str) -> bool:
    """A pip-only install has no PyTorch: its rows are left out rather than failing the run."""
    import importlib.util

    return importlib.util.find_spec(library) is not None


def _sample(name: str, n: int) -> float | None:
    library, dtype, extra = VARIANTS[name]
    if not _installed(library):
        return None
    env = dict(os.environ)
    for key, value in extra.items():
        if value == "<cpu>":
            value = coretype_for_cpu()
            if value is None:
                return None
        env[key] = value
    if "OPENBLAS_CORETYPE" not in extra:
        env.pop("OPENBLAS_CORETYPE", None)  # each variant measures exactly what it names
    cmd = [sys.executable, __file__, "--worker", library, dtype, str(n)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    """Run every variant `runs` times round-robin; print and return {variant: GFLOP/s stats}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n=1024, 3 rounds")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="rewrite the blas table in RESULTS.md")
    args = parser.parse_args(argv)
    n, runs = (1024, 3) if args.quick else (args.n, args.runs)

    from common import machine_info, machine_lines, table, write_section

    import zrecipe  # noqa: F401

    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(runs):
        for name in VARIANTS:
            value = _sample(name, n)
            if value is not None:
                samples[name].append(value)
    results = {
        name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
        for name, v in samples.items()
        if v
    }
    results["coretype"] = coretype_for_cpu()
    print(f"{n}² matmul, GFLOP/s (median of {runs} rounds, min–max):")
    for name, st in results.items():
        if isinstance(st, dict):
            print(f"  {name:42s} {st['median']:7.1f}  ({st['min']:.1f}–{st['max']:.1f})")
    if args.write:
        import mlx.core  # noqa: F401  (for the versions in machine_info)

        if _installed("torch"):
            import torch  # noqa: F401

        peak = results["numpy fp32"]["median"]
        rows = [
            [name, f"{st['median']:.1f}", f"{st['min']:.1f}–{st['max']:.1f}", f"{st['median'] / peak:.2f}"]
            for name, st in results.items()
            if isinstance(st, dict)
        ]
        write_section(
            "blas",
            [
                *machine_lines(machine_info()),
                f"{n}×{n} fp32/bf16 matmul, one subprocess per variant and round, {runs} rounds round-robin; "
                f"OPENBLAS_CORETYPE for this CPU: {results['coretype']}.",
                "",
                *table(["variant", "GFLOP/s median", "min–max", "vs numpy fp32"], rows),
            ],
        )
    return results


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        print(worker(sys.argv[2], sys.argv[3], int(sys.argv[4])))
    else:
        main()
