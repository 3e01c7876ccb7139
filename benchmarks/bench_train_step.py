"""Training step time: zrecipe's compiled MLX LoRA step vs diffusers `ZImageTransformer2DModel` + peft.

Same transformer config, batch, caption length, LoRA rank and targets (attention q/k/v/out of every main
layer), same optimiser (AdamW), fp32. Each side runs in its own fresh process (benchmarks/common.py
`run_side`: the torch one without zrecipe's OpenBLAS, with every core as PyTorch threads). The zrecipe
number is the full training step as the loop runs it (batch assembly, compiled forward + backward +
update, one evaluation); the PyTorch number is zero_grad + forward + MSE + backward + AdamW.step. Medians
over the timed steps of every round, achieved GFLOP/s (matmul FLOPs a LoRA step must do) and their share
of the machine's peak (numpy 2048² sgemm, measured before and after in the parent process).

    python benchmarks/bench_train_step.py            # bench-small (issue 7): dim 768, 6 layers, 32×32, batch 4
    python benchmarks/bench_train_step.py --small    # a quicker config for busy machines
    python benchmarks/bench_train_step.py --write    # also rewrite the train-step table in RESULTS.md
    python benchmarks/bench_train_step.py --config 1024 --batch 2 --memory --write
        # issue 14: peak memory of one LoRA step at 1024² (4,096 image tokens), zrecipe vs PyTorch

Every child also reports its memory: how far the process's peak RSS (VmHWM, reset just before the first
step through /proc/self/clear_refs) rose above its RSS before the first step, and on the zrecipe side MLX's
own peak (`mx.get_peak_memory`, weights included) and the same peak minus the memory MLX held before the
step. `--memory` writes the memory table instead of the time table (times of a loaded machine are not
recorded; the lead reruns them on a quiet one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# No zrecipe import here: the torch child must not load zrecipe's OpenBLAS (in one process it slowed PyTorch
# 4.6x). The zrecipe child imports zrecipe first thing (common.prepare_side), before mlx.core.

CONFIGS = {
    "bench-small": {"dim": 768, "n_heads": 12, "n_layers": 6, "n_refiner_layers": 2, "cap_feat_dim": 256,
                    "side": 32, "caption_tokens": 64, "batch": 4, "rank": 16},
    "small": {"dim": 256, "n_heads": 4, "n_layers": 2, "n_refiner_layers": 1, "cap_feat_dim": 64, "side": 16,
              "caption_tokens": 32, "batch": 2, "rank": 8},
    # Issue 14's 1024² comparisons (128×128 latents: 4,096 image tokens): `small` (the issue's first
    # measurement) and bench-small's model.
    "small-1024": {"dim": 256, "n_heads": 4, "n_layers": 2, "n_refiner_layers": 1, "cap_feat_dim": 64,
                   "side": 128, "caption_tokens": 32, "batch": 1, "rank": 8},
    "1024": {"dim": 768, "n_heads": 12, "n_layers": 6, "n_refiner_layers": 2, "cap_feat_dim": 256,
             "side": 128, "caption_tokens": 64, "batch": 1, "rank": 16},
}  # fmt: skip
ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


def rss_mib() -> float:
    """This process's resident set size now, MiB (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) restart from the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak RSS since the last reset_peak_rss(), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def transformer_config(c: dict) -> dict:
    head = c["dim"] // c["n_heads"]
    third = head // 3 // 2 * 2
    return {
        "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": c["dim"],
        "n_layers": c["n_layers"], "n_refiner_layers": c["n_refiner_layers"], "n_heads": c["n_heads"],
        "n_kv_heads": c["n_heads"], "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": c["cap_feat_dim"],
        "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (head - 2 * third, third, third),
        "axes_lens": (1024, 512, 512),
    }  # fmt: skip


def bench_zrecipe(c: dict, steps: int, warmup: int) -> tuple[list[float], dict]:
    import mlx.core as mx
    import numpy as np

    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer
    from zrecipe.recipe import LoraTarget, Optimizer
    from zrecipe.training.data import Example
    from zrecipe.training.loop import train
    from zrecipe.training.settings import TrainSettings

    model = ZImageTransformer(TransformerConfig(**transformer_config(c)))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    side, b = c["side"], c["batch"]
    examples = [
        Example(rng.standard_normal((16, side, side), dtype=np.float32),
                rng.standard_normal((c["caption_tokens"], c["cap_feat_dim"]), dtype=np.float32), (side, side))
        for _ in range(b)
    ]  # fmt: skip
    settings = TrainSettings(
        mode="lora", batch_size=b, max_steps=warmup + steps, checkpoint_frequency=10**9, compute_dtype="float32",
        lora_targets=(LoraTarget("layers", 0, None, ATTN, c["rank"], float(c["rank"])),),
        optimizer=Optimizer(learning_rate=1e-4), max_grad_norm=None,
    )  # fmt: skip
    empty = np.zeros((4, c["cap_feat_dim"]), np.float32)
    mx.clear_cache()
    before, mlx_before = rss_mib(), mx.get_active_memory()
    reset_peak_rss()
    with tempfile.TemporaryDirectory() as out:
        objective = FlowMatchingObjective.from_settings(settings, empty)
        result = train(model, examples, objective, settings, out, callbacks=[])
    memory = {"rss_before_mib": before, "rss_growth_mib": peak_rss_mib() - before,
              "mlx_peak_mib": result.peak_memory_bytes / 2**20,
              "mlx_growth_mib": (result.peak_memory_bytes - mlx_before) / 2**20}  # fmt: skip
    return [h["time"] for h in result.history[warmup:]], memory


def bench_torch(c: dict, steps: int, warmup: int) -> tuple[list[float], dict]:
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    cfg = transformer_config(c)
    model = ZImageTransformer2DModel(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    model.requires_grad_(False)
    targets = [f"layers.{i}.{t}" for i in range(c["n_layers"]) for t in ATTN]
    model.add_adapter(
        LoraConfig(r=c["rank"], lora_alpha=c["rank"], target_modules=targets, init_lora_weights=True)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    side, b = c["side"], c["batch"]
    x0 = torch.randn(b, 16, 1, side, side)
    caps = [torch.randn(c["caption_tokens"], c["cap_feat_dim"]) for _ in range(b)]
    times = []
    before = rss_mib()
    reset_peak_rss()
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        sigma = torch.rand(b)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        xs = (1 - s) * x0 + s * noise
        optimizer.zero_grad(set_to_none=True)
        out = model(list(xs), 1 - sigma, caps, return_dict=False)[0]
        out = torch.stack(list(out))
        loss = torch.mean((x0 - out - noise) ** 2)
        loss.backward()
        optimizer.step()
        loss.item()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return times, {"rss_before_mib": before, "rss_growth_mib": peak_rss_mib() - before}


def step_flops(c: dict) -> float:
    """Matmul FLOPs a LoRA step must do (`bench_transformer.count_flops(...)["lora_step"]`)."""
    from bench_transformer import count_flops

    keys = {"dim": "dim", "layers": "n_layers", "refiners": "n_refiner_layers", "cap_dim": "cap_feat_dim",
            "side": "side", "caption": "caption_tokens", "batch": "batch"}  # fmt: skip
    return count_flops({k: c[v] for k, v in keys.items()})["lora_step"]


def numpy_sgemm_gflops(n: int = 2048, runs: int = 5) -> float:
    """The machine's fp32 matmul peak as issue 7 defines it: numpy n×n sgemm, median GFLOP/s."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    a @ a
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def memory_table(args, name: str) -> None:
    """Peak memory of a LoRA step, each side in its own process, one batch size after the other."""
    from common import add_child_facts, machine_info, machine_lines, run_side, table, write_section

    c = CONFIGS[name]
    rows, children = [], {"torch": [], "zrecipe": []}
    for batch in args.batches:
        child_args = ["--config", name, "--batch", str(batch), "--steps", str(args.steps), "--warmup", "0"]
        got = {}
        for side in ("zrecipe", "torch"):
            got[side] = run_side(Path(__file__), side, args=child_args)
            children[side].append(got[side])
            print(f"  batch {batch} {side}: {got[side]['memory']}", flush=True)
        z, t = got["zrecipe"]["memory"], got["torch"]["memory"]
        ratio = z["rss_growth_mib"] / t["rss_growth_mib"]
        rows.append([str(batch), f"{z['rss_growth_mib']:.0f}", f"{z['mlx_growth_mib']:.0f}",
                     f"{z['mlx_peak_mib']:.0f}", f"{t['rss_growth_mib']:.0f}", f"{ratio:.2f}×"])  # fmt: skip
    header = ["batch", "zrecipe RSS growth MiB", "MLX peak above start MiB", "MLX peak MiB (weights incl.)",
              "diffusers + peft RSS growth MiB", "zrecipe / PyTorch (RSS growth)"]  # fmt: skip
    lines = table(header, rows)
    print("\n".join(lines))
    if args.write:
        info = add_child_facts(machine_info(), children)
        write_section(
            f"train-memory-{name}",
            [
                *machine_lines(info),
                f"Config `{name}`: {c} (batch as in the table); fp32; LoRA rank {c['rank']} on attention "
                f"q/k/v/out of the main layers, AdamW; {args.steps} steps per process, each side in its own "
                "process; RSS growth = peak RSS during the steps (VmHWM, reset before the first) minus the "
                "RSS before them (model, data and libraries already loaded).",
                "",
                *lines,
            ],
        )


def main() -> None:
    """Time each side in its own child process (or, with the hidden --side, be that child)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="quick config instead of bench-small")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="config by name (default bench-small)")
    parser.add_argument("--batch", type=int, help="batch size instead of the config's")
    parser.add_argument("--memory", action="store_true", help="measure peak memory, write its table")
    parser.add_argument("--batches", type=lambda v: [int(b) for b in v.split(",")], default=[1, 2],
                        help="batch sizes of --memory (default 1,2)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, after --warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side, alternating")
    parser.add_argument("--write", action="store_true", help="rewrite the train-step table in RESULTS.md")
    parser.add_argument("--side", choices=("torch", "zrecipe"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    name = args.config or ("small" if args.small else "bench-small")
    if args.batch:
        CONFIGS[name] = {**CONFIGS[name], "batch": args.batch}
    from common import (
        add_child_facts,
        fmt_s,
        machine_info,
        machine_lines,
        pooled,
        prepare_side,
        run_side,
        table,
        write_section,
    )

    if args.side:
        info = prepare_side(args.side)
        bench = bench_zrecipe if args.side == "zrecipe" else bench_torch
        times, memory = bench(CONFIGS[name], args.steps, args.warmup)
        print(json.dumps({"samples": {"step": times}, "memory": memory, "info": info}))
        return
    if args.memory:
        memory_table(args, name)
        return
    c = CONFIGS[name]
    print(f"config {name}: {c}; fp32 on the CPU, each side in its own process", flush=True)
    child_args = [
        "--config",
        name,
        *(["--batch", str(args.batch)] if args.batch else []),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
    ]
    peaks = [numpy_sgemm_gflops()]
    children: dict[str, list] = {"torch": [], "zrecipe": []}
    for _ in range(args.rounds):  # alternate fresh processes so load from other jobs hits both alike
        for side in ("zrecipe", "torch"):
            children[side].append(run_side(Path(__file__), side, args=child_args))
            print(f"  {side}: {[round(t, 3) for t in children[side][-1]['samples']['step']]} s", flush=True)
    peaks.append(numpy_sgemm_gflops())
    peak, flops = statistics.median(peaks), step_flops(c)
    st = {side: pooled(children[side], "step") for side in children}
    ratio = st["zrecipe"]["median"] / st["torch"]["median"]
    rows = []
    for side, label in (
        ("zrecipe", "zrecipe (MLX, compiled LoRA step)"),
        ("torch", "diffusers + peft (PyTorch)"),
    ):
        gflops = flops / st[side]["median"] / 1e9
        rows.append([label, fmt_s(st[side]), f"{gflops:.0f}", f"{gflops / peak:.0%}"])
        print(
            f"{label:36s} {fmt_s(st[side])}/step  {gflops:.0f} GFLOP/s ({gflops / peak:.0%} of numpy sgemm)"
        )
    print(
        f"zrecipe / torch = {ratio:.2f}x; LoRA step {flops / 1e9:.0f} GFLOP; numpy 2048² sgemm {peak:.0f} GFLOP/s"
    )
    if args.write:
        info = add_child_facts(machine_info(), children)
        write_section(
            "train-step" if name == "bench-small" else f"train-step-{name}",
            [
                *machine_lines(info),
                f"Config `{name}`: {c}; fp32; LoRA rank {c['rank']} on attention q/k/v/out of the main layers, "
                f"AdamW; each side in its own process, {args.rounds} rounds × {args.steps} steps after "
                f"{args.warmup} warm-up steps, alternating; {flops / 1e9:.0f} GFLOP of matmuls per step "
                f"(`count_flops()['lora_step']`); machine peak = numpy 2048² sgemm in the same run, "
                f"{peak:.0f} GFLOP/s (before/after: {peaks[0]:.0f}, {peaks[1]:.0f}).",
                "",
                *table(["side", "ms / step (min–max)", "GFLOP/s", "of numpy peak"], rows),
                "",
                f"**zrecipe / PyTorch = {ratio:.2f}×** (target ≤ 1.00×"
                + (", not met)" if ratio > 1 else ", met)"),
            ],
        )


if __name__ == "__main__":
    main()
