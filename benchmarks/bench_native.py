"""ns per element of exp, SiLU and softmax (forward and VJP) on the CPU: zrecipe's compiled kernels for
each instruction set and thread count, the pure-MLX fallback (`exp_poly` & co., compiled) and MLX's own ops.

    python benchmarks/bench_native.py                 # on one main layer's attention scores, (4, 12, 320, 320)
    python benchmarks/bench_native.py --shape 2 8 1024 1024 --runs 9
    python benchmarks/bench_native.py --exhaustive    # also: max relative error of exp over every float32
                                                      # in [-87, 88] against float64 (minutes)

Not a comparison with PyTorch: it explains the kernels' share of bench_train_step.py / bench_transformer.py.
A multiply (`a * 2`, one memory pass) is the floor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zrecipe  # noqa: F401  (selects MLX's BLAS before MLX loads)


def ns_per_element(fn, x, runs: int) -> float:
    """Median ns per element of mx.eval(fn(x)) after one warm-up."""
    import mlx.core as mx
    from common import stats, timed

    return stats(timed(lambda: mx.eval(fn(x)), runs)[0])["median"] * 1e9 / x.size


def variants():
    """(name, {op: fn}) for MLX's own ops, the pure-MLX fallback and each native instruction set."""
    import mlx.core as mx
    from mlx import nn

    from zrecipe import native
    from zrecipe.models.z_image.kernels import _silu_poly, _softmax_poly, exp_poly

    def vjp(f):
        return lambda x: mx.vjp(f, [x], [x])[1][0]  # the cotangent's values do not matter for timing

    def ops(exp, silu, softmax):
        return {
            "exp": exp,
            "silu": silu,
            "softmax": softmax,
            "silu vjp": vjp(silu),
            "softmax vjp": vjp(softmax),
        }

    mlx_softmax = lambda x: mx.softmax(x, axis=-1, precise=True)  # noqa: E731
    out = [
        ("mx ops", ops(mx.exp, nn.silu, mlx_softmax)),
        ("exp_poly (compiled)", ops(mx.compile(exp_poly), mx.compile(_silu_poly), mx.compile(_softmax_poly))),
    ]
    module = native._load()[0]
    if module is None:
        print(f"native kernels: {native.status()}")
        return out, None
    for isa in module.supported_isas():
        out.append((f"native {isa}", ops(module.exp, module.silu, module.softmax)))
    return out, module


def exhaustive_exp_error(module) -> list[tuple[str, float, float]]:
    """(variant, max relative error, at x) of exp over every float32 in [-87, 88], in chunks."""
    import mlx.core as mx
    import numpy as np

    from zrecipe.models.z_image.kernels import exp_poly

    ranges = [(0x00000000, int(np.float32(88.0).view(np.uint32))),
              (0x80000000, int(np.float32(-87.0).view(np.uint32)))]  # fmt: skip

    def native_exp(isa):
        def run(x):
            module.set_isa(isa)
            return module.exp(x)

        return run

    fns = [("exp_poly", exp_poly)]
    if module is not None:
        fns += [(f"native {isa}", native_exp(isa)) for isa in module.supported_isas()]
    out = []
    for name, fn in fns:
        worst, at = 0.0, 0.0
        for lo, hi in ranges:
            for start in range(lo, hi + 1, 1 << 24):
                bits = np.arange(start, min(hi + 1, start + (1 << 24)), dtype=np.uint32)
                x = bits.view(np.float32)
                y = np.array(fn(mx.array(x))).astype(np.float64)
                exact = np.exp(x.astype(np.float64))
                rel = np.abs(y - exact) / exact
                i = int(rel.argmax())
                if rel[i] > worst:
                    worst, at = float(rel[i]), float(x[i])
        out.append((name, worst, at))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 12, 320, 320])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="native thread counts (default 1 and the default)",
    )
    parser.add_argument("--exhaustive", action="store_true")
    args = parser.parse_args()

    import mlx.core as mx
    from common import machine_info, machine_lines

    print("\n".join(machine_lines(machine_info())))
    x = mx.random.normal(tuple(args.shape)) * 4
    mx.eval(x)
    floor = ns_per_element(lambda a: a * 2, x, args.runs)
    found, module = variants()
    default_threads = module.threads() if module else 1
    thread_counts = args.threads or sorted({1, default_threads})
    rows = []
    for name, ops in found:
        for threads in thread_counts if name.startswith("native") else [None]:
            if module is not None and name.startswith("native"):
                module.set_isa(name.split()[-1])
                module.set_threads(threads)
            label = name if threads is None else f"{name}, {threads} thread{'s' if threads > 1 else ''}"
            rows.append((label, {op: ns_per_element(fn, x, args.runs) for op, fn in ops.items()}))
    if module is not None:
        module.set_threads(default_threads)
        module.set_isa(module.supported_isas()[0])

    op_names = list(rows[0][1])
    print(f"\nns per element on a {tuple(args.shape)} float32 tensor ({x.size / 1e6:.1f} M elements), median of "
          f"{args.runs}; a multiply (one memory pass): {floor:.2f} ns\n")  # fmt: skip
    print("| variant | " + " | ".join(op_names) + " |")
    print("|---|" + "---|" * len(op_names))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(f"{cells[op]:.2f}" for op in op_names) + " |")

    if args.exhaustive:
        print("\nexp against float64 over every float32 in [-87, 88] (2.24e9 values):\n")
        print("| variant | max relative error | at x |\n|---|---|---|")
        for name, worst, at in exhaustive_exp_error(module):
            print(f"| {name} | {worst:.3g} | {at:.9g} |")


if __name__ == "__main__":
    main()
