"""Encoding throughput: VAE encode (images/s) and text encode (captions/s), zrecipe vs diffusers/transformers.

    python benchmarks/bench_encode.py [--quick] [--rounds 3] [--runs 5] [--threads N] [--write]

Same small configs, same weights (built by the PyTorch library and saved once; each side loads them with its
own loader), same inputs, fp32 on the CPU. Each side is measured in its own fresh process (the OpenBLAS
zrecipe loads for MLX slowed PyTorch 4.6x when they shared one; see benchmarks/common.py): per round one
torch child, then one zrecipe child, each warming up once and timing `--runs` calls per case, for
`--rounds` rounds. VAE: a FLUX-shaped 4-level AutoencoderKL (16 latent channels) with narrow channels,
posterior mean of a batch of images. Text: a small Qwen3 with GQA, a batch of captions of different
lengths (right padding), `hidden_states[-2]` as the Z-Image pipeline takes it.
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


CASES = (  # name, config table, unit, the PyTorch library that is zrecipe's peer
    ("vae_encode", VAE, "images/s", "diffusers"),
    ("text_encode", TEXT, "captions/s", "transformers"),
)


def build_fixture(size: str, folder: Path) -> None:
    """Reference weights (save_pretrained) under folder/vae and folder/text/text_encoder; inputs as .npy."""
    import diffusers
    import numpy as np
    import torch
    import transformers

    c = VAE[size]
    torch.manual_seed(0)
    levels = len(c["channels"])
    diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels, block_out_channels=c["channels"], layers_per_block=2,
        latent_channels=16, norm_num_groups=c["groups"], use_quant_conv=False, use_post_quant_conv=False,
    ).save_pretrained(folder / "vae")  # fmt: skip
    np.save(folder / "images.npy", (torch.rand(c["batch"], 3, c["size"], c["size"]) * 2 - 1).numpy())

    c = TEXT[size]
    config = transformers.Qwen3Config(
        vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["intermediate"],
        num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
        head_dim=c["head_dim"], tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder / "text" / "text_encoder")
    lengths = c["lengths"]
    ids = np.random.default_rng(0).integers(0, c["vocab"], size=(len(lengths), max(lengths)))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    np.save(folder / "ids.npy", ids)
    np.save(folder / "mask.npy", mask)


def measure_torch(folder: Path, runs: int) -> tuple[dict, dict]:
    """diffusers / transformers side: {case: seconds per call}, {case: output} (latents NHWC, hidden states)."""
    import diffusers
    import numpy as np
    import torch
    import transformers
    from common import timed

    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae").eval()
    x = torch.from_numpy(np.load(folder / "images.npy"))

    def run_vae():
        with torch.no_grad():
            return vae.encode(x).latent_dist.mean

    text = transformers.Qwen3ForCausalLM.from_pretrained(folder / "text" / "text_encoder").eval()
    ids, mask = torch.from_numpy(np.load(folder / "ids.npy")), torch.from_numpy(np.load(folder / "mask.npy"))

    def run_text():
        with torch.no_grad():  # what the diffusers Z-Image pipeline calls
            return text.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]

    samples, outputs = {}, {}
    samples["vae_encode"], latents = timed(run_vae, runs)
    samples["text_encode"], hidden = timed(run_text, runs)
    outputs["vae_encode"], outputs["text_encode"] = latents.permute(0, 2, 3, 1).numpy(), hidden.numpy()
    return samples, outputs


def measure_zrecipe(folder: Path, runs: int) -> tuple[dict, dict]:
    """zrecipe side: {case: seconds per call}, {case: output} (latents NHWC, hidden states)."""
    import mlx.core as mx
    import numpy as np
    from common import timed

    from zrecipe.models.z_image.text_encoder import load_text_encoder
    from zrecipe.models.z_image.vae import load_vae

    vae = load_vae(folder / "vae", dtype="float32")
    mx.eval(vae.parameters())
    x = mx.array(np.load(folder / "images.npy").transpose(0, 2, 3, 1))
    text = load_text_encoder(folder / "text", dtype="float32")
    mx.eval(text.parameters())
    ids = mx.array(np.load(folder / "ids.npy"), dtype=mx.int32)
    mask = mx.array(np.load(folder / "mask.npy"))

    def run(fn):
        def call():
            out = fn()
            mx.eval(out)
            return out

        return call

    samples, outputs = {}, {}
    samples["vae_encode"], latents = timed(run(lambda: vae.encode(x)), runs)
    samples["text_encode"], hidden = timed(run(lambda: text(ids, mask)), runs)
    outputs["vae_encode"], outputs["text_encode"] = np.array(latents), np.array(hidden)
    return samples, outputs


def child(side: str, folder: Path) -> None:
    """One measuring process: time `side` on the fixture, save its outputs, print one JSON line."""
    import numpy as np
    from common import prepare_side

    spec = json.loads((folder / "spec.json").read_text())
    info = prepare_side(side, spec["threads"])
    measure = measure_zrecipe if side == "zrecipe" else measure_torch
    samples, outputs = measure(folder, spec["runs"])
    for case, out in outputs.items():
        np.save(folder / f"out-{side}-{case}.npy", out)
    print(json.dumps({"samples": samples, "info": info}))


def main(argv: list[str] | None = None) -> dict:
    """Run both comparisons; print them, optionally rewrite the RESULTS.md section, return the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller configs, 2 rounds × 3 runs")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternating")
    parser.add_argument(
        "--runs", type=int, default=5, help="timed calls per process and case, after a warm-up"
    )
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)"
    )
    parser.add_argument("--write", action="store_true", help="rewrite the encode table in RESULTS.md")
    parser.add_argument("--side", choices=("torch", "zrecipe"), help=argparse.SUPPRESS)  # child process
    parser.add_argument("--fixture", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        child(args.side, args.fixture)
        return {}
    size, rounds, runs = ("quick", 2, 3) if args.quick else ("full", args.rounds, args.runs)

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

    results: dict = {"machine": machine_info(), "size": size, "rounds": rounds, "runs_per_round": runs}
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        folder = Path(tmp)
        build_fixture(size, folder)
        (folder / "spec.json").write_text(json.dumps({"runs": runs, "threads": args.threads}))
        children = alternate_sides(Path(__file__), folder, rounds)
        outputs = {
            (side, case): np.load(folder / f"out-{side}-{case}.npy")
            for side in children
            for case, *_ in CASES
        }
        real = np.load(folder / "mask.npy").astype(bool)  # padded positions differ by design
    add_child_facts(results["machine"], children)
    rows = []
    for name, configs, unit, peer in CASES:
        config, items = configs[size], len(outputs[("torch", name)])
        ours, ref = outputs[("zrecipe", name)], outputs[("torch", name)]
        rel = max_relative_difference(*((ours[real], ref[real]) if name == "text_encode" else (ours, ref)))
        z, p = pooled(children["zrecipe"], name), pooled(children["torch"], name)
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
    print(
        f"each side in its own process, {rounds} rounds x {runs} runs; "
        f"torch threads {results['machine']['torch_threads']}"
    )
    if args.write:
        write_section(
            f"encode-{size}",
            [
                *machine_lines(results["machine"]),
                f"fp32; each side ran in its own process (torch without zrecipe's OpenBLAS), {rounds} rounds × "
                f"{runs} runs per side, alternating; ratio = zrecipe time / peer time (target ≤ 1.00×).",
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
