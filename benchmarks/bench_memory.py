"""The training-memory estimate (`zrecipe.training.memory`) against measured peaks, and the real-model table.

    python benchmarks/bench_memory.py                  # 24 cases: LoRA / full × 3 resolutions × batch 1, 2 ×
                                                       #   gradient checkpointing off / on; prints the table
    python benchmarks/bench_memory.py --write          # also rewrites the memory tables in RESULTS.md
    python benchmarks/bench_memory.py --quick          # 256² and 512² only
    python benchmarks/bench_memory.py --real-table     # only the real-size table (no measurement)
    python benchmarks/bench_memory.py --calibrate FILE # measure the calibration runs (the 24 cases and the
                                                       #   model with 1 and 3 main layers) into FILE (JSON
                                                       #   lines; runs already there are kept), fit, print
    python benchmarks/bench_memory.py --fit FILE       # fit `memory.CALIBRATIONS[<this machine's attention>]`
                                                       #   to that attention's measurements in FILE
                                                       #   (benchmarks/memory_runs.jsonl: the 48 runs of
                                                       #   the current constants, 2026-12-02)

Each case trains `MODEL` (random weights, fp32, CPU) for `--steps` steps through `zrecipe.training.loop.
train` in its own fresh process, and records, over the steps (the final checkpoint write excluded): MLX's
peak (`mx.get_peak_memory`, weights included) and the process's peak RSS above its RSS before the model was
built (interpreter, MLX and BLAS already loaded). The estimate is `estimate_memory` for the same config;
error = estimate / measured − 1 (target ±10%).

The constants in `zrecipe.training.memory.CALIBRATIONS` (one set per training attention: the compiled flash
attention where zrecipe's kernels are loaded, the blockwise one elsewhere; each run records which) come
from `--calibrate`: the 24 cases and the same
model with 1 and 3 main layers, fitted by minimising the largest relative error (an L16 norm, Nelder–Mead)
of `estimate_memory` against MLX's peak and of its process estimate against the RSS growth, together.
Fitted on the 256² and 512² runs alone, the constants missed the 768² runs by up to 12.4% (so 768² is in
the fit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# dim 256, 4 heads, 2 main layers + 1 noise and 1 context refiner: small enough for 768² on a loaded CPU.
MODEL = {"dim": 256, "n_heads": 4, "n_layers": 2, "n_refiner_layers": 1, "cap_feat_dim": 64}
CAPTION_TOKENS = 32
RANK = 16
ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
SEED_BATCHES = (1, 8, 16, 32)  # the seed's table: LoRA 16 / 32, full 8 / 16 at 512 GB
# Validated at three resolutions; fitted at the two smaller ones (the largest checks the extrapolation in N).
# 768², not 1024²: one 1024² batch-2 case took 7.5 min on the shared 2-core machine.
RESOLUTIONS = (256, 512, 768)
CALIBRATION_RESOLUTIONS = (256, 512)


def transformer_config(dim: int, n_heads: int, n_layers: int, n_refiner_layers: int, cap_feat_dim: int):
    """A TransformerConfig with Z-Image's layout at the given sizes."""
    from zrecipe.models.z_image.transformer import TransformerConfig

    head = dim // n_heads
    third = head // 3 // 2 * 2
    return TransformerConfig(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=n_layers,
        n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_heads, norm_eps=1e-5, qk_norm=True,
        cap_feat_dim=cap_feat_dim, rope_theta=256.0, t_scale=1000.0, axes_dims=(head - 2 * third, third, third),
        axes_lens=(1024, 512, 512),
    )  # fmt: skip


def lora_target():
    from zrecipe.recipe import LoraTarget

    return LoraTarget("layers", 0, None, ATTN, RANK, float(RANK))


def calibration_cases() -> list[dict]:
    """The runs the constants are fitted on: the validation grid (`cases`, MODEL's 2 main layers) and the
    same model with 1 and 3 main layers (LoRA and full, 256² and 512²), which pins down the per-block
    terms."""
    return cases(False) + [
        {
            "mode": mode,
            "resolution": res,
            "batch": batch,
            "checkpointing": ckpt,
            "model": {"n_layers": layers},
            "attention": attention_here(),
        }
        for res in CALIBRATION_RESOLUTIONS
        for mode in ("lora", "full")
        for layers in (1, 3)
        for ckpt in (False, True)
        for batch in ((1, 2) if layers == 3 else (1,))
    ]


def fit(path: Path) -> None:
    """Fit the Calibration constants to the measurements in `path` and print them with the errors."""
    import dataclasses

    import numpy as np
    from scipy.optimize import minimize

    from zrecipe.training import memory

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Only the runs of the attention this machine trains with: they fit that attention's constants.
    here = attention_here()
    rows = [r for r in rows if r["case"].get("attention", "blockwise") == here]
    base = memory.CALIBRATIONS[here]
    names = [f.name for f in dataclasses.fields(memory.Calibration)]
    peak = np.array([r["mlx_peak_mib"] for r in rows])
    rss = np.array([r["rss_growth_mib"] for r in rows])

    def errors(values):
        cal = dataclasses.replace(base, **dict(zip(names, values, strict=True)))
        got = [estimate(r["case"], cal) for r in rows]
        return np.concatenate([np.array([e.total_gb * 1024 for e in got]) / peak - 1,
                               np.array([e.process_gb * 1024 for e in got]) / rss - 1])  # fmt: skip

    def norm(values):  # ~ the largest |error| over both measurements, smooth enough for Nelder–Mead
        return float(np.mean(np.abs(errors(values)) ** 16) ** 0.0625) + 1e3 * float(
            np.sum(np.minimum(values, 0) ** 2)
        )

    start = [getattr(base, n) for n in names]
    for _ in range(4):  # restarts: the simplex collapses on 11 parameters
        start = minimize(norm, start, method="Nelder-Mead",
                         options={"maxiter": 20000, "xatol": 1e-4, "fatol": 1e-12}).x  # fmt: skip
    fitted = {n: round(float(v), 3) for n, v in zip(names, start, strict=True)}
    cal = dataclasses.replace(base, **fitted)
    print(cal)
    for r in rows:
        e = estimate(r["case"], cal)
        print(f"{r['case']}: peak {e.total_gb * 1024:.1f} vs {r['mlx_peak_mib']:.1f} "
              f"({e.total_gb * 1024 / r['mlx_peak_mib'] - 1:+.1%}), process {e.process_gb * 1024:.1f} vs "
              f"{r['rss_growth_mib']:.1f} ({e.process_gb * 1024 / r['rss_growth_mib'] - 1:+.1%})")  # fmt: skip


def attention_here() -> str:
    """The training attention of this machine (`memory.training_attention`), recorded with each case:
    runs without the key (before the compiled flash attention) used the blockwise one."""
    from zrecipe.training.memory import training_attention

    return training_attention("float32")


def cases(quick: bool) -> list[dict]:
    """Every (mode, resolution, batch, checkpointing) combination measured, with this machine's attention."""
    attention = attention_here()
    return [
        {"mode": mode, "resolution": res, "batch": batch, "checkpointing": ckpt, "attention": attention}
        for mode in ("lora", "full")
        for ckpt in (False, True)
        for res in (RESOLUTIONS[:2] if quick else RESOLUTIONS)
        for batch in (1, 2)
    ]


def estimate(case: dict, calibration=None):
    """`estimate_memory` for one case (fp32, like the measurement)."""
    from zrecipe.training import memory

    return memory.estimate_memory(
        transformer_config(**{**MODEL, **case.get("model", {})}), case["mode"], case["batch"], width=case["resolution"],
        height=case["resolution"], caption_tokens=CAPTION_TOKENS, dtype="float32",
        lora_targets=[lora_target()], gradient_checkpointing=case["checkpointing"],
        calibration=calibration, attention=case.get("attention", "blockwise"),
    )  # fmt: skip


def measure(case: dict, steps: int) -> dict:
    """Run one case in this process (the child): peaks over the training steps, MiB. `case["model"]`
    overrides MODEL's sizes."""
    from common import prepare_side

    prepare_side("zrecipe")  # selects the fast BLAS before MLX loads
    if case.get("attention", "blockwise") != attention_here():
        raise SystemExit(
            f"case {case} asks for {case.get('attention', 'blockwise')} attention; here: {attention_here()}"
        )
    import mlx.core as mx
    import numpy as np
    from bench_train_step import peak_rss_mib, reset_peak_rss, rss_mib

    from zrecipe.models.z_image.training import FlowMatchingObjective
    from zrecipe.models.z_image.transformer import ZImageTransformer
    from zrecipe.training.callbacks import TrainingCallback
    from zrecipe.training.data import Example
    from zrecipe.training.loop import train
    from zrecipe.training.settings import TrainSettings

    start_rss = rss_mib()  # after the imports: interpreter, MLX and BLAS loaded
    reset_peak_rss()
    sizes = {**MODEL, **case.get("model", {})}
    model = ZImageTransformer(transformer_config(**sizes))
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    side = case["resolution"] // 8
    examples = [
        Example(rng.standard_normal((16, side, side), dtype=np.float32),
                rng.standard_normal((CAPTION_TOKENS, sizes["cap_feat_dim"]), dtype=np.float32), (side, side))
        for _ in range(case["batch"])
    ]  # fmt: skip
    settings = TrainSettings(
        mode=case["mode"], batch_size=case["batch"], max_steps=steps, checkpoint_frequency=10**9,
        compute_dtype="float32", lora_targets=(lora_target(),), gradient_checkpointing=case["checkpointing"],
    )  # fmt: skip
    seen = {"mlx": 0, "rss": 0.0}

    class Recorder(TrainingCallback):
        """Reads the peaks after every step, before the loop writes its final files."""

        def on_step(self, state, report):
            seen["mlx"] = max(seen["mlx"], mx.get_peak_memory())
            seen["rss"] = max(seen["rss"], peak_rss_mib())

    with tempfile.TemporaryDirectory() as out:
        objective = FlowMatchingObjective.from_settings(
            settings, np.zeros((4, sizes["cap_feat_dim"]), np.float32)
        )
        train(model, examples, objective, settings, out, callbacks=[Recorder()])
    return {"mlx_peak_mib": seen["mlx"] / 2**20, "rss_growth_mib": seen["rss"] - start_rss,
            "start_rss_mib": start_rss}  # fmt: skip


def run_case(case: dict, steps: int) -> dict:
    """`measure` in a fresh process; → its result."""
    cmd = [sys.executable, __file__, "--case", json.dumps(case), "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{case} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def error(est_mib: float, measured_mib: float) -> str:
    return f"{est_mib / measured_mib - 1:+.1%}"


def measured_table(rows: list[tuple[dict, dict, object]]) -> list[str]:
    """Markdown rows: estimate, measured and error, for MLX's peak and for the process's RSS growth."""
    from common import table

    body = []
    for case, got, est in rows:
        peak, process = est.total_gb * 1024, est.process_gb * 1024
        body.append([
            case["mode"], f"{case['resolution']}²", str(case["batch"]), "on" if case["checkpointing"] else "off",
            f"{peak:.0f}", f"{got['mlx_peak_mib']:.0f}", error(peak, got["mlx_peak_mib"]),
            f"{process:.0f}", f"{got['rss_growth_mib']:.0f}", error(process, got["rss_growth_mib"]),
        ])  # fmt: skip
    header = ["mode", "image", "batch", "checkpointing", "estimate MiB", "MLX peak MiB", "error",
              "process estimate MiB", "peak RSS growth MiB", "error"]  # fmt: skip
    return table(header, body)


def worst_errors(rows) -> tuple[float, float]:
    """Largest |error| against MLX's peak and against the RSS growth."""
    peak = max(abs(est.total_gb * 1024 / got["mlx_peak_mib"] - 1) for _, got, est in rows)
    rss = max(abs(est.process_gb * 1024 / got["rss_growth_mib"] - 1) for _, got, est in rows)
    return peak, rss


def real_table() -> list[str]:
    """The seed's table recomputed for the real model: estimated process peak (GB) at the seed's batch
    sizes, and the largest batch `MemoryOptimizer` allows on each Mac memory size (what `zrecipe memory`
    prints)."""
    from common import table

    from zrecipe.training.memory import MAC_MEMORY_GB, MemoryOptimizer, estimate_memory

    body = []
    for mode in ("lora", "full"):
        per_memory = MemoryOptimizer.batch_per_memory(mode)
        for i, ckpt in enumerate((False, True)):
            row = [mode, "on" if ckpt else "off"]
            for b in SEED_BATCHES:
                row.append(f"{estimate_memory(None, mode, b, gradient_checkpointing=ckpt).process_gb:.0f}")
            row += [str(batches[1 + i] or "–") for batches in per_memory]
            body.append(row)
    header = ["mode", "checkpointing", *(f"batch {b} GB" for b in SEED_BATCHES),
              *(f"batch in {gb} GB" for gb in MAC_MEMORY_GB)]  # fmt: skip
    return table(header, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256² and 512² only")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="rewrite the tables in RESULTS.md")
    parser.add_argument("--real-table", action="store_true", help="only the real-size table")
    parser.add_argument("--calibrate", type=Path, help="measure the calibration grid into FILE and fit")
    parser.add_argument("--fit", type=Path, help="fit the constants to the measurements in FILE")
    parser.add_argument(
        "--save",
        type=Path,
        help="keep the validation measurements in FILE (JSON lines; "
        "cases already there are not measured again)",
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.fit:
        fit(args.fit)
        return
    if args.case:
        print(json.dumps(measure(json.loads(args.case), args.steps)))
        return
    from common import machine_info, machine_lines, write_section

    real = real_table()
    print("\n".join(real))
    if args.write:
        write_section("memory-real", ["Real Z-Image transformer (6.15 B parameters), bf16, 1024², 128 caption "
                                      "tokens, LoRA rank 32 on the main layers' attention, AdamW; `zrecipe "
                                      "memory --mode lora|full`. Estimated process peak (GB) per batch, then "
                                      "the largest batch `MemoryOptimizer` allows in each memory size with "
                                      "15% headroom (– = none fits; at most 64).",
                                      "", *real])  # fmt: skip
    if args.real_table:
        return
    grid = calibration_cases() if args.calibrate else cases(args.quick)
    save = args.calibrate or args.save
    done = {}
    if save and save.exists():  # measurements already in FILE are reused (a long grid can be resumed)
        for line in save.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[json.dumps(row.pop("case"), sort_keys=True)] = row
    rows = []
    for case in grid:
        got = done.get(json.dumps(case, sort_keys=True))
        if got is None:
            got = run_case(case, args.steps)
            if save:
                with save.open("a") as out:
                    out.write(json.dumps({"case": case, **got}) + "\n")
        rows.append((case, got, estimate(case)))
        print(f"{case}: estimate {rows[-1][2].total_gb * 1024:.0f} MiB, {got}", flush=True)
    if args.calibrate:
        fit(args.calibrate)
        return
    lines = measured_table(rows)
    print("\n".join(lines))
    peak, rss = worst_errors(rows)
    print(f"largest |error|: {peak:.1%} against MLX's peak, {rss:.1%} against the RSS growth (target ≤ 10%)")
    if args.write:
        write_section("memory-model", [
            *machine_lines(machine_info()),
            f"Model: {MODEL}, caption {CAPTION_TOKENS} tokens, LoRA rank {RANK} on the main layers' attention, "
            f"AdamW, fp32, {args.steps} steps per case, each case in its own process (the constants were fitted "
            "to these runs and the same model with 1 and 3 main layers: `--calibrate`).",
            "", *lines, "", f"Largest |error|: {peak:.1%} against MLX's peak, {rss:.1%} against the RSS "
            "growth (target ±10%).",
        ])  # fmt: skip


if __name__ == "__main__":
    main()
