"""Seconds per denoising step: zrecipe's `denoise` vs diffusers' `ZImagePipeline`, same config.

    python benchmarks/bench_denoise.py [--dim 384 --layers 4 --size 32 --caption 100 --steps 6 --guidance 3.5]
                                       [--repeat 3 --rounds 2 --threads N]

Both sample in fp32 on the CPU from the same transformer weights (built by diffusers and saved once; each
side loads them with its own loader), the same initial noise and the same caption embeddings, with CFG on
(positive and negative in one batched call per step) unless `--guidance 0`. Each side is measured in its
own fresh process (the OpenBLAS zrecipe loads for MLX slowed PyTorch 4.6x when they shared one; see
benchmarks/common.py): per round one torch child, then one zrecipe child, each with one warm-up sampling
run and `--repeat` timed ones, for `--rounds` rounds. Prints the median seconds per step over all timed
runs (min–max), the ratio zrecipe / diffusers time (target ≤ 1.00×) and the max relative difference of the
final latents.
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

SCHEDULER = {"shift": 3.0, "num_train_timesteps": 1000}
CAPTION_DIM = 256


def build_fixture(args: argparse.Namespace, folder: Path) -> None:
    """Reference weights (diffusers save_pretrained) under folder/transformer; noise and captions as .npy."""
    import numpy as np
    import torch
    from diffusers import ZImageTransformer2DModel

    head_dim = args.dim // args.heads
    axes = [head_dim - 2 * (3 * head_dim // 8), 3 * head_dim // 8, 3 * head_dim // 8]
    config = dict(
        dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, n_layers=args.layers, n_refiner_layers=1,
        cap_feat_dim=CAPTION_DIM, axes_dims=axes, axes_lens=[1024, 512, 512],
    )  # fmt: skip
    torch.manual_seed(0)
    ZImageTransformer2DModel(in_channels=16, **config).save_pretrained(folder / "transformer")
    np.save(folder / "noise.npy", torch.randn(1, 16, args.size, args.size).numpy())
    np.save(folder / "pos.npy", torch.randn(args.caption, CAPTION_DIM).numpy())
    np.save(folder / "neg.npy", torch.randn(max(1, args.caption // 2), CAPTION_DIM).numpy())


def sampler_torch(folder: Path, spec: dict):
    """A no-argument callable running diffusers' pipeline on the fixture; → final latents (numpy)."""
    import numpy as np
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    reference = ZImageTransformer2DModel.from_pretrained(folder / "transformer").eval()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=None, text_encoder=None, tokenizer=None,
        transformer=reference,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    noise = torch.from_numpy(np.load(folder / "noise.npy"))
    pos, neg = (
        [torch.from_numpy(np.load(folder / "pos.npy"))],
        [torch.from_numpy(np.load(folder / "neg.npy"))],
    )
    pixels = noise.shape[-1] * 8

    def run():
        with torch.no_grad():
            return pipe(
                prompt_embeds=pos, negative_prompt_embeds=neg, latents=noise.clone(), height=pixels,
                width=pixels, guidance_scale=spec["guidance"], num_inference_steps=spec["steps"],
                output_type="latent",
            ).images.numpy()  # fmt: skip

    return run


def sampler_zrecipe(folder: Path, spec: dict):
    """A no-argument callable running zrecipe's `denoise` on the fixture; → final latents (numpy)."""
    import mlx.core as mx
    import numpy as np

    from zrecipe.models.z_image.sampler import SchedulerConfig, denoise
    from zrecipe.models.z_image.transformer import load_transformer

    ours = load_transformer(folder / "transformer", dtype=mx.float32)
    noise = mx.array(np.load(folder / "noise.npy"))
    pos, neg = [mx.array(np.load(folder / "pos.npy"))], [mx.array(np.load(folder / "neg.npy"))]
    scheduler = SchedulerConfig.from_dict(SCHEDULER)

    def run():
        return np.array(denoise(ours, noise, pos, neg, spec["guidance"], spec["steps"], scheduler))

    return run


def child(side: str, folder: Path) -> None:
    """One measuring process: warm-up + timed sampling runs, save the final latents, print one JSON line."""
    import numpy as np
    from common import prepare_side, timed

    spec = json.loads((folder / "spec.json").read_text())
    info = prepare_side(side, spec["threads"])
    run = (sampler_zrecipe if side == "zrecipe" else sampler_torch)(folder, spec)
    samples, out = timed(run, spec["repeat"])
    np.save(folder / f"out-{side}.npy", out)
    print(json.dumps({"samples": {"step": [s / spec["steps"] for s in samples]}, "info": info}))


def main() -> None:
    """Build the fixture, time both sides in alternating child processes, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--size", type=int, default=32, help="latent height = width (image = 8x)")
    parser.add_argument("--caption", type=int, default=100, help="caption tokens (negative: half)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument(
        "--repeat", type=int, default=3, help="timed sampling runs per process, after a warm-up"
    )
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side, alternating")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--side", choices=("torch", "zrecipe"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--fixture", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        child(args.side, args.fixture)
        return

    import numpy as np
    from common import alternate_sides, max_relative_difference, pooled

    with tempfile.TemporaryDirectory(prefix="bench-denoise-") as tmp:
        folder = Path(tmp)
        build_fixture(args, folder)
        spec = {
            "steps": args.steps,
            "guidance": args.guidance,
            "repeat": args.repeat,
            "threads": args.threads,
        }
        (folder / "spec.json").write_text(json.dumps(spec))
        children = alternate_sides(Path(__file__), folder, args.rounds)
        rel = max_relative_difference(np.load(folder / "out-zrecipe.npy"), np.load(folder / "out-torch.npy"))
    t_torch, t_mlx = pooled(children["torch"], "step"), pooled(children["zrecipe"], "step")
    print(
        f"config: dim {args.dim}, heads {args.heads}, layers {args.layers}, latent {args.size}x{args.size} "
        f"({(args.size // 2) ** 2} image tokens), caption {args.caption}, steps {args.steps}, "
        f"guidance {args.guidance}, torch threads {children['torch'][-1]['info']['threads']}; each side in its "
        f"own process, {args.rounds} rounds x {args.repeat} runs"
    )
    for label, st in (("diffusers ZImagePipeline:", t_torch), ("zrecipe denoise (MLX):   ", t_mlx)):
        print(f"{label} {st['median']:.4f} s/step ({st['min']:.4f}–{st['max']:.4f})")
    print(
        f"ratio zrecipe/diffusers:  {t_mlx['median'] / t_torch['median']:.2f}x (target <= 1.00x)   "
        f"max relative difference: {rel:.2e}"
    )


if __name__ == "__main__":
    main()
