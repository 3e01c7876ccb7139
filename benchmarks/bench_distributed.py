"""Data-parallel training on this machine: 1 rank vs 2 ranks (`mlx.launch -n 2 --backend ring`, loopback).

Three runs of the same LoRA training (global batch 4, fp32, the `small` transformer of bench_train_step):

    1 rank, batch 4     the single-process baseline;
    2 ranks, batch 4    each rank trains 2 items of every batch, gradients summed with all_sum (also
                        with OPENBLAS_NUM_THREADS=1 per rank, so 2 ranks do not oversubscribe 2 cores);
    1 rank, batch 2     one rank's share of the work alone: 2 ranks' step time minus this is what data
                        parallelism costs per step (communication + waiting for the slower rank).

The 2-rank worker then times the collectives alone: the bucketed gradient all_sum of this LoRA, the
per-step statistics all_sum (losses, items/s, stop flag), and a 64 MiB all_sum — about the fp32 gradient
of a rank-16 attention LoRA on the real 6B Z-Image — for the loopback bandwidth. Each configuration runs
`--rounds` times in alternation (1, 2, 1b, 1, 2, 1b, ...) so load from other jobs hits all alike.

    python benchmarks/bench_distributed.py [--steps 20] [--rounds 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

import zrecipe  # noqa: E402,F401  (selects MLX's BLAS before MLX loads)

BIG_BYTES = 64 * 2**20
# (label, ranks, global batch, OpenBLAS threads per rank or None for the library's default: all cores)
RUNS = (
    ("1 rank, batch 4", 1, 4, None),
    ("2 ranks, batch 4", 2, 4, None),
    ("2 ranks, batch 4, 1 BLAS thread each", 2, 4, 1),
    ("1 rank, batch 2", 1, 2, None),
)


def _timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def worker(args) -> None:
    """One rank: train, then (2 ranks) time the collectives; rank 0 writes the JSON result."""
    import mlx.core as mx
    import numpy as np
    from bench_train_step import ATTN, CONFIGS, transformer_config
    from mlx.utils import tree_flatten, tree_map

    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer
    from zrecipe.recipe import LoraTarget, Optimizer
    from zrecipe.training import distributed as dist
    from zrecipe.training.data import Example
    from zrecipe.training.loop import train
    from zrecipe.training.settings import TrainSettings

    c = CONFIGS["small"]
    w = dist.world()
    mx.random.seed(0)
    model = ZImageTransformer(TransformerConfig(**transformer_config(c)))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    side = c["side"]
    examples = [
        Example(rng.standard_normal((16, side, side), dtype=np.float32),
                rng.standard_normal((c["caption_tokens"], c["cap_feat_dim"]), dtype=np.float32), (side, side))
        for _ in range(8)
    ]  # fmt: skip
    settings = TrainSettings(
        mode="lora", batch_size=args.batch, max_steps=args.warmup + args.steps, checkpoint_frequency=10**9,
        lora_targets=(LoraTarget("layers", 0, None, ATTN, c["rank"], float(c["rank"])),),
        optimizer=Optimizer(learning_rate=1e-4), max_grad_norm=1.0,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        objective = FlowMatchingObjective.from_settings(
            settings, np.zeros((4, c["cap_feat_dim"]), np.float32)
        )
        result = train(model, examples, objective, settings, out, callbacks=[])
    step = statistics.median(h["time"] for h in result.history[args.warmup :])
    report = {"ranks": w.size, "batch": args.batch, "step_s": step, "items_per_s": args.batch / step}
    if w.distributed:
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
        n_bytes = sum(v.nbytes for _, v in tree_flatten(grads))
        stats = [0.0] * (1 + w.size + 1)
        big = mx.zeros((BIG_BYTES // 4,), dtype=mx.float32)
        mx.eval(grads, big)
        dist.barrier(w)
        grad_s = _timed(lambda: mx.eval(dist.sum_gradients(grads, w)), 30)
        stats_s = _timed(lambda: dist.all_sum(stats, w), 30)
        big_s = _timed(lambda: mx.eval(mx.distributed.all_sum(big, group=w.group)), 5)
        report.update(
            grad_bytes=n_bytes,
            grad_arrays=len(tree_flatten(grads)),
            grad_allsum_s=statistics.median(grad_s),
            stats_allsum_s=statistics.median(stats_s),
            big_allsum_s=statistics.median(big_s),
        )
    if w.main:
        Path(args.out).write_text(json.dumps(report))


def run_one(ranks: int, batch: int, threads: int | None, steps: int, warmup: int, out: Path) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--batch", str(batch), "--steps", str(steps),
           "--warmup", str(warmup), "--out", str(out)]  # fmt: skip
    env = ["--env", f"OPENBLAS_NUM_THREADS={threads}"] if threads else []
    if ranks > 1:
        launcher = shutil.which("mlx.launch")
        if launcher is None:
            raise SystemExit("mlx.launch not found")
        cmd = [launcher, "-n", str(ranks), "--backend", "ring", *env, "--", *cmd]
    elif threads:
        cmd = ["env", f"OPENBLAS_NUM_THREADS={threads}", *cmd]
    out.unlink(missing_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if not out.exists():
        raise SystemExit(f"run failed ({' '.join(cmd)}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="update benchmarks/RESULTS.md")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    from common import machine_info, machine_lines, table, write_section

    info = machine_info()
    results: dict[str, list[dict]] = {name: [] for name, *_ in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for name, ranks, batch, threads in RUNS:
                run = run_one(ranks, batch, threads, args.steps, args.warmup, Path(tmp) / "r.json")
                results[name].append(run)
                print(name, results[name][-1], flush=True)
    med = {name: statistics.median(r["step_s"] for r in rs) for name, rs in results.items()}
    two = results["2 ranks, batch 4"]
    comm = {
        k: statistics.median(r[k] for r in two) for k in ("grad_allsum_s", "stats_allsum_s", "big_allsum_s")
    }
    summary = {
        "step_s": med,
        **comm,
        "grad_bytes": two[0]["grad_bytes"],
        "grad_arrays": two[0]["grad_arrays"],
    }
    batch = {name: b for name, _, b, _ in RUNS}
    rows = [
        [name, f"{med[name] * 1000:.1f}", f"{min(r['step_s'] for r in rs) * 1000:.1f}–"
         f"{max(r['step_s'] for r in rs) * 1000:.1f}", f"{batch[name] / med[name]:.1f}",
         f"{(batch[name] / med[name]) / (4 / med['1 rank, batch 4']):.2f}"]
        for name, rs in results.items()
    ]  # fmt: skip
    overhead = med["2 ranks, batch 4"] - med["1 rank, batch 2"]
    gbps = BIG_BYTES / comm["big_allsum_s"] / 1e9
    lines = [
        *machine_lines(info),
        "LoRA training, `small` transformer of bench_train_step (dim 256, 2 layers, 16×16 latents, 32 "
        f"caption tokens, rank 8 on attention), fp32, global batch 4, {args.steps} timed steps after "
        f"{args.warmup} "
        f"warm-up; medians of {args.rounds} alternating runs per row (min–max of the run medians).",
        "",
        *table(["run", "ms / step", "min–max", "items/s", "throughput vs 1 rank"], rows),
        "",
        f"Data-parallel cost per step (2 ranks × batch 2 minus 1 rank × batch 2): {overhead * 1000:.1f} ms "
        f"({overhead / med['2 ranks, batch 4'] * 100:.0f}% of the 2-rank step) — on one 2-core machine "
        "this is mostly the two ranks sharing the cores, not communication:",
        f"Collectives alone (2 ranks, loopback ring): gradient all_sum of the LoRA ({two[0]['grad_arrays']} "
        f"arrays, {two[0]['grad_bytes'] / 1024:.0f} KiB, bucketed into one message) "
        f"{comm['grad_allsum_s'] * 1000:.2f} ms; per-step statistics all_sum "
        f"{comm['stats_allsum_s'] * 1000:.2f} ms; "
        f"64 MiB all_sum {comm['big_allsum_s'] * 1000:.0f} ms ({gbps:.2f} GB/s of payload).",
    ]
    print("\n".join(lines))
    if args.write:
        write_section("distributed", lines)
    return summary


if __name__ == "__main__":
    main()
