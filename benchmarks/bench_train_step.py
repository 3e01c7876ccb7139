"""Training step time: zrecipe's compiled MLX LoRA step vs diffusers `ZImageTransformer2DModel` + peft.

Same transformer config, batch, caption length, LoRA rank and targets (attention q/k/v/out of every main
layer), same optimiser (AdamW), fp32, in one process run. The zrecipe number is the full training step as
the loop runs it (batch assembly, compiled forward + backward + update, one evaluation); the PyTorch
number is zero_grad + forward + MSE + backward + AdamW.step. Medians over the timed steps after warm-up.

    python benchmarks/bench_train_step.py            # bench-small (issue 7): dim 768, 6 layers, 32×32, batch 4
    python benchmarks/bench_train_step.py --small    # a quicker config for busy machines
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zrecipe.backend import configure_blas

configure_blas()

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
        result = train(
            model, examples, np.zeros((4, c["cap_feat_dim"]), np.float32), settings, out, progress=False
        )
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


def _side(side: str, name: str, steps: int, warmup: int) -> list[float]:
    """Time one side in a fresh process. In one process the OpenBLAS loaded for MLX (spinning worker threads)
    slowed PyTorch 4.6x here, so the sides never share a process."""
    import json
    import subprocess

    env = dict(os.environ)
    if side == "torch":
        env["ZRECIPE_BLAS"] = "off"  # PyTorch alone, as a user would run it: no OpenBLAS in its process
    code = (
        f"import json, os, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_train_step as b; "
        f"c = b.CONFIGS[{name!r}]; "
        + ("import torch; torch.set_num_threads(os.cpu_count() or 1); " if side == "torch" else "")
        + f"print(json.dumps(b.bench_{'torch' if side == 'torch' else 'zrecipe'}(c, {steps}, {warmup})))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="quick config instead of bench-small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    name = "small" if args.small else "bench-small"
    print(f"config {name}: {CONFIGS[name]}; fp32 on the CPU, each side in its own process")
    z = _side("zrecipe", name, args.steps, args.warmup)
    zm = statistics.median(z)
    print(f"zrecipe (MLX, compiled LoRA step): median {zm * 1000:.1f} ms/step over {len(z)} steps", flush=True)
    t = _side("torch", name, args.steps, args.warmup)
    tm = statistics.median(t)
    print(f"diffusers + peft (PyTorch):        median {tm * 1000:.1f} ms/step over {len(t)} steps")
    print(f"zrecipe / torch = {zm / tm:.2f}x ({'zrecipe faster' if zm < tm else 'torch faster'})")


if __name__ == "__main__":
    main()
