"""Seconds per denoising step: zrecipe's `denoise` vs diffusers' `ZImagePipeline`, same config, same run.

    python benchmarks/bench_denoise.py [--dim 384 --layers 4 --size 32 --caption 100 --steps 6 --guidance 3.5]

Both sample in fp32 on the CPU from the same transformer weights (built by diffusers, saved, loaded by
zrecipe), the same initial noise and the same caption embeddings, with CFG on (positive and negative in one
batched call per step) unless `--guidance 0`. One warm-up run each, then `--repeat` alternating timed rounds
(medians); prints seconds per step, the ratio and the max relative difference of the final latents.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height = width (image = 8x)")
    parser.add_argument("--caption", type=int, default=100, help="caption tokens (negative: half)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    # Must precede `import mlx.core`: zrecipe selects a fast BLAS for MLX on Linux before MLX loads (the
    # reference BLAS is ~25x slower). `isort: split` stops import sorting from moving it below.
    import zrecipe  # noqa: F401

    # isort: split
    import mlx.core as mx
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    from zrecipe.models.z_image.sampler import SchedulerConfig, denoise
    from zrecipe.models.z_image.transformer import load_transformer

    head_dim = args.dim // args.heads
    axes = [head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8]
    config = dict(
        dim=args.dim,
        n_heads=args.heads,
        n_kv_heads=args.heads,
        n_layers=args.layers,
        n_refiner_layers=1,
        cap_feat_dim=256,
        axes_dims=axes,
        axes_lens=[1024, 512, 512],
    )
    torch.manual_seed(0)
    reference = ZImageTransformer2DModel(in_channels=16, **config).eval()
    scheduler_config = {"shift": 3.0, "num_train_timesteps": 1000}
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler_config),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        transformer=reference,
    )
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        ours = load_transformer(tmp, dtype=mx.float32)

    noise = torch.randn(1, 16, args.size, args.size)
    pos = [torch.randn(args.caption, 256)]
    neg = [torch.randn(max(1, args.caption // 2), 256)]
    pixels = args.size * 8

    def run_torch():
        with torch.no_grad():
            return pipe(
                prompt_embeds=pos,
                negative_prompt_embeds=neg,
                latents=noise.clone(),
                height=pixels,
                width=pixels,
                guidance_scale=args.guidance,
                num_inference_steps=args.steps,
                output_type="latent",
            ).images.numpy()

    noise_mx = mx.array(noise.numpy())
    pos_mx, neg_mx = [mx.array(p.numpy()) for p in pos], [mx.array(n.numpy()) for n in neg]
    scheduler = SchedulerConfig.from_dict(scheduler_config)

    def run_mlx():
        return np.array(denoise(ours, noise_mx, pos_mx, neg_mx, args.guidance, args.steps, scheduler))

    # Warm-up (allocations, kernel selection), then alternate the two so that both see the same load on a
    # shared machine; the ratio is the median of the per-round ratios.
    ref_out, our_out = run_torch(), run_mlx()
    t_torch, t_mlx = [], []
    for _ in range(args.repeat):
        for fn, times in ((run_torch, t_torch), (run_mlx, t_mlx)):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) / args.steps)
    ratio = statistics.median(a / b for a, b in zip(t_torch, t_mlx))
    t_torch, t_mlx = statistics.median(t_torch), statistics.median(t_mlx)
    rel = float(np.abs(our_out - ref_out).max() / np.abs(ref_out).max())
    print(
        f"config: dim {args.dim}, heads {args.heads}, layers {args.layers}, latent {args.size}x{args.size} "
        f"({(args.size // 2) ** 2} image tokens), caption {args.caption}, steps {args.steps}, "
        f"guidance {args.guidance}, torch threads {torch.get_num_threads()}"
    )
    print(f"diffusers ZImagePipeline: {t_torch:.4f} s/step")
    print(f"zrecipe denoise (MLX):    {t_mlx:.4f} s/step")
    print(f"ratio diffusers/zrecipe:  {ratio:.2f}x   max relative difference: {rel:.2e}")


if __name__ == "__main__":
    main()
