"""Where a CPU LoRA training step (and a VAE encode) spends its time: ablations plus per-op costs.

    python benchmarks/profile_cpu_step.py [--steps 4] [--vae]

bench-small (the config of `bench_train_step.py` / `gpu/gpu_bench.py`), fp32, MLX on the CPU. Prints:
- the compiled LoRA step, the same step with attention replaced by a pass-through of V (same q/k work,
  no softmax or attention matmuls), and the forward alone (with and without attention): medians;
- per-operation times on one main layer's attention scores (4, 12, 320, 320): a multiply (one memory pass),
  the scores' matmul, exp, softmax, tanh, sigmoid, floor, in ms and ns per element;
- sgemm GFLOP/s at the step's own matmul shapes through MLX and numpy;
- with `--vae`: bench_encode.py's full VAE encode (batch 4, 128², channels 32/64/128/128) split into its
  convolutions, GroupNorm(+SiLU) and the rest, each op evaluated on its own (eager), with the convs'
  achieved GFLOP/s.
Not a comparison (no peer): it explains bench_train_step.py's ratio (benchmarks/RESULTS.md, "Training step").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))

import zrecipe  # noqa: E402,F401  (selects MLX's BLAS before MLX loads)


def median_ms(fn, runs: int) -> tuple[float, float, float]:
    """(median, min, max) milliseconds of `fn()` (which evaluates its own result) after one warm-up."""
    fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples), min(samples), max(samples)


def step_ablations(steps: int) -> dict[str, tuple[float, float, float]]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from gpu_bench import CONFIGS, lora_model
    from mlx import nn

    from zrecipe.models.z_image import transformer_blocks as blocks

    c = CONFIGS["bench-small"]
    model = lora_model(c)
    b, side = c["batch"], c["side"]
    x0 = mx.random.normal((b, 16, side, side))
    caps = [mx.random.normal((c["caption"], c["cap_dim"])) for _ in range(b)]

    def loss_fn(model, x0, caps, sigma, noise):
        sv = sigma[:, None, None, None]
        return mx.mean(((noise - x0) + model((1 - sv) * x0 + sv * noise, 1 - sigma, caps)) ** 2)

    def timed(no_attention: bool, backward: bool):
        sdpa = mx.fast.scaled_dot_product_attention
        if no_attention:  # keep q/k in the graph (their norms and RoPE), drop softmax and both matmuls
            mx.fast.scaled_dot_product_attention = lambda q, k, v, scale, mask=None: v + 0 * (q + k)
        try:
            opt = optim.AdamW(learning_rate=1e-4)
            state = [model.state, opt.state]
            grad_fn = nn.value_and_grad(model, loss_fn)

            def step(*args):
                loss, grads = grad_fn(model, *args)
                opt.update(model, grads)
                return loss

            fn = (
                mx.compile(step, inputs=state, outputs=state)
                if backward
                else mx.compile(lambda *args: loss_fn(model, *args))
            )

            def run():
                sigma, noise = mx.random.uniform(shape=(b,)), mx.random.normal(x0.shape)
                mx.eval(fn(x0, caps, sigma, noise), state)

            return median_ms(run, steps)
        finally:
            mx.fast.scaled_dot_product_attention = sdpa

    _ = blocks  # the transformer calls mx.fast.scaled_dot_product_attention through the module attribute
    return {
        "LoRA step (compiled)": timed(False, True),
        "LoRA step, attention → V": timed(True, True),
        "forward only": timed(False, False),
        "forward only, attention → V": timed(True, False),
    }


def op_costs(runs: int) -> dict[str, tuple[float, float, float]]:
    import mlx.core as mx

    shape = (4, 12, 320, 320)
    s = mx.random.normal(shape)
    q, k = mx.random.normal((4, 12, 320, 64)), mx.random.normal((4, 12, 320, 64))
    mx.eval(s, q, k)
    ops = {
        "a * 2 (one memory pass)": lambda: s * 2.0,
        "q @ kᵀ (scores matmul)": lambda: q @ k.swapaxes(-1, -2),
        "mx.exp": lambda: mx.exp(s),
        "mx.softmax": lambda: mx.softmax(s, axis=-1),
        "mx.tanh": lambda: mx.tanh(s),
        "mx.sigmoid": lambda: mx.sigmoid(s),
        "mx.floor": lambda: mx.floor(s),
    }
    return {name: median_ms(lambda f=f: mx.eval(f()), runs) for name, f in ops.items()}


def sgemm_rates(runs: int) -> dict[str, tuple[float, float]]:
    import mlx.core as mx
    import numpy as np

    out = {}
    for m, kk, n in ((1280, 768, 768), (1280, 768, 2048), (1280, 2048, 768)):
        a, b = mx.random.normal((m, kk)), mx.random.normal((kk, n))
        mx.eval(a, b)
        an, bn = np.array(a), np.array(b)
        flop = 2 * m * kk * n
        t_mlx = median_ms(lambda a=a, b=b: mx.eval(a @ b), runs)[0]
        t_np = median_ms(lambda an=an, bn=bn: an @ bn, runs)[0]
        out[f"{m}×{kk}×{n}"] = (flop / t_mlx / 1e6, flop / t_np / 1e6)
    return out


def vae_breakdown(runs: int) -> dict[str, float]:
    """ms per VAE encode spent in convs / GroupNorm(+SiLU) / the rest, each op evaluated eagerly."""
    import tempfile

    import diffusers
    import mlx.core as mx
    import numpy as np
    import torch
    from mlx import nn

    from zrecipe.models.z_image import vae_blocks
    from zrecipe.models.z_image.vae import load_vae

    torch.manual_seed(0)
    channels = [32, 64, 128, 128]  # bench_encode.py's "full" VAE
    with tempfile.TemporaryDirectory() as tmp:
        diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=channels, layers_per_block=2,
            latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        ).save_pretrained(tmp)  # fmt: skip
        vae = load_vae(tmp, dtype="float32")
    mx.eval(vae.parameters())
    x = mx.array(np.random.default_rng(0).uniform(-1, 1, (4, 128, 128, 3)).astype(np.float32))
    spent = {"conv": 0.0, "norm": 0.0, "conv_flop": 0.0}

    def timing(kind, original):
        def call(self, *args, **kwargs):
            start = time.perf_counter()
            out = original(self, *args, **kwargs)
            mx.eval(out)
            spent[kind] += time.perf_counter() - start
            if kind == "conv":
                kh, kw, cin = self.weight.shape[1:]
                spent["conv_flop"] += 2 * out.size * kh * kw * cin
            return out

        return call

    conv_call, norm_call = nn.Conv2d.__call__, vae_blocks.GroupNorm.__call__
    nn.Conv2d.__call__ = timing("conv", conv_call)
    vae_blocks.GroupNorm.__call__ = timing("norm", norm_call)
    try:
        totals, convs, norms = [], [], []
        for i in range(runs + 1):
            spent.update(conv=0.0, norm=0.0, conv_flop=0.0)
            start = time.perf_counter()
            mx.eval(vae.encode(x))
            if i:  # the first call is a warm-up
                totals.append(time.perf_counter() - start)
                convs.append(spent["conv"])
                norms.append(spent["norm"])
    finally:
        nn.Conv2d.__call__, vae_blocks.GroupNorm.__call__ = conv_call, norm_call
    total, conv, norm = (statistics.median(v) * 1000 for v in (totals, convs, norms))
    return {
        "encode, eager per op (ms)": total,
        "convolutions (ms)": conv,
        "GroupNorm + SiLU (ms)": norm,
        "the rest (ms)": total - conv - norm,
        "conv GFLOP/s": spent["conv_flop"] / (conv / 1000) / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--vae", action="store_true", help="only the VAE encode breakdown")
    args = parser.parse_args()
    if args.vae:
        for name, value in vae_breakdown(5).items():
            print(f"{name:30s} {value:8.1f}")
        return
    for name, (med, lo, hi) in step_ablations(args.steps).items():
        print(f"{name:30s} {med:8.0f} ms ({lo:.0f}–{hi:.0f})")
    print("\nper op on (4, 12, 320, 320) fp32 (4.9 M elements):")
    for name, (med, lo, hi) in op_costs(7).items():
        print(f"{name:30s} {med:8.1f} ms ({lo:.1f}–{hi:.1f})  {med * 1e6 / 4915200:6.2f} ns/element")
    print("\nsgemm at the step's shapes, GFLOP/s (MLX, numpy):")
    for shape, (mlx_rate, np_rate) in sgemm_rates(20).items():
        print(f"{shape:18s} {mlx_rate:6.0f} {np_rate:6.0f}")


if __name__ == "__main__":
    main()
