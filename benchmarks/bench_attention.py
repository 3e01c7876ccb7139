"""Attention alone at 1024² (4,096 image + 128 caption tokens): zrecipe's implementations vs PyTorch's SDPA.

    python benchmarks/bench_attention.py                    # times (forward, forward+backward) and memory
    python benchmarks/bench_attention.py --memory --write   # memory only (repeatable on a loaded machine)
    python benchmarks/bench_attention.py --budgets 18,20,22 # blockwise tile budgets (2^k elements) to try

fp32, q/k/v (B, 12, 4224, 64) (bench-small's heads at 1024²), loss (out · w).sum(), gradients for q, k, v.
Each variant runs in its own fresh process (benchmarks/common.py `run_side`): zrecipe's `blockwise`
(`kernels.blockwise_attention`, the training path; one row per tile budget), `sdpa`
(`mx.fast.scaled_dot_product_attention`, whose CPU backward is the unfused one) and `full` (the one-matrix
polynomial softmax), and PyTorch's `F.scaled_dot_product_attention` (its CPU kernel is flash attention).
Memory: the process's peak RSS (VmHWM, reset before the first call) above its RSS before it, and for MLX
its own peak above what it held before. Times: medians of `--runs` calls after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# No zrecipe import here: the torch child must not load zrecipe's OpenBLAS (common.prepare_side).
HEADS, TOKENS, HEAD_DIM = 12, 4096 + 128, 64


def arrays(batch: int):
    """q, k, v and the loss weights w as numpy fp32 (the same numbers on both sides)."""
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((batch, HEADS, TOKENS, HEAD_DIM), dtype=np.float32) for _ in range(4)]


def run_mlx(variant: str, batch: int, runs: int, budget: int | None) -> dict:
    import mlx.core as mx
    from bench_train_step import peak_rss_mib, reset_peak_rss, rss_mib

    from zrecipe.models.z_image import kernels

    if budget:
        kernels.BLOCK_ELEMENTS = 1 << budget
    attend = {
        "blockwise": lambda q, k, v: kernels.blockwise_attention(q, k, v, HEAD_DIM**-0.5),
        "flash": lambda q, k, v: kernels.flash_attention(q, k, v, HEAD_DIM**-0.5),
        "sdpa": lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=HEAD_DIM**-0.5),
        "full": lambda q, k, v: kernels.full_matrix_attention(q, k, v, HEAD_DIM**-0.5),
    }[variant]
    q, k, v, w = (mx.array(a) for a in arrays(batch))
    mx.eval(q, k, v, w)
    forward = mx.compile(attend)
    step = mx.compile(mx.grad(lambda q, k, v: (attend(q, k, v) * w).sum(), argnums=(0, 1, 2)))
    mx.clear_cache()
    before, mlx_before = rss_mib(), mx.get_active_memory()
    reset_peak_rss()
    mx.reset_peak_memory()
    out = {}
    for name, fn in (("forward", forward), ("forward_backward", step)):
        samples = []
        for i in range(runs + 1):
            start = time.perf_counter()
            mx.eval(fn(q, k, v))
            if i:
                samples.append(time.perf_counter() - start)
        out[name] = statistics.median(samples)
    out["rss_growth_mib"] = peak_rss_mib() - before
    out["mlx_growth_mib"] = (mx.get_peak_memory() - mlx_before) / 2**20
    if variant == "blockwise":
        out["rows"] = kernels.block_rows(batch, HEADS, TOKENS, TOKENS)
    return out


def run_torch(batch: int, runs: int) -> dict:
    import torch
    from bench_train_step import peak_rss_mib, reset_peak_rss, rss_mib

    q, k, v, w = (torch.from_numpy(a) for a in arrays(batch))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    before = rss_mib()
    reset_peak_rss()
    out = {}
    for name in ("forward", "forward_backward"):
        samples = []
        for i in range(runs + 1):
            qq, kk, vv = (t.detach().requires_grad_(name == "forward_backward") for t in (q, k, v))
            start = time.perf_counter()
            if name == "forward":
                with torch.no_grad():
                    sdpa(qq, kk, vv)
            else:
                (sdpa(qq, kk, vv) * w).sum().backward()
            if i:
                samples.append(time.perf_counter() - start)
        out[name] = statistics.median(samples)
    out["rss_growth_mib"] = peak_rss_mib() - before
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--budgets", default="", help="extra blockwise tile budgets, log2 elements (e.g. 20,22)"
    )
    parser.add_argument("--memory", action="store_true", help="one call per pass; write the memory table")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--side", choices=("torch", "zrecipe"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", default="blockwise", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from common import machine_info, machine_lines, prepare_side, run_side, table, write_section

    if args.side:
        info = prepare_side(args.side)
        if args.side == "torch":
            result = run_torch(args.batch, args.runs)
        else:
            result = run_mlx(args.variant, args.batch, args.runs, args.budget or None)
        print(json.dumps({**result, "info": info}))
        return
    runs = 1 if args.memory else args.runs
    variants = [("zrecipe", "flash", 0), ("zrecipe", "blockwise", 0)]
    variants += [("zrecipe", "blockwise", int(b)) for b in args.budgets.split(",") if b]
    variants += [("zrecipe", "sdpa", 0), ("zrecipe", "full", 0), ("torch", "torch", 0)]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        results = {}
        for side, variant, budget in variants:
            extra = [
                "--variant",
                variant,
                "--batch",
                str(batch),
                "--runs",
                str(runs),
                "--budget",
                str(budget),
            ]
            results[(variant, budget)] = r = run_side(Path(__file__), side, args=extra)
            print(f"batch {batch} {variant} {budget or ''}: {r}", flush=True)
        torch_rss = results[("torch", 0)]["rss_growth_mib"]
        for (variant, budget), r in results.items():
            label = {"flash": "zrecipe flash (compiled)", "blockwise": "zrecipe blockwise (pure MLX)", "sdpa": "mx.fast.sdpa", "full": "zrecipe full-matrix",
                     "torch": "PyTorch SDPA"}[variant]  # fmt: skip
            if variant == "blockwise":
                label += f" ({r['rows']} rows" + (f", budget 2^{budget})" if budget else ")")
            row = [str(batch), label, f"{r['rss_growth_mib']:.0f}",
                   f"{r['mlx_growth_mib']:.0f}" if "mlx_growth_mib" in r else "–",
                   f"{r['rss_growth_mib'] / torch_rss:.2f}×"]  # fmt: skip
            if not args.memory:
                row += [f"{r['forward'] * 1e3:.0f}", f"{r['forward_backward'] * 1e3:.0f}"]
            rows.append(row)
    header = ["batch", "implementation", "peak RSS growth MiB", "MLX peak growth MiB", "vs PyTorch (RSS)"]
    if not args.memory:
        header += ["forward ms", "forward+backward ms"]
    lines = table(header, rows)
    print("\n".join(lines))
    if args.write:
        name = "attention-memory-1024" if args.memory else "attention-1024"
        write_section(name, [*machine_lines(machine_info()),
                             f"q, k, v ({args.batches} × {HEADS} × {TOKENS} × {HEAD_DIM}) fp32; forward + backward "
                             "(gradients of q, k, v); each implementation in its own process.", "", *lines])  # fmt: skip


if __name__ == "__main__":
    main()
