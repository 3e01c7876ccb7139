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
"""

from __future__ import annotations

import argparse
import json
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
}  # fmt: skip
ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


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


def bench_zrecipe(c: dict, steps: int, warmup: int) -> list[float]:
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
    with tempfile.TemporaryDirectory() as out:
        objective = FlowMatchingObjective.from_settings(
            settings, np.zeros((4, c["cap_feat_dim"]), np.float32)
        )
        result = train(model, examples, objective, settings, out, callbacks=[])
    return [h["time"] for h in result.history[warmup:]]


def bench_torch(c: dict, steps: int, warmup: int) -> list[float]:
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
    return times


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


def main() -> None:
    """Time each side in its own child process (or, with the hidden --side, be that child)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="quick config instead of bench-small")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process, after --warmup")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side, alternating")
    parser.add_argument("--write", action="store_true", help="rewrite the train-step table in RESULTS.md")
    parser.add_argument("--side", choices=("torch", "zrecipe"), help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    name = "small" if args.small else "bench-small"
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
        print(json.dumps({"samples": {"step": bench(CONFIGS[name], args.steps, args.warmup)}, "info": info}))
        return
    c = CONFIGS[name]
    print(f"config {name}: {c}; fp32 on the CPU, each side in its own process", flush=True)
    child_args = [
        *(["--small"] if args.small else []),
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
            "train-step" if name == "bench-small" else "train-step-small",
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
