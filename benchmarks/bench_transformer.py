"""Forward time of zrecipe's ZImageTransformer vs diffusers' ZImageTransformer2DModel, same config, same run.

    python benchmarks/bench_transformer.py [--dim 384 --layers 4 --size 32 --caption 100 --repeat 5]

Both run in fp32 on the CPU with the same weights (built by diffusers, saved, loaded by zrecipe) and the
same inputs; prints median seconds per forward, the ratio and the max relative difference of the outputs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import zrecipe  # noqa: F401  imported before mlx.core: selects a fast BLAS for MLX on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height = width (tokens = (size/2)²)")
    parser.add_argument("--caption", type=int, default=100, help="caption tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    import mlx.core as mx
    import numpy as np
    import torch
    from diffusers import ZImageTransformer2DModel

    from zrecipe.backend import blas_status
    from zrecipe.models.z_image.transformer import load_transformer

    head_dim = args.dim // args.heads
    axes = [head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8]  # like 32/48/48 of 128
    config = {
        "dim": args.dim,
        "n_heads": args.heads,
        "n_kv_heads": args.heads,
        "n_layers": args.layers,
        "n_refiner_layers": 1,
        "cap_feat_dim": 256,
        "axes_dims": axes,
        "axes_lens": [1024, 512, 512],
    }
    torch.manual_seed(0)
    reference = ZImageTransformer2DModel(in_channels=16, **config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = load_transformer(tmp, dtype=mx.float32)

    x = torch.randn(args.batch, 16, args.size, args.size)
    t = torch.rand(args.batch)
    caps = [torch.randn(args.caption, 256) for _ in range(args.batch)]
    x_mx, t_mx, caps_mx = mx.array(x.numpy()), mx.array(t.numpy()), [mx.array(c.numpy()) for c in caps]

    def run_torch():
        with torch.no_grad():
            return reference([xi[:, None] for xi in x], t, caps, return_dict=False)[0]

    def run_mlx():
        out = ours(x_mx, t_mx, caps_mx)
        mx.eval(out)
        return out

    runners = {"diffusers": run_torch, "zrecipe": run_mlx}
    samples = {name: [] for name in runners}
    for name, fn in runners.items():
        fn()  # warm-up
    for _ in range(args.repeat):  # interleaved, so load from other processes hits both alike
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    timings = {name: statistics.median(values) for name, values in samples.items()}

    expected = torch.stack([o[:, 0] for o in run_torch()]).numpy()
    diff = np.abs(np.array(run_mlx()) - expected).max() / np.abs(expected).max()
    tokens = (args.size // 2) ** 2
    print(
        f"config: dim {args.dim}, {args.heads} heads, {args.layers} layers, batch {args.batch}, "
        f"{tokens} image + {args.caption} caption tokens; torch threads {torch.get_num_threads()}"
    )
    print(f"MLX BLAS: {blas_status()}")
    for name, seconds in timings.items():
        print(f"  {name:10s} {seconds * 1000:8.1f} ms / forward (median of {args.repeat})")
    print(
        f"  ratio diffusers / zrecipe: {timings['diffusers'] / timings['zrecipe']:.2f}x; "
        f"max relative difference {diff:.2e}"
    )


if __name__ == "__main__":
    main()
