"""Captioning throughput: captions/s through the caption step's path (mlx-vlm, greedy, one image a call).

    python benchmarks/bench_captions.py                         # tiny-vlm (Qwen2-VL layout) on this device
    python benchmarks/bench_captions.py --config qwen2-vl-2b    # the real Qwen2-VL-2B sizes, random bf16 weights
    options: --family qwen2_vl|qwen2_5_vl  --images 16  --max-tokens 32  --size 384  --runs 3  --write

The model is written by `zrecipe.models.vlm.tiny.create_tiny_vlm` (random weights, the hub layout; for
`qwen2-vl-2b` the published config's sizes: 1.5B-parameter text model, 28 layers, 675M-parameter vision
tower, vocabulary 151,936 rows; `max_pixels` 512², so a 384² image is 196 image tokens) into a temporary
folder, loaded once by `zrecipe.models.vlm.caption.Captioner` as the build step loads it, then each run
captions `--images` distinct `--size`² images one by one, as the step does. Random weights rarely emit an
end-of-sequence token, so nearly every caption runs to `--max-tokens`: the time per caption is prompt
processing (the image tokens) plus `--max-tokens` decoding steps. Reported: model load seconds, captions/s
and generated tokens/s (median of `--runs`, with min–max), prompt tokens per caption, peak memory (MLX's
on a GPU, the process's peak RSS on the CPU). `--write` records the result in benchmarks/RESULTS.md.
The real-size config needs ~14 GB of host memory to write its weights and ~5 GB of device memory: run it on a
GPU (mlx[cuda]) or Apple silicon, not on a small CPU machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zrecipe  # noqa: F401  (selects MLX's BLAS before mlx.core loads)

CONFIGS = {"tiny": ("TINY_DIMS", "float32"), "qwen2-vl-2b": ("QWEN2_VL_2B", "bfloat16")}


def images(n: int, size: int):
    import numpy as np
    from PIL import Image

    out = []
    for i in range(n):
        rng = np.random.RandomState(i)
        blocks = np.kron(rng.rand(8, 8, 3), np.ones((size // 8, size // 8, 1)))
        out.append(Image.fromarray((blocks * 255).astype(np.uint8)))
    return out


def peak_memory_gb() -> float:
    import mlx.core as mx

    if mx.default_device() == mx.gpu:
        return mx.get_peak_memory() / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--family", choices=("qwen2_vl", "qwen2_5_vl"), default="qwen2_vl")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="record the result in benchmarks/RESULTS.md")
    args = ap.parse_args()

    import mlx.core as mx

    from zrecipe.models.vlm import tiny
    from zrecipe.models.vlm.caption import Captioner

    dims_name, dtype = CONFIGS[args.config]
    pictures = images(args.images, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        folder = tiny.create_tiny_vlm(
            Path(tmp) / "vlm", args.family, dims=getattr(tiny, dims_name), dtype=dtype
        )
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        captioner = Captioner(folder, name=args.config)
        load_s = time.perf_counter() - t0
        captioner.caption(pictures[0], "warm-up", "Describe this image.", 4)  # compile / first-call costs
        seconds, tokens, prompt = [], [], []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            made = [captioner.caption(p, f"image {i}", "Describe this image.", args.max_tokens)
                    for i, p in enumerate(pictures)]  # fmt: skip
            seconds.append(time.perf_counter() - t0)
            tokens.append(sum(c.tokens for c in made))
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.utils import prepare_inputs

        text = apply_chat_template(
            captioner.processor, captioner.model.config, "Describe this image.", num_images=1
        )
        prompt = prepare_inputs(captioner.processor, images=[pictures[0]], prompts=[text],
                                image_token_index=captioner.model.config.image_token_id)["input_ids"].shape[1]  # fmt: skip
    rates = [args.images / s for s in seconds]
    result = {
        "config": args.config,
        "family": args.family,
        "device": str(mx.default_device()),
        "dtype": dtype,
        "images": args.images,
        "size": args.size,
        "max_tokens": args.max_tokens,
        "prompt_tokens": int(prompt),
        "write_model_s": round(write_s, 2),
        "load_s": round(load_s, 2),
        "captions_per_s": round(statistics.median(rates), 3),
        "captions_per_s_min_max": [round(min(rates), 3), round(max(rates), 3)],
        "tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens, seconds, strict=True)), 1),
        "tokens_per_caption": round(statistics.median(tokens) / args.images, 1),
        "peak_memory_gb": round(peak_memory_gb(), 2),
        "runs": args.runs,
    }
    print(json.dumps(result))
    if args.write:
        from common import machine_info, machine_lines, write_section

        lines = [
            f"`python benchmarks/bench_captions.py --config {args.config} --family {args.family} --images "
            f"{args.images} --max-tokens {args.max_tokens} --size {args.size} --runs {args.runs}`",
            "",
            "| config | device | images/run | prompt tokens | tokens/caption | captions/s (min–max) | tokens/s | "
            "load s | peak GB |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {args.config} ({args.family}, {dtype}) | {result['device']} | {args.images} | {prompt} | "
            f"{result['tokens_per_caption']} | {result['captions_per_s']} "
            f"({result['captions_per_s_min_max'][0]}–{result['captions_per_s_min_max'][1]}) | "
            f"{result['tokens_per_s']} | {result['load_s']} | {result['peak_memory_gb']} |",
            "",
            *machine_lines(machine_info()),
        ]
        write_section(f"captions-{args.config}", lines)


if __name__ == "__main__":
    main()
