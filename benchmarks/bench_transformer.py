"""Transformer forward and forward+backward: zrecipe (MLX) vs diffusers ZImageTransformer2DModel, same run.

    python benchmarks/bench_transformer.py [--quick] [--config bench-small] [--runs 5] [--no-backward] [--write]

Both sides run fp32 on the CPU with the same weights (built by diffusers, saved, loaded by zrecipe's loader)
and the same inputs; runs are interleaved (zrecipe, torch, zrecipe, ...) so load from other processes hits
both alike. Forward+backward takes gradients of a LoRA-sized trainable subset on both sides: the attention
q/k/v/out weights of the main layers (everything else frozen), loss = mean(out²). Reported: median seconds
with min–max, achieved GFLOP/s (matmul FLOPs counted below) and the ratio torch / zrecipe (> 1: zrecipe
faster); the target is zrecipe ≤ 1.0× PyTorch's time.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zrecipe  # noqa: E402,F401  imported before mlx.core: selects a fast BLAS for MLX on Linux

CONFIGS = {
    # issue 7's bench-small: dim 768, 12 heads (head_dim 64), 6 + 2 + 2 layers, 32×32 latents, 64 caption tokens
    "bench-small": dict(dim=768, heads=12, layers=6, refiners=2, cap_dim=256, side=32, caption=64, batch=4),
    "quick": dict(dim=256, heads=4, layers=2, refiners=1, cap_dim=64, side=16, caption=32, batch=2),
}  # fmt: skip


def diffusers_config(c: dict) -> dict:
    head = c["dim"] // c["heads"]
    third = head // 3 // 2 * 2
    return {
        "dim": c["dim"], "n_heads": c["heads"], "n_kv_heads": c["heads"], "n_layers": c["layers"],
        "n_refiner_layers": c["refiners"], "cap_feat_dim": c["cap_dim"],
        "axes_dims": [head - 2 * third, third, third], "axes_lens": [1024, 512, 512],
    }  # fmt: skip


def count_flops(c: dict) -> dict:
    """Matmul FLOPs of one forward and of forward+backward with the attention projections trainable.

    Linear: 2·M·N·K; attention: 4·B·H·L²·d (QKᵀ and PV). Backward: every linear's input gradient (≈ its
    forward), the trainable weights' gradients (4·d² per main-layer token) and 2× the attention forward.
    """
    d, b = c["dim"], c["batch"]
    hidden = int(d / 3 * 8)
    n_img = (c["side"] // 2) ** 2
    n_img += -n_img % 32
    n_cap = c["caption"] + (-c["caption"] % 32)
    per_token = 2 * (4 * d * d + 3 * d * hidden)  # q, k, v, out + SwiGLU

    def block(tokens: int, length: int) -> tuple[int, int]:
        return b * tokens * per_token, 4 * b * length * length * d  # linear, attention (H·head_dim = d)

    lin, attn = 0, 0
    for tokens, count in ((n_img, c["refiners"]), (n_cap, c["refiners"]), (n_img + n_cap, c["layers"])):
        bl, ba = block(tokens, tokens)
        lin, attn = lin + count * bl, attn + count * ba
    adaln = min(d, 256)
    lin += 2 * b * (n_img * 64 * d + c["caption"] * c["cap_dim"] * d + n_img * d * 64)  # embedders, final
    lin += 2 * b * adaln * 4 * d * (c["layers"] + c["refiners"])  # adaLN modulation (per item)
    forward = lin + attn
    wgrad = 2 * b * (n_img + n_cap) * 4 * d * d * c["layers"]
    # What a LoRA step on the main layers' attention must compute: the forward, then backward only from the
    # loss down to the first main layer. Input gradients of every main-layer linear except that layer's
    # q/k/v (nothing trainable lies below them), 2× the main layers' attention, the final layer's input
    # gradient; nothing for refiners, embedders or adaLN (frozen, and their inputs need no gradient).
    main_lin, main_attn = block(n_img + n_cap, n_img + n_cap)
    lora_backward = (
        c["layers"] * (main_lin + 2 * main_attn)
        - (2 * b * (n_img + n_cap) * 3 * d * d if c["layers"] else 0)
        + 2 * b * n_img * d * 64
    )
    return {
        "forward": forward,
        "forward_backward": 2 * lin + wgrad + 3 * attn,
        "attention": attn,
        "lora_step": forward + lora_backward,
    }


def build(c: dict):
    """(diffusers model, zrecipe model, torch inputs, mlx inputs) with identical weights and inputs."""
    import mlx.core as mx
    import torch
    from diffusers import ZImageTransformer2DModel

    from zrecipe.models.z_image.transformer import load_transformer

    torch.manual_seed(0)
    reference = ZImageTransformer2DModel(in_channels=16, **diffusers_config(c)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = load_transformer(tmp, dtype=mx.float32)
    b, side = c["batch"], c["side"]
    x, t = torch.randn(b, 16, side, side), torch.rand(b)
    caps = [torch.randn(c["caption"], c["cap_dim"]) for _ in range(b)]
    mlx_in = (mx.array(x.numpy()), mx.array(t.numpy()), [mx.array(f.numpy()) for f in caps])
    return reference, ours, (x, t, caps), mlx_in


def runners(reference, ours, torch_in, mlx_in, backward: bool) -> dict:
    import mlx.core as mx
    import torch
    from mlx import nn

    x, t, caps = torch_in
    frames = [xi[:, None] for xi in x]  # diffusers takes a list of (C, F=1, H, W)
    if not backward:

        def run_torch():
            with torch.no_grad():
                return reference(frames, t, caps, return_dict=False)[0]

        return {"zrecipe": lambda: mx.eval(ours(*mlx_in)), "diffusers": run_torch}

    ours.freeze()
    for layer in ours.layers:
        layer.attention.unfreeze()
        for name in ("norm_q", "norm_k"):  # only the four projections are trainable, as on the torch side
            if name in layer.attention:
                layer.attention[name].freeze()
    value_and_grad = nn.value_and_grad(ours, lambda m: mx.mean(m(*mlx_in) ** 2))
    reference.requires_grad_(False)
    for layer in reference.layers:
        for proj in (
            layer.attention.to_q,
            layer.attention.to_k,
            layer.attention.to_v,
            layer.attention.to_out[0],
        ):
            proj.weight.requires_grad_(True)

    def run_torch():
        out = reference(frames, t, caps, return_dict=False)[0]
        torch.stack(list(out)).pow(2).mean().backward()
        reference.zero_grad(set_to_none=True)

    return {"zrecipe": lambda: mx.eval(value_and_grad(ours)), "diffusers": run_torch}


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; print it, optionally rewrite the RESULTS.md section, return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small 'quick' config, 3 runs")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-small")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (issue 7: 2)")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--write", action="store_true", help="rewrite the transformer table in RESULTS.md")
    args = parser.parse_args(argv)
    name, runs = ("quick", 3) if args.quick else (args.config, args.runs)
    c = CONFIGS[name]

    import numpy as np
    import torch
    from common import fmt_s, interleaved, machine_info, machine_lines, table, write_section

    torch.set_num_threads(args.threads)
    reference, ours, torch_in, mlx_in = build(c)
    with torch.no_grad():
        expected = torch.stack([o[:, 0] for o in reference([xi[:, None] for xi in torch_in[0]], *torch_in[1:],
                                                           return_dict=False)[0]]).numpy()  # fmt: skip
    got = np.array(ours(*mlx_in))
    rel = float(np.abs(got - expected).max() / np.abs(expected).max())
    flops = count_flops(c)
    results = {"config": name, "max_relative_difference": rel, "flops": flops, "machine": machine_info()}
    modes = ["forward"] + ([] if args.no_backward else ["forward_backward"])
    for mode in modes:
        fns = runners(reference, ours, torch_in, mlx_in, backward=mode == "forward_backward")
        timing = interleaved(fns, runs)
        for st in timing.values():
            st["gflops"] = flops[mode] / st["median"] / 1e9
        timing["ratio_torch_over_zrecipe"] = timing["diffusers"]["median"] / timing["zrecipe"]["median"]
        results[mode] = timing
        print(
            f"{mode:17s} zrecipe {fmt_s(timing['zrecipe'])} {timing['zrecipe']['gflops']:.1f} GFLOP/s | "
            f"diffusers {fmt_s(timing['diffusers'])} {timing['diffusers']['gflops']:.1f} GFLOP/s | "
            f"torch/zrecipe {timing['ratio_torch_over_zrecipe']:.2f}x"
        )
    print(f"config {name}: {c}; {flops['forward'] / 1e9:.1f} GFLOP/forward; max rel diff {rel:.1e}")
    if args.write:
        rows = []
        for mode in modes:
            tm = results[mode]
            rows.append([
                mode.replace("_", "+"), fmt_s(tm["zrecipe"]), f"{tm['zrecipe']['gflops']:.1f}",
                fmt_s(tm["diffusers"]), f"{tm['diffusers']['gflops']:.1f}",
                f"{tm['zrecipe']['median'] / tm['diffusers']['median']:.2f}×", "≤ 1.00×",
            ])  # fmt: skip
        write_section(
            f"transformer-{name}{'-coretype' if os.environ.get('OPENBLAS_CORETYPE') else ''}",
            [
                *machine_lines(results["machine"]),
                f"Config `{name}`: {c}; {flops['forward'] / 1e9:.1f} GFLOP per forward "
                f"({flops['attention'] / 1e9:.1f} of it attention), "
                f"{flops['forward_backward'] / 1e9:.1f} per forward+backward; fp32; {runs} interleaved runs; "
                f"max relative difference of the outputs {rel:.1e}.",
                "",
                *table(
                    [
                        "pass",
                        "zrecipe median (min–max)",
                        "GFLOP/s",
                        "diffusers median (min–max)",
                        "GFLOP/s",
                        "zrecipe / torch time",
                        "target",
                    ],
                    rows,
                ),  # fmt: skip
            ],
        )
    return results


if __name__ == "__main__":
    main()
