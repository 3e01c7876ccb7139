"""Peak memory of loading a transformer vs its size on disk (issue 3: loading should cost ≈ the model).

Writes a random-weight transformer of a chosen config (default: the bench-small config, fp32) in the
diffusers layout, then loads it with `load_transformer` in a fresh process and reports MLX's peak memory
and the process's peak RSS against the weight files' size.

    python benchmarks/bench_load_memory.py [--dim 768 --layers 6] [--write]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import zrecipe  # noqa: F401  (isort: split) — selects the BLAS before MLX loads

SIZES = {
    "dim": 768,
    "n_heads": 12,
    "n_layers": 6,
    "n_refiner_layers": 2,
    "cap_feat_dim": 256,
    "axes_dims": [16, 24, 24],
}


def write_model(folder: Path, sizes: dict) -> int:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer, export_weights

    config = {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
              "in_channels": 16, "n_kv_heads": sizes["n_heads"], "norm_eps": 1e-5, "qk_norm": True,
              "rope_theta": 256.0, "t_scale": 1000.0, "axes_lens": [1024, 512, 512], **sizes}  # fmt: skip
    model = ZImageTransformer(TransformerConfig.from_dict(config))
    mx.eval(model.parameters())
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = export_weights(model)
    mx.save_safetensors(str(folder / "diffusion_pytorch_model.safetensors"), weights)
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


CHILD = """
import json, resource, sys
import zrecipe
import mlx.core as mx
from zrecipe.models.z_image.transformer import load_transformer
m = load_transformer(sys.argv[1], dtype="float32")
print(json.dumps({"mlx_peak": mx.get_peak_memory(), "mlx_active": mx.get_active_memory(),
                  "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=SIZES["dim"])
    parser.add_argument("--layers", type=int, default=SIZES["n_layers"])
    parser.add_argument("--write", action="store_true", help="Rewrite the load-memory section of RESULTS.md.")
    args = parser.parse_args(argv)
    sizes = {**SIZES, "dim": args.dim, "n_layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        params = write_model(folder, sizes)
        disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        base = json.loads(subprocess.run([sys.executable, "-c", "import json,resource;print(json.dumps("
                                          "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024))"],
                                         capture_output=True, text=True, check=True).stdout)  # fmt: skip
        out = json.loads(subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True,
                                        text=True, check=True).stdout.strip().splitlines()[-1])  # fmt: skip
    result = {"config": sizes, "parameter_bytes": params, "disk_bytes": disk, **out, "python_rss": base}
    mib = 2**20
    lines = [
        "| transformer | weights on disk | MLX peak during load | MLX peak / disk | process peak RSS |",
        "|---|---|---|---|---|",
        f"| dim {sizes['dim']}, {sizes['n_layers']}+{sizes['n_refiner_layers']}+{sizes['n_refiner_layers']} "
        f"blocks, fp32 | {disk / mib:.0f} MiB | {out['mlx_peak'] / mib:.0f} MiB | "
        f"{out['mlx_peak'] / disk:.2f}× | {out['rss_peak'] / mib:.0f} MiB |",
    ]
    print("\n".join(lines))
    if args.write:
        from common import write_section  # benchmarks/common.py

        write_section("load-memory", [*lines, "", "MLX peak memory counts the arrays MLX allocated (each tensor "
                      "is read from the safetensors file into its MLX buffer once, no second copy); the RSS "
                      "adds the interpreter, MLX and the BLAS libraries."])  # fmt: skip
    return result


if __name__ == "__main__":
    main()
