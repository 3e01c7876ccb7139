"""Resize throughput: zrecipe's resize path vs a plain Pillow open → resize → save loop.

    python benchmarks/bench_resize.py                # N=100 photo-sized JPEGs, 3 runs
    python benchmarks/bench_resize.py --n 1000 --runs 5

Generates N photo-sized JPEGs (3000×2000 by default: a smooth random colour field plus grain, so JPEG
decode costs what a real photo's does), then resizes every one to its bucket at `--resolution` and writes
PNGs, timing whole passes:

- baseline: one process, `Image.open → convert("RGB") → resize(LANCZOS, centre-crop box) → save(PNG)` with
  Pillow's defaults: what a user's script does. Same output sizes as zrecipe.
- zrecipe: `zrecipe.data.images.resize_to_file` over a process pool of `--workers` (default: all cores), as
  the build runs it; pool start-up is inside the timing.
- two decompositions of the gap, single process: zrecipe's path alone (draft decode + its PNG writer), and
  the baseline's full decode + resize with zrecipe's PNG writer (separates the encoder from the decode).

Prints the median images/s of `--runs` passes (min–max alongside) and the ratio; target ≥ 2×.
Also prints the mean absolute pixel difference between zrecipe's output and the full-decode baseline.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zrecipe.data.images import output_size, resize_to_file
from zrecipe.data.png import write_png


def make_photo(args: tuple[str, int, int, int]) -> None:
    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    field = Image.fromarray((rng.random((9, 13, 3)) * 255).astype(np.uint8), "RGB")
    base = np.asarray(field.resize((width, height), Image.Resampling.BICUBIC), np.int16)
    # Grain: without it JPEG blocks are nearly empty and decode is unrealistically cheap.
    grain = rng.integers(-12, 13, size=(height, width, 1), dtype=np.int16)
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8), "RGB").save(path, quality=90)


def generate(folder: Path, n: int, width: int, height: int, workers: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:05d}.jpg" for i in range(n)]
    todo = [(str(p), width, height, i) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        print(f"generating {len(todo)} {width}×{height} JPEGs in {folder} ...", flush=True)
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(make_photo, todo, chunksize=4))
    return paths


def baseline_one(src: Path, out: Path, resolution: int, zrecipe_png: bool = False) -> None:
    im = Image.open(src).convert("RGB")
    tw, th = output_size(im.width, im.height, resolution)
    w, h = im.size
    cw, ch = (h * tw / th, h) if w * th > h * tw else (w, w * th / tw)
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    small = im.resize((tw, th), Image.Resampling.LANCZOS, box=box)
    if zrecipe_png:
        write_png(out, np.asarray(small))
    else:
        small.save(out, "PNG")


def zrecipe_one(job: tuple[str, str, int]) -> tuple[int, int]:
    src, out, resolution = job
    return resize_to_file(src, out, resolution)


def timed_pass(name: str, paths: list[Path], out_dir: Path, resolution: int, workers: int) -> float:
    """One full pass over `paths`; returns images/s. Output folder emptied first (a cold cache)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    outs = [out_dir / (p.stem + ".png") for p in paths]
    start = time.perf_counter()
    if name == "baseline":
        for p, o in zip(paths, outs, strict=True):
            baseline_one(p, o, resolution)
    elif name == "baseline+zrecipe-png":
        for p, o in zip(paths, outs, strict=True):
            baseline_one(p, o, resolution, zrecipe_png=True)
    elif name == "zrecipe-1proc":
        for p, o in zip(paths, outs, strict=True):
            resize_to_file(p, o, resolution)
    else:
        jobs = [(str(p), str(o), resolution) for p, o in zip(paths, outs, strict=True)]
        with ProcessPoolExecutor(workers) as pool:
            list(pool.map(zrecipe_one, jobs, chunksize=max(1, len(jobs) // (workers * 8))))
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="number of JPEGs (issue 7 uses 1000)")
    ap.add_argument("--size", default="3000x2000", help="source size WxH")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zrecipe-bench-resize")
    ap.add_argument("--skip-decomposition", action="store_true", help="only baseline vs zrecipe")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))

    paths = generate(args.dir / f"src_{width}x{height}", args.n, width, height, args.workers)
    names = ["baseline", "zrecipe"] + (
        [] if args.skip_decomposition else ["zrecipe-1proc", "baseline+zrecipe-png"]
    )
    results: dict[str, list[float]] = {n: [] for n in names}
    for run in range(args.runs):
        for name in names:  # interleaved, so load from other processes hits every variant alike
            results[name].append(
                timed_pass(name, paths, args.dir / f"out_{name}", args.resolution, args.workers)
            )
        print(
            f"run {run + 1}/{args.runs}: " + ", ".join(f"{n} {results[n][-1]:.1f}/s" for n in names),
            flush=True,
        )

    # Accuracy: zrecipe (draft decode) against the full-decode baseline, same sizes.
    diffs = []
    for p in paths[: min(10, len(paths))]:
        with (
            Image.open(args.dir / "out_zrecipe" / (p.stem + ".png")) as a,
            Image.open(args.dir / "out_baseline" / (p.stem + ".png")) as b,
        ):
            diffs.append(float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()))
    sizes = {n: sum(f.stat().st_size for f in (args.dir / f"out_{n}").iterdir()) / len(paths) for n in names}

    import PIL

    print(
        f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, Pillow {PIL.__version__}; N={args.n} {width}×{height} JPEG → "
        f"resolution {args.resolution}, {args.runs} runs, {args.workers} workers"
    )
    base = statistics.median(results["baseline"])
    print(f"{'variant':<20}{'median img/s':>14}{'min–max':>16}{'vs baseline':>13}{'PNG KiB':>10}")
    for n in names:
        med = statistics.median(results[n])
        print(
            f"{n:<20}{med:>14.2f}{min(results[n]):>8.2f}–{max(results[n]):<7.2f}{med / base:>12.2f}×"
            f"{sizes[n] / 1024:>10.0f}"
        )
    print(
        f"mean |zrecipe − full-decode baseline| over {len(diffs)} images: {statistics.mean(diffs):.3f} / 255"
    )
    ratio = statistics.median(results["zrecipe"]) / base
    print(f"ratio zrecipe / baseline: {ratio:.2f}× (target ≥ 2×: {'met' if ratio >= 2 else 'NOT met'})")


if __name__ == "__main__":
    main()
