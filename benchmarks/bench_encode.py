"""Encoding throughput: VAE encode (images/s) and text encode (captions/s), zrecipe vs diffusers/transformers.

    python benchmarks/bench_encode.py [--quick] [--runs 5] [--threads 2] [--write]

Same small configs, same weights (built by the PyTorch library, saved, loaded by zrecipe's loaders), same
inputs, fp32 on the CPU, interleaved runs. VAE: a FLUX-shaped 4-level AutoencoderKL (16 latent channels)
with narrow channels, posterior mean of a batch of images. Text: a small Qwen3 with GQA, a batch of
captions of different lengths (right padding), `hidden_states[-2]` as the Z-Image pipeline takes it.
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

VAE = {
    "full": dict(channels=[32, 64, 128, 128], groups=32, size=128, batch=4),
    "quick": dict(channels=[16, 32, 32, 32], groups=8, size=64, batch=2),
}
TEXT = {
    "full": dict(hidden=512, intermediate=1536, layers=6, heads=8, kv_heads=4, head_dim=64, vocab=4096,
                 lengths=[120, 96, 64, 31], ),
    "quick": dict(hidden=128, intermediate=384, layers=3, heads=4, kv_heads=2, head_dim=32, vocab=512,
                  lengths=[40, 17]),
}  # fmt: skip


def _rel(ours, ref) -> float:
    import numpy as np

    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def vae_case(c: dict) -> tuple[dict, float, int]:
    """{'zrecipe': fn, 'diffusers': fn}, max relative difference, images per call."""
    import diffusers
    import mlx.core as mx
    import torch

    from zrecipe.models.z_image.vae import load_vae

    torch.manual_seed(0)
    levels = len(c["channels"])
    ref = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=c["channels"], layers_per_block=2,
        latent_channels=16, norm_num_groups=c["groups"], use_quant_conv=False, use_post_quant_conv=False,
    ).eval()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        ours = load_vae(tmp, dtype="float32")
        mx.eval(ours.parameters())
    x = torch.rand(c["batch"], 3, c["size"], c["size"]) * 2 - 1
    x_mx = mx.array(x.permute(0, 2, 3, 1).numpy())

    def run_torch():
        with torch.no_grad():
            return ref.encode(x).latent_dist.mean

    rel = _rel(ours.encode(x_mx), run_torch().permute(0, 2, 3, 1).numpy())
    return {"zrecipe": lambda: mx.eval(ours.encode(x_mx)), "diffusers": run_torch}, rel, c["batch"]


def text_case(c: dict) -> tuple[dict, float, int]:
    """{'zrecipe': fn, 'transformers': fn}, max relative difference (real tokens), captions per call."""
    import mlx.core as mx
    import numpy as np
    import torch
    import transformers

    from zrecipe.models.z_image.text_encoder import load_text_encoder

    config = transformers.Qwen3Config(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        head_dim=c["head_dim"], tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(Path(tmp) / "text_encoder")
        ours = load_text_encoder(tmp, dtype="float32")
        mx.eval(ours.parameters())
    lengths = c["lengths"]
    ids = np.random.default_rng(0).integers(0, c["vocab"], size=(len(lengths), max(lengths)))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    ids_mx, mask_mx = mx.array(ids, dtype=mx.int32), mx.array(mask)

    def run_torch():
        with torch.no_grad():  # what the diffusers Z-Image pipeline calls
            return ref.model(input_ids=ids_t, attention_mask=mask_t, output_hidden_states=True).hidden_states[
                -2
            ]

    expected, got = run_torch().numpy(), np.array(ours(ids_mx, mask_mx))
    real = mask.astype(bool)
    rel = _rel(got[real], expected[real])
    return {"zrecipe": lambda: mx.eval(ours(ids_mx, mask_mx)), "transformers": run_torch}, rel, len(lengths)


def main(argv: list[str] | None = None) -> dict:
    """Run both comparisons; print them, optionally rewrite the RESULTS.md section, return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller configs, 3 runs")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--write", action="store_true", help="rewrite the encode table in RESULTS.md")
    args = parser.parse_args(argv)
    size, runs = ("quick", 3) if args.quick else ("full", args.runs)

    import torch
    from common import fmt_s, interleaved, machine_info, machine_lines, table, write_section

    torch.set_num_threads(args.threads)
    results: dict = {"machine": machine_info(), "size": size}
    rows = []
    for name, case, config, unit in (
        ("vae_encode", vae_case, VAE[size], "images/s"),
        ("text_encode", text_case, TEXT[size], "captions/s"),
    ):
        fns, rel, items = case(config)
        timing = interleaved(fns, runs)
        peer = next(k for k in fns if k != "zrecipe")
        z, p = timing["zrecipe"], timing[peer]
        entry = {
            "config": config, "max_relative_difference": rel, "items_per_call": items, "peer": peer,
            "zrecipe": z, peer: p, "zrecipe_per_s": items / z["median"], "peer_per_s": items / p["median"],
            "time_ratio": z["median"] / p["median"],
        }  # fmt: skip
        results[name] = entry
        print(
            f"{name}: zrecipe {entry['zrecipe_per_s']:.2f} {unit} ({fmt_s(z)}/call) | {peer} "
            f"{entry['peer_per_s']:.2f} {unit} ({fmt_s(p)}/call) | zrecipe/peer time {entry['time_ratio']:.2f}× "
            f"| max rel diff {rel:.1e}"
        )
        rows.append([
            name.replace("_", " "), f"{config}", f"{entry['zrecipe_per_s']:.2f} {unit}", fmt_s(z),
            f"{entry['peer_per_s']:.2f} {unit}", f"{peer}: {fmt_s(p)}", f"{entry['time_ratio']:.2f}×", "≤ 1.00×",
        ])  # fmt: skip
    if args.write:
        write_section(
            f"encode-{size}{'-coretype' if os.environ.get('OPENBLAS_CORETYPE') else ''}",
            [
                *machine_lines(results["machine"]),
                f"fp32, {runs} interleaved runs per side; ratio = zrecipe time / peer time (target ≤ 1.00×).",
                "",
                *table(
                    [
                        "what",
                        "config",
                        "zrecipe",
                        "zrecipe per call (min–max)",
                        "peer",
                        "peer per call",
                        "ratio",
                        "target",
                    ],
                    rows,
                ),  # fmt: skip
            ],
        )
    return results


if __name__ == "__main__":
    main()
