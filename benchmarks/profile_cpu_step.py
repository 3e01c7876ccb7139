"""Where a CPU LoRA training step (and a VAE encode) spends its time: ablations plus per-op costs.

    python benchmarks/profile_cpu_step.py [--steps 4] [--encode]

bench-small (the config of `bench_train_step.py` / `gpu/gpu_bench.py`), fp32, MLX on the CPU. Prints:
- the compiled LoRA step, the same step with attention replaced by a pass-through of V (same q/k work,
  no softmax or attention matmuls), and the forward alone (with and without attention): medians;
- per-operation times on one main layer's attention scores (4, 12, 320, 320): a multiply (one memory pass),
  the scores' matmul, exp, softmax, tanh, sigmoid, floor, in ms and ns per element;
- sgemm GFLOP/s at the step's own matmul shapes through MLX and numpy;
- with `--encode` (instead): bench_encode.py's full VAE encode (batch 4, 128², channels 32/64/128/128)
  split into convolutions, GroupNorm(+SiLU) and the rest, with the convs' GFLOP/s, and its full text
  encode (Qwen3, hidden 512, 6 layers, 4 captions of ≤ 120 tokens) split into Linear layers, attention,
  SwiGLU and the rest; each op evaluated on its own (eager).
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
    from common import stats, timed

    st = stats(timed(fn, runs)[0])
    return st["median"] * 1000, st["min"] * 1000, st["max"] * 1000


def step_ablations(steps: int) -> dict[str, tuple[float, float, float]]:
    import mlx.core as mx
    import mlx.optimizers as optim
    from gpu_bench import CONFIGS, lora_model
    from mlx import nn

    c = CONFIGS["bench-small"]
    model = lora_model(c)
    b, side = c["batch"], c["side"]
    x0 = mx.random.normal((b, 16, side, side))
    caps = [mx.random.normal((c["caption"], c["cap_dim"])) for _ in range(b)]

    def loss_fn(model, x0, caps, sigma, noise):
        sv = sigma[:, None, None, None]
        return mx.mean(((noise - x0) + model((1 - sv) * x0 + sv * noise, 1 - sigma, caps)) ** 2)

    from zrecipe.models.z_image import transformer_blocks

    def timed(no_attention: bool, backward: bool):
        # The model calls zrecipe's attention (the compiled flash attention on the CPU), not MLX's SDPA.
        real_attention = transformer_blocks.attention
        if no_attention:  # keep q/k in the graph (their norms and RoPE), drop softmax and both matmuls
            transformer_blocks.attention = lambda q, k, v, scale, mask=None, training=False: v + 0 * (q + k)
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
            transformer_blocks.attention = real_attention

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


def op_breakdown(run, patches: dict[str, tuple[object, str]], runs: int) -> tuple[dict[str, float], float]:
    """Median ms per call of `run()` spent inside each patched callable (evaluated on its own), and the
    convolutions' FLOPs per call (for `nn.Conv2d.__call__` patches). `patches`: {label: (owner, name)}."""
    import mlx.core as mx
    from mlx import nn

    spent: dict[str, float] = {}
    originals = {label: getattr(owner, name) for label, (owner, name) in patches.items()}

    def wrap(label, original, method: bool):
        def call(*args, **kwargs):
            start = time.perf_counter()
            out = original(*args, **kwargs)
            mx.eval(out)
            spent[label] += time.perf_counter() - start
            if method and isinstance(args[0], nn.Conv2d):
                kh, kw, cin = args[0].weight.shape[1:]
                spent["conv GFLOP"] += 2 * out.size * kh * kw * cin / 1e9
            return out

        return call

    for label, (owner, name) in patches.items():
        setattr(owner, name, wrap(label, originals[label], isinstance(owner, type)))
    samples: dict[str, list[float]] = {}
    try:
        for i in range(runs + 1):  # the first call is a warm-up
            spent.update({label: 0.0 for label in [*patches, "conv GFLOP"]})
            start = time.perf_counter()
            mx.eval(run())
            if i:
                spent["total"] = time.perf_counter() - start
                for label, value in spent.items():
                    samples.setdefault(label, []).append(value)
    finally:
        for label, (owner, name) in patches.items():
            setattr(owner, name, originals[label])
    flop = statistics.median(samples.pop("conv GFLOP"))
    return {label: statistics.median(v) * 1000 for label, v in samples.items()}, flop


def vae_breakdown(runs: int) -> dict[str, float]:
    """bench_encode.py's full VAE encode: ms in convs / GroupNorm(+SiLU) / the rest, conv GFLOP/s."""
    import tempfile

    import diffusers
    import mlx.core as mx
    import numpy as np
    import torch

    from zrecipe.models.z_image import vae_blocks
    from zrecipe.models.z_image.vae import load_vae

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[32, 64, 128, 128], layers_per_block=2,
            latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        ).save_pretrained(tmp)  # fmt: skip
        vae = load_vae(tmp, dtype="float32")
    mx.eval(vae.parameters())
    x = mx.array(np.random.default_rng(0).uniform(-1, 1, (4, 128, 128, 3)).astype(np.float32))
    patches = {
        "convolutions": (vae_blocks.Conv2d, "__call__"),
        "GroupNorm + SiLU": (vae_blocks.GroupNorm, "__call__"),
    }
    ms, gflop = op_breakdown(lambda: vae.encode(x), patches, runs)
    ms["the rest"] = ms["total"] - ms["convolutions"] - ms["GroupNorm + SiLU"]
    ms["conv GFLOP/s"] = gflop / (ms["convolutions"] / 1000)
    return ms


def text_breakdown(runs: int) -> dict[str, float]:
    """bench_encode.py's full text encode: ms in Linear layers / attention / SwiGLU / the rest."""
    import tempfile

    import mlx.core as mx
    import numpy as np
    import torch
    import transformers
    from mlx import nn

    from zrecipe.models.z_image import text_encoder as te

    torch.manual_seed(0)
    lengths, vocab = [120, 96, 64, 31], 4096
    config = transformers.Qwen3Config(
        vocab_size=vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        transformers.Qwen3ForCausalLM(config).save_pretrained(Path(tmp) / "text_encoder")
        model = te.load_text_encoder(tmp, dtype="float32")
    mx.eval(model.parameters())
    ids = mx.array(np.random.default_rng(0).integers(0, vocab, (4, max(lengths))), dtype=mx.int32)
    mask = mx.array([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    patches = {
        "Linear layers": (nn.Linear, "__call__"),
        "attention": (te, "attention"),
        "SwiGLU": (te, "swiglu"),
    }
    ms, _ = op_breakdown(lambda: model(ids, mask), patches, runs)
    ms["the rest"] = ms["total"] - sum(ms[k] for k in patches)
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--encode", action="store_true", help="only the VAE and text encode breakdowns")
    args = parser.parse_args()
    if args.encode:
        for title, part in (("VAE encode", vae_breakdown), ("text encode", text_breakdown)):
            print(f"{title} (ms per call, each op evaluated on its own):")
            for name, value in part(5).items():
                print(f"  {name:28s} {value:8.1f}")
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
