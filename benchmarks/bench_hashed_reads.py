"""The cost of hashed reads: a full tiny build and a no-op build, with and without verification.

    python benchmarks/bench_hashed_reads.py              # 5 rounds
    python benchmarks/bench_hashed_reads.py --runs 9 --images 12

"On" is zrecipe as shipped: every store entry a step reads is hashed against its manifest first
(`Store.verified`), the resize step hashes the image bytes it decodes (`read_verified`), and publishing
compares the output folder by content (`StatCache.lookup`) and hashes what it copies out of the store
(`copy_verified`). "Off" swaps the three hashed reads for the size-only / unhashed versions the build had
before, in the same process (the content comparison stays: it replaces the old size/mtime test).
Rounds alternate on/off (machine load hits both alike); each round is a full build in a fresh store, then
(2.5 s later, past the stat cache's racy window, as a user's next build would be) three no-op builds. Also reported: the seconds spent inside those four functions during the "on" runs —
the overhead measured directly rather than as a difference of two noisy totals (resize runs in-process,
`--jobs 1`, so its hashing is counted too).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import zrecipe  # noqa: E402,F401 — selects the fast BLAS before MLX loads
import zrecipe.engine.files as files  # noqa: E402
import zrecipe.engine.store as store_module  # noqa: E402
from zrecipe.cli.main import app, run_app  # noqa: E402
from zrecipe.engine.statcache import StatCache  # noqa: E402

RECIPE = """\
model: {model}
seed: 1
datasets:
  - name: shapes
    path: {data}
    resolution: 64
training_loop:
  max_steps: 8
  batch_size: 2
lora:
  rank: 4
  targets:
    - blocks: layers
      layer_types: [attention]
save:
  checkpoint_frequency: 4
  output_path: {out}
sample:
  prompts: ["a red circle"]
  steps: 2
  width: 32
  height: 32
export:
  formats: [mflux]
"""

SPENT = {"seconds": 0.0}


def _timed(fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT["seconds"] += time.perf_counter() - t0

    return wrapper


def _plain_copy(src, dst, expected):
    shutil.copyfile(src, dst)
    return True


@contextlib.contextmanager
def verification(on: bool):
    """Hashed reads as shipped (timed, with publishing's content comparison of the output folder), or the
    unhashed versions."""
    saved = (store_module.Store.verified, files.read_verified, store_module.copy_verified)
    lookup = StatCache.lookup
    if on:
        store_module.Store.verified = _timed(saved[0])
        files.read_verified = _timed(saved[1])
        store_module.copy_verified = _timed(saved[2])
        StatCache.lookup = _timed(lookup)
    else:
        store_module.Store.verified = lambda self, key: self.check(key, "sizes")
        files.read_verified = lambda path, expected: files.read_regular(path)
        store_module.copy_verified = _plain_copy
    try:
        yield
    finally:
        store_module.Store.verified, files.read_verified, store_module.copy_verified = saved
        StatCache.lookup = lookup


def build(recipe: Path) -> float:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the build summaries
        rc = run_app(app, ["build", str(recipe), "--quiet", "--jobs", "1"])  # in-process: hashing is timed
    assert rc == 0, rc
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="rounds (each: one full build, three no-ops)")
    parser.add_argument("--images", type=int, default=12, help="images in the dataset (at most 12)")
    args = parser.parse_args()
    from zrecipe.models.z_image.tiny import create_tiny_model

    with tempfile.TemporaryDirectory(prefix="zrecipe-bench-hash-") as tmp:
        tmp = Path(tmp)
        model = create_tiny_model(tmp / "model")
        data = tmp / "data"
        data.mkdir()
        for f in sorted((REPO / "recipes" / "data" / "tiny").iterdir())[: 2 * args.images]:
            shutil.copy2(f, data / f.name)
        full: dict[bool, list[float]] = {True: [], False: []}
        noop: dict[bool, list[float]] = {True: [], False: []}
        spent_full, spent_noop = [], []
        for round_ in range(args.runs + 1):  # round 0 warms up (MLX kernel compilation, imports)
            for on in (True, False) if round_ % 2 == 0 else (False, True):
                project = tmp / f"p{round_}-{int(on)}"
                project.mkdir()
                recipe = project / "recipe.yaml"
                recipe.write_text(RECIPE.format(model=model, data=data, out=project / "out"))
                with verification(on):
                    SPENT["seconds"] = 0.0
                    seconds = build(recipe)
                    if round_:
                        full[on].append(seconds)
                        if on:
                            spent_full.append(SPENT["seconds"])
                    # A user's next build comes later than the stat cache's racy window (2 s): files
                    # written in it are hashed again until it has passed.
                    time.sleep(2.5)
                    for _ in range(3):
                        SPENT["seconds"] = 0.0
                        seconds = build(recipe)
                        if round_:
                            noop[on].append(seconds)
                            if on:
                                spent_noop.append(SPENT["seconds"])
                shutil.rmtree(project)
    med = statistics.median
    for name, samples, spent in (("full build", full, spent_full), ("no-op build", noop, spent_noop)):
        on, off = med(samples[True]), med(samples[False])
        print(
            f"{name:12s} on {on:7.3f} s  off {off:7.3f} s  difference {100 * (on - off) / off:+5.1f}%  "
            f"inside hashing {med(spent) * 1000:7.2f} ms ({100 * med(spent) / on:.2f}% of the build)  "
            f"[{len(samples[True])} runs each]"
        )


if __name__ == "__main__":
    main()
