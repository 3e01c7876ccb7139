"""LoRA training step on one GPU: zrecipe (mlx[cuda]) vs diffusers ZImageTransformer2DModel on PyTorch, bf16.

    python benchmarks/gpu/gpu_bench.py [--configs bench-small,block-real] [--steps 10] [--warmup 3]
    python benchmarks/gpu/gpu_bench.py --smoke      # CPU, fp32, tiny: checks the code paths anywhere

Both sides: same architecture and sizes, LoRA rank 16 (alpha 16) on attention q/k/v/out of every main
layer, everything else frozen, flow-matching MSE loss, AdamW, one full step (forward, backward, update,
synchronise) per sample. `block-real` is one real-size Z-Image block (dim 3840, 30 heads, FFN 10240,
caption width 2560) on a 1024×1024 image (4096 image tokens) and a 128-token caption, batch 1, with the
real embedders and final layer; `bench-small` is issue 7's CPU config. Prints median step times, achieved
TFLOP/s (matmul FLOPs, counted as in benchmarks/bench_transformer.py) and the time ratio; with
`--json PATH` also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zrecipe  # noqa: E402,F401  (a no-op on a GPU; on a Linux CPU it selects the fast BLAS first)

CONFIGS = {
    "bench-small": dict(dim=768, heads=12, layers=6, refiners=2, cap_dim=256, side=32, caption=64, batch=4),
    "block-real": dict(dim=3840, heads=30, layers=1, refiners=0, cap_dim=2560, side=128, caption=128, batch=1),
    "smoke": dict(dim=64, heads=2, layers=1, refiners=1, cap_dim=32, side=8, caption=16, batch=2),
}  # fmt: skip
RANK = 16


def model_config(c: dict) -> dict:
    head = c["dim"] // c["heads"]
    third = head // 8 * 3 // 2 * 2 if head >= 64 else head // 3 // 2 * 2  # 32/48/48 of 128 like Z-Image
    return {
        "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": c["dim"],
        "n_layers": c["layers"], "n_refiner_layers": c["refiners"], "n_heads": c["heads"],
        "n_kv_heads": c["heads"], "norm_eps": 1e-5, "qk_norm": True, "cap_feat_dim": c["cap_dim"],
        "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": [head - 2 * third, third, third],
        "axes_lens": [1536, 512, 512],
    }  # fmt: skip


def step_flops(c: dict) -> float:
    """Matmul FLOPs a LoRA step must do (forward, then backward down to the first LoRA layer only)."""
    from bench_transformer import count_flops

    return count_flops(c)["lora_step"]


def lora_model(c: dict, dtype: str = "float32"):
    """zrecipe's transformer for config `c`, frozen, with rank-16 LoRA on the main layers' q/k/v/out."""
    import mlx.core as mx

    from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer
    from zrecipe.training.lora import LoRALinear

    cfg = model_config(c)
    model = ZImageTransformer(
        TransformerConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    )
    model.set_dtype(getattr(mx, dtype))
    model.freeze()
    for layer in model.layers:
        att = layer.attention
        att.to_q, att.to_k, att.to_v = (
            LoRALinear.from_base(m, RANK, RANK) for m in (att.to_q, att.to_k, att.to_v)
        )
        att.to_out[0] = LoRALinear.from_base(att.to_out[0], RANK, RANK)
        for m in (att.to_q, att.to_k, att.to_v, att.to_out[0]):
            m.linear.freeze()
    mx.eval(model.parameters())
    return model


def bench_mlx(c: dict, steps: int, warmup: int, dtype: str) -> tuple[list[float], int, int]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx import nn

    model = lora_model(c, dtype)
    b, s = c["batch"], c["side"]
    x0 = mx.random.normal((b, 16, s, s)).astype(getattr(mx, dtype))
    caps = [mx.random.normal((c["caption"], c["cap_dim"])).astype(getattr(mx, dtype)) for _ in range(b)]
    opt = optim.AdamW(learning_rate=1e-4)

    def loss_fn(model, x0, caps, sigma, noise):
        sv = sigma[:, None, None, None].astype(x0.dtype)
        out = model((1 - sv) * x0 + sv * noise, 1 - sigma, caps)
        return mx.mean(((noise - x0) + out).astype(mx.float32) ** 2)  # raw output is −velocity

    vg = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state]

    def step(x0, caps, sigma, noise):
        loss, grads = vg(model, x0, caps, sigma, noise)
        opt.update(model, grads)
        return loss

    step = mx.compile(step, inputs=state, outputs=state)
    # Peak of a forward alone (no graph kept for a backward): the step's peak minus this is what the
    # backward holds, e.g. attention matrices if the fused attention's vjp materialises them.
    mx.reset_peak_memory()
    sigma = mx.random.uniform(shape=(b,))
    mx.eval(loss_fn(model, x0, caps, sigma, mx.random.normal(x0.shape).astype(x0.dtype)))
    forward_peak = mx.get_peak_memory()
    mx.reset_peak_memory()
    times = []
    for i in range(warmup + steps):
        sigma, noise = mx.random.uniform(shape=(b,)), mx.random.normal(x0.shape).astype(x0.dtype)
        mx.eval(sigma, noise)
        start = time.perf_counter()
        loss = step(x0, caps, sigma, noise)
        mx.eval(loss, state)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, mx.get_peak_memory(), forward_peak


def bench_torch(c: dict, steps: int, warmup: int, dtype: str, device: str) -> list[float]:
    import torch
    from diffusers import ZImageTransformer2DModel

    class LoRA(torch.nn.Module):
        """x·W + scale·(x·A)·B with W frozen; never materialises ΔW (like zrecipe's LoRALinear)."""

        def __init__(self, base: torch.nn.Linear):
            super().__init__()
            self.base = base
            self.a = torch.nn.Parameter(
                torch.randn(base.in_features, RANK, device=device, dtype=base.weight.dtype)
                * base.in_features**-0.5
            )
            self.b = torch.nn.Parameter(
                torch.zeros(RANK, base.out_features, device=device, dtype=base.weight.dtype)
            )

        def forward(self, x):
            return self.base(x) + (x @ self.a) @ self.b

    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    model = ZImageTransformer2DModel(**model_config(c)).to(device=device, dtype=tdtype)
    model.requires_grad_(False)
    for layer in model.layers:
        att = layer.attention
        att.to_q, att.to_k, att.to_v = LoRA(att.to_q), LoRA(att.to_k), LoRA(att.to_v)
        att.to_out[0] = LoRA(att.to_out[0])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    b, s = c["batch"], c["side"]
    x0 = torch.randn(b, 16, 1, s, s, device=device, dtype=tdtype)
    caps = [torch.randn(c["caption"], c["cap_dim"], device=device, dtype=tdtype) for _ in range(b)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sigma = torch.rand(b, device=device)
        noise = torch.randn_like(x0)
        sync()
        start = time.perf_counter()
        sv = sigma.view(-1, 1, 1, 1, 1).to(tdtype)
        out = torch.stack(model(list((1 - sv) * x0 + sv * noise), 1 - sigma, caps, return_dict=False)[0])
        loss = ((noise - x0 + out).float() ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, (torch.cuda.max_memory_allocated() if device == "cuda" else 0)


def main(argv: list[str] | None = None) -> dict:
    """Run the configs on both frameworks, print and return {config: numbers}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="bench-small,block-real")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny config, CPU, fp32, 2 steps")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    import mlx.core as mx

    if args.smoke:
        names, steps, warmup, dtype, device = ["smoke"], 2, 1, "float32", "cpu"
    else:
        names, steps, warmup, dtype, device = (
            args.configs.split(","),
            args.steps,
            args.warmup,
            "bfloat16",
            "cuda",
        )
    info = {"mlx": mx.__version__, "mlx_device": str(mx.default_device())}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        torch_ok = not args.skip_torch and (device == "cpu" or torch.cuda.is_available())
    except ImportError:
        torch_ok = False
    print(json.dumps(info))
    results = {"machine": info}
    for name in names:
        c = CONFIGS[name]
        flops = step_flops(c)
        row = {"config": c, "step_tflop": flops / 1e12}
        z, peak, forward_peak = bench_mlx(c, steps, warmup, dtype)
        row["zrecipe"] = {"median": statistics.median(z), "min": min(z), "max": max(z), "peak_bytes": peak,
                          "forward_peak_bytes": forward_peak}  # fmt: skip
        if torch_ok:
            t, peak = bench_torch(c, steps, warmup, dtype, device)
            row["torch"] = {"median": statistics.median(t), "min": min(t), "max": max(t), "peak_bytes": peak}
            row["ratio_zrecipe_over_torch"] = row["zrecipe"]["median"] / row["torch"]["median"]
        for side in ("zrecipe", "torch"):
            if side in row:
                row[side]["tflops"] = flops / row[side]["median"] / 1e12
                print(f"{name:12s} {side:8s} {row[side]['median'] * 1000:9.1f} ms/step "
                      f"({row[side]['min'] * 1000:.1f}–{row[side]['max'] * 1000:.1f}) {row[side]['tflops']:7.1f} TFLOP/s "
                      f"peak {row[side]['peak_bytes'] / 2**30:.2f} GiB")  # fmt: skip
        print(f"{name:12s} zrecipe forward-only peak {row['zrecipe']['forward_peak_bytes'] / 2**30:.2f} GiB")
        if "ratio_zrecipe_over_torch" in row:
            print(f"{name:12s} zrecipe / torch time = {row['ratio_zrecipe_over_torch']:.2f}×")
        results[name] = row
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
