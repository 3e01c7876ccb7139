"""Transformer forward and forward+backward: zrecipe (MLX) vs diffusers ZImageTransformer2DModel.

    python benchmarks/bench_transformer.py [--quick] [--config bench-small] [--rounds 3] [--runs 5]
                                           [--threads N] [--no-backward] [--write]

Both sides run fp32 on the CPU with the same weights (built by diffusers and saved once; diffusers and
zrecipe's loader each load them) and the same inputs. Each side is measured in its own fresh process (the
OpenBLAS zrecipe loads for MLX slowed PyTorch 4.6x when they shared one; see benchmarks/common.py): per
round one torch child, then one zrecipe child, each warming up once and timing `--runs` calls, for
`--rounds` rounds. Forward+backward takes gradients of a LoRA-sized trainable subset on both sides: the
attention q/k/v/out weights of the main layers (everything else frozen), loss = mean(out²). Reported:
median seconds over all rounds' runs with min–max, achieved GFLOP/s (matmul FLOPs counted below), the max
relative difference of the forward outputs and the ratio zrecipe / torch time (target ≤ 1.00×).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# No `import zrecipe` here: the torch child must not load zrecipe's OpenBLAS. The zrecipe child imports it
# first thing (common.prepare_side), before mlx.core.

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


def build_fixture(c: dict, folder: Path) -> None:
    """Reference weights (diffusers save_pretrained) under folder/transformer and the inputs as .npy."""
    import numpy as np
    import torch
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    ZImageTransformer2DModel(in_channels=16, **diffusers_config(c)).save_pretrained(folder / "transformer")
    b, side = c["batch"], c["side"]
    np.save(folder / "x.npy", torch.randn(b, 16, side, side).numpy())
    np.save(folder / "t.npy", torch.rand(b).numpy())
    np.save(folder / "caps.npy", torch.randn(b, c["caption"], c["cap_dim"]).numpy())


def _inputs(folder: Path) -> tuple:
    import numpy as np

    return tuple(np.load(folder / f"{name}.npy") for name in ("x", "t", "caps"))


def measure_torch(folder: Path, modes: list[str], runs: int) -> tuple[dict, object]:
    """diffusers side: {mode: seconds per call}, forward output (B, 16, H, W)."""
    import torch
    from common import timed
    from diffusers import ZImageTransformer2DModel

    reference = ZImageTransformer2DModel.from_pretrained(folder / "transformer").eval()
    x, t, caps = (torch.from_numpy(a) for a in _inputs(folder))
    frames, caps = [xi[:, None] for xi in x], list(caps)  # diffusers takes a list of (C, F=1, H, W)

    def forward():
        with torch.no_grad():
            return reference(frames, t, caps, return_dict=False)[0]

    samples = {}
    samples["forward"], out = timed(forward, runs)
    if "forward_backward" in modes:
        reference.requires_grad_(False)
        for layer in reference.layers:
            attention = layer.attention
            for proj in (attention.to_q, attention.to_k, attention.to_v, attention.to_out[0]):
                proj.weight.requires_grad_(True)

        def step():
            out = reference(frames, t, caps, return_dict=False)[0]
            torch.stack(list(out)).pow(2).mean().backward()
            reference.zero_grad(set_to_none=True)

        samples["forward_backward"], _ = timed(step, runs)
    return samples, torch.stack([o[:, 0] for o in out]).numpy()


def measure_zrecipe(folder: Path, modes: list[str], runs: int) -> tuple[dict, object]:
    """zrecipe side: {mode: seconds per call}, forward output (B, 16, H, W)."""
    import mlx.core as mx
    import numpy as np
    from common import timed
    from mlx import nn

    from zrecipe.models.z_image.transformer import load_transformer

    ours = load_transformer(folder / "transformer", dtype=mx.float32)
    x, t, caps = _inputs(folder)
    mlx_in = (mx.array(x), mx.array(t), [mx.array(f) for f in caps])

    def forward():
        out = ours(*mlx_in)
        mx.eval(out)
        return out

    samples = {}
    samples["forward"], out = timed(forward, runs)
    if "forward_backward" in modes:
        ours.freeze()
        for layer in ours.layers:
            layer.attention.unfreeze()
            for name in ("norm_q", "norm_k"):  # only the four projections are trainable, as on the torch side
                if name in layer.attention:
                    layer.attention[name].freeze()
        value_and_grad = nn.value_and_grad(ours, lambda m: mx.mean(m(*mlx_in) ** 2))
        samples["forward_backward"], _ = timed(lambda: mx.eval(value_and_grad(ours)), runs)
    return samples, np.array(out)


def child(side: str, folder: Path) -> None:
    """One measuring process: time `side` on the fixture, save its forward output, print one JSON line."""
    import numpy as np
    from common import prepare_side

    spec = json.loads((folder / "spec.json").read_text())
    info = prepare_side(side, spec["threads"])
    measure = measure_zrecipe if side == "zrecipe" else measure_torch
    samples, out = measure(folder, spec["modes"], spec["runs"])
    np.save(folder / f"out-{side}.npy", out)
    print(json.dumps({"samples": samples, "info": info}))


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; print it, optionally rewrite the RESULTS.md section, return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small 'quick' config, 2 rounds × 3 runs")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-small")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternating")
    parser.add_argument("--runs", type=int, default=5, help="timed calls per process, after one warm-up")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--write", action="store_true", help="rewrite the transformer table in RESULTS.md")
    parser.add_argument("--side", choices=("torch", "zrecipe"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--fixture", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child(args.side, args.fixture)
        return {}
    name, rounds, runs = ("quick", 2, 3) if args.quick else (args.config, args.rounds, args.runs)
    c = CONFIGS[name]

    import numpy as np
    from common import (
        add_child_facts,
        alternate_sides,
        fmt_s,
        machine_info,
        machine_lines,
        max_relative_difference,
        pooled,
        table,
        write_section,
    )  # fmt: skip

    machine = machine_info()
    modes = ["forward"] + ([] if args.no_backward else ["forward_backward"])
    with tempfile.TemporaryDirectory(prefix="bench-transformer-") as tmp:
        folder = Path(tmp)
        build_fixture(c, folder)
        spec = {"modes": modes, "runs": runs, "threads": args.threads}
        (folder / "spec.json").write_text(json.dumps(spec))
        children = alternate_sides(Path(__file__), folder, rounds)
        rel = max_relative_difference(np.load(folder / "out-zrecipe.npy"), np.load(folder / "out-torch.npy"))
    flops = count_flops(c)
    results = {"config": name, "max_relative_difference": rel, "flops": flops, "rounds": rounds,
               "runs_per_round": runs, "machine": add_child_facts(machine, children)}  # fmt: skip
    for mode in modes:
        timing = {"zrecipe": pooled(children["zrecipe"], mode), "diffusers": pooled(children["torch"], mode)}
        for st in timing.values():
            st["gflops"] = flops[mode] / st["median"] / 1e9
        timing["ratio_zrecipe_over_torch"] = timing["zrecipe"]["median"] / timing["diffusers"]["median"]
        results[mode] = timing
        print(
            f"{mode:17s} zrecipe {fmt_s(timing['zrecipe'])} {timing['zrecipe']['gflops']:.1f} GFLOP/s | "
            f"diffusers {fmt_s(timing['diffusers'])} {timing['diffusers']['gflops']:.1f} GFLOP/s | "
            f"zrecipe/torch {timing['ratio_zrecipe_over_torch']:.2f}x (target <= 1.00x)"
        )
    print(
        f"config {name}: {c}; {flops['forward'] / 1e9:.1f} GFLOP/forward; max rel diff {rel:.1e}; each side in "
        f"its own process, {rounds} rounds x {runs} runs; torch threads {results['machine']['torch_threads']}"
    )
    if args.write:
        rows = []
        for mode in modes:
            tm = results[mode]
            rows.append([
                mode.replace("_", "+"), fmt_s(tm["zrecipe"]), f"{tm['zrecipe']['gflops']:.1f}",
                fmt_s(tm["diffusers"]), f"{tm['diffusers']['gflops']:.1f}",
                f"{tm['ratio_zrecipe_over_torch']:.2f}×", "≤ 1.00×",
            ])  # fmt: skip
        write_section(
            f"transformer-{name}",
            [
                *machine_lines(results["machine"]),
                f"Config `{name}`: {c}; {flops['forward'] / 1e9:.1f} GFLOP per forward "
                f"({flops['attention'] / 1e9:.1f} of it attention), "
                f"{flops['forward_backward'] / 1e9:.1f} per forward+backward; fp32; each side ran in its own "
                f"process (torch without zrecipe's OpenBLAS), {rounds} rounds × {runs} runs, alternating; "
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
