"""Planning speed: `zrecipe plan` over N captioned images, side by side with `dvc status` on the same folder.

    python benchmarks/bench_plan.py                      # N = 10,000 and 100,000, 5 runs each
    python benchmarks/bench_plan.py --quick              # N = 10,000 only
    python benchmarks/bench_plan.py --n 10000 --runs 7 --dir /tmp/zrecipe-bench-plan --reuse --write

For each N this creates N tiny PNGs (one 100-byte image with a different 4-byte tail each, so every file
has its own content hash) with a sidecar caption each, and a recipe whose dataset is that folder; then:

- first build: `zrecipe build --until resize` (one run: a first build cannot be repeated on the same cache);
- no-op plan: `zrecipe plan --until resize`, whole process (interpreter start included: what a user waits
  for) and in-process (`plan_recipe` only), with the peak RSS of the process;
- plan after adding 10 images (exactly 10 stale; they are removed again after each run);
- plan after touching every image and caption without changing a byte (every file re-hashed, 0 stale);
- `dvc status` on a one-stage DVC pipeline whose dependency is the same folder (when DVC is installed),
  interleaved run by run with the zrecipe no-op plan so machine load hits both alike;
- with `--compare DIR`: the same no-op plan with the zrecipe package in DIR (an older revision), interleaved;
- start-up: `python -c pass`, `zrecipe --help`, the no-op plan of a one-image recipe (start-up until
  planning begins); and whether `zrecipe plan` imported MLX (it must not);
- where the in-process time goes (scan, captions, stat cache, graph, planner), CPU seconds, next to the
  floor: listing the folder and one stat per file, nothing else.

Wall times on a shared machine are noisy, so the CPU time (user + sys) of each process is reported too.
`--reuse` keeps a dataset folder already generated and built by an earlier run (its first-build time is
read from that run's marker file). `--write` replaces this benchmark's section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import stats, table, write_section  # noqa: E402

RECIPE = """model: tiny
mode: lora
datasets:
  - name: photos
    path: data
    resolution: 64
training_loop:
  max_steps: 10
"""
DVC_STAGE = """stages:
  count:
    cmd: ls data | wc -l > count.txt
    deps:
      - data
    outs:
      - count.txt
"""
HEAVY = ("mlx", "torch", "numpy", "PIL", "safetensors", "transformers", "diffusers")
AN_HOUR_NS = 3600 * 10**9


# --- processes -----------------------------------------------------------------------------------------


def zrecipe_cmd() -> list[str]:
    """The console script installed next to this Python (what a user runs; not a version manager's shim,
    which adds its own start-up), else the one on PATH, else `python -m zrecipe.cli.main`."""
    beside = Path(sys.executable).parent / "zrecipe"
    exe = str(beside) if beside.exists() else shutil.which("zrecipe")
    return [exe] if exe else [sys.executable, "-m", "zrecipe.cli.main"]


def run_proc(cmd: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> dict:
    """Run `cmd`; → {wall, cpu (user+sys of the process tree it waited for), rss (peak bytes), out, rc}."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err)
        out = proc.stdout.read()
        proc.stdout.close()
        # wait4 (not Popen.wait) to get this child's own resource usage: CPU and peak RSS.
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        err.seek(0)
        err_text = err.read().decode(errors="replace")
    if check and rc not in (0, 1):
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{err_text[-2000:]}")
    rss = ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rss": rss, "out": out.decode(), "rc": rc}


def tree_cmd(tree: Path) -> list[str]:
    """`zrecipe` from the package folder in `tree` (e.g. an older revision unpacked with `git archive`),
    bypassing the editable install's import hook."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
        f"getattr(f, '__module__', '')]; sys.path.insert(0, {str(tree)!r}); "
        "from zrecipe.cli.main import main; sys.argv[0] = 'zrecipe'; main()"
    )
    return [sys.executable, "-c", code]


def plan_json(root: Path, cmd: list[str] | None = None) -> dict:
    r = run_proc([*(cmd or zrecipe_cmd()), "plan", "recipe.yaml", "--until", "resize", "--json"], root)
    r["plan"] = json.loads(r["out"])
    return r


def dvc_env() -> dict:
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_NO_UPDATE_CHECK": "1"}


def dvc_cmd() -> list[str] | None:
    exe = shutil.which("dvc")
    return [exe] if exe else None


# --- dataset ---------------------------------------------------------------------------------------------


def tiny_png() -> bytes:
    """A 32×32 PNG (about 100 bytes): decoders ignore bytes after IEND, so a tail makes each file unique."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def write_image(data: Path, i: int, base: bytes, mtime_ns: int | None) -> None:
    img = data / f"img_{i:06d}.png"
    img.write_bytes(base + i.to_bytes(4, "little"))
    txt = data / f"img_{i:06d}.txt"
    txt.write_text(f"photo {i} of a red square, studio light")
    if mtime_ns is not None:
        os.utime(img, ns=(mtime_ns, mtime_ns))
        os.utime(txt, ns=(mtime_ns, mtime_ns))


def setup(root: Path, n: int, reuse: bool, use_dvc: bool) -> dict:
    """Generate the dataset and run the first builds; → what was measured (also saved in a marker)."""
    marker = root / "bench-setup.json"
    if reuse and marker.exists():
        saved = json.loads(marker.read_text())
        if saved.get("n") == n and (not use_dvc or saved.get("dvc_repro")):
            saved["reused"] = True
            return saved
    shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    data.mkdir(parents=True)
    (root / "recipe.yaml").write_text(RECIPE)
    base = tiny_png()
    old = time.time_ns() - AN_HOUR_NS  # older than the stat cache's racy window, as a real dataset is
    t = time.perf_counter()
    for i in range(n):
        write_image(data, i, base, old)
    info: dict = {"n": n, "generate_s": time.perf_counter() - t, "reused": False}
    print(f"[plan N={n}] generated {n} images + captions in {info['generate_s']:.1f} s", flush=True)
    r = run_proc([*zrecipe_cmd(), "build", "recipe.yaml", "--until", "resize", "-q"], root)
    info["first_build"] = {"wall": r["wall"], "cpu": r["cpu"], "rss": r["rss"]}
    print(f"[plan N={n}] first zrecipe build --until resize: {r['wall']:.1f} s", flush=True)
    if use_dvc and dvc_cmd():
        run_proc([*dvc_cmd(), "init", "--no-scm", "-q"], root, dvc_env())
        (root / "dvc.yaml").write_text(DVC_STAGE)
        r = run_proc([*dvc_cmd(), "repro", "-q"], root, dvc_env())
        info["dvc_repro"] = {"wall": r["wall"], "cpu": r["cpu"], "rss": r["rss"]}
        print(f"[plan N={n}] first dvc repro: {r['wall']:.1f} s", flush=True)
    marker.write_text(json.dumps(info))
    return info


# --- measurements ----------------------------------------------------------------------------------------


def summarise(samples: list[dict]) -> dict:
    return {
        "wall": stats([s["wall"] for s in samples]),
        "cpu": stats([s["cpu"] for s in samples]),
        "rss_max": max(s.get("rss", 0) for s in samples),
    }


def noop_and_dvc(root: Path, runs: int, use_dvc: bool, compare: Path | None = None) -> dict:
    """No-op `zrecipe plan` and `dvc status` (and the `compare` tree's plan), interleaved run by run."""
    plan_json(root)  # warm-up: file system caches, and proof the plan is a no-op
    dvc = dvc_cmd() if use_dvc and (root / "dvc.yaml").exists() else None
    if dvc:
        run_proc([*dvc, "status"], root, dvc_env())
    trees = {"before": tree_cmd(compare), "after": tree_cmd(HERE.parent)} if compare else {}
    for cmd in trees.values():
        plan_json(root, cmd)
    zr, dv, tr = [], [], {name: [] for name in trees}
    for _ in range(runs):
        r = plan_json(root)
        assert r["plan"]["stale"] == 0, f"no-op plan found {r['plan']['stale']} stale nodes"
        zr.append(r)
        if dvc:
            d = run_proc([*dvc, "status"], root, dvc_env())
            assert "up to date" in d["out"], d["out"]
            dv.append(d)
        for name, cmd in trees.items():
            t = plan_json(root, cmd)
            assert t["plan"]["stale"] == 0, f"{name}: no-op plan found {t['plan']['stale']} stale nodes"
            tr[name].append(t)
    return {
        "zrecipe": summarise(zr),
        "dvc": summarise(dv) if dv else None,
        "compare": {name: summarise(v) for name, v in tr.items()} if trees else None,
    }


def in_process(root: Path, runs: int) -> dict:
    """`plan_recipe` in this process (no interpreter start, imports done) and its phases, CPU seconds."""
    from zrecipe.engine import StatCache, Store, build
    from zrecipe.pipeline import graph as pgraph
    from zrecipe.pipeline import plan_recipe
    from zrecipe.recipe import load_recipe

    recipe = load_recipe(root / "recipe.yaml")
    plan_recipe(recipe, until="resize")
    walls = []
    for _ in range(runs):
        t = time.perf_counter()
        outcome = plan_recipe(recipe, until="resize")
        walls.append(time.perf_counter() - t)
        assert outcome.plan.stale_count == 0
    # Phases, each timed alone on the same warm state (CPU time: less sensitive to load than wall).
    cache = pgraph.default_cache_dir(recipe)
    phases: dict[str, list[float]] = {k: [] for k in ("scan", "captions", "stat cache", "graph", "plan")}
    from zrecipe.data import resolve_captions, scan_images

    ds = recipe.datasets[0]
    for _ in range(runs):
        with StatCache(cache / "stat.sqlite") as sc:
            c0 = time.process_time()
            files = scan_images(ds.path)
            c1 = time.process_time()
            resolve_captions(files, ds.path, "sidecar", read=sc.read_small_files)
            c2 = time.process_time()
            sc.hash_signed([f[1:] for f in files])
            c3 = time.process_time()
            graph, data = pgraph.build_graph(recipe, cache, until="resize", stat_cache=sc)
            c4 = time.process_time()
            build(graph, Store(cache), data, dry_run=True)
            c5 = time.process_time()
        phases["scan"].append(c1 - c0)
        phases["captions"].append(c2 - c1)
        phases["stat cache"].append(c3 - c2)
        # build_graph repeats scan + captions + hashing: what it adds is the node building.
        phases["graph"].append(max(0.0, (c4 - c3) - (c3 - c0)))
        phases["plan"].append(c5 - c4)
    # The floor: listing the folder and one stat per image and per caption, nothing else (CPU seconds).
    floor = []
    for _ in range(runs):
        c0 = time.process_time()
        with os.scandir(ds.path) as entries:
            for entry in entries:
                entry.stat()
        floor.append(time.process_time() - c0)
    phases["floor: scandir + stat of every file"] = floor
    return {"wall": stats(walls), "phases": {k: stats(v) for k, v in phases.items()}}


def after_adding(root: Path, runs: int) -> dict:
    """Plan with 10 new images (10 stale), removed again after each run."""
    data, base, samples = root / "data", tiny_png(), []
    for run in range(runs):
        new = [10_000_000 + run * 100 + k for k in range(10)]
        for i in new:
            write_image(data, i, base, None)
        try:
            r = plan_json(root)
        finally:
            for i in new:
                (data / f"img_{i:06d}.png").unlink()
                (data / f"img_{i:06d}.txt").unlink()
        assert r["plan"]["stale"] == 10, f"expected 10 stale, got {r['plan']['stale']}"
        samples.append(r)
    return summarise(samples)


def after_touching(root: Path, runs: int) -> dict:
    """Plan after setting a new mtime on every image and caption (same bytes): all re-hashed, 0 stale."""
    data, samples = root / "data", []
    names = [e.path for e in os.scandir(data)]
    for run in range(runs):
        t = time.time_ns() - AN_HOUR_NS + (run + 1) * 10**9  # a new, non-racy mtime each run
        for p in names:
            os.utime(p, ns=(t, t))
        r = plan_json(root)
        assert r["plan"]["stale"] == 0, f"touching found {r['plan']['stale']} stale nodes"
        samples.append(r)
    return summarise(samples)


def startup(root: Path, runs: int) -> dict:
    """Interpreter start alone, `zrecipe --help`, and the modules `zrecipe plan` imports."""
    bare, helps = [], []
    for _ in range(runs):
        bare.append(run_proc([sys.executable, "-c", "pass"], root))
        helps.append(run_proc([*zrecipe_cmd(), "--help"], root))
    probe = (
        "import sys\nfrom zrecipe.cli.main import app, run_app\n"
        "rc = run_app(app, ['plan', 'recipe.yaml', '--until', 'resize', '--json'])\n"
        f"print('HEAVY=' + ','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    out = run_proc([sys.executable, "-c", probe], root)["out"]
    heavy = next(line[6:] for line in out.splitlines() if line.startswith("HEAVY="))
    # Start-up up to the point where planning begins: a no-op plan of a one-image recipe.
    one = root.parent / f"{root.name}-one-image"
    if not (one / "recipe.yaml").exists():
        (one / "data").mkdir(parents=True, exist_ok=True)
        write_image(one / "data", 0, tiny_png(), time.time_ns() - AN_HOUR_NS)
        (one / "recipe.yaml").write_text(RECIPE)
    plan_json(one)  # its store and stat cache
    ones = [plan_json(one) for _ in range(runs)]
    return {
        "python": summarise(bare),
        "help": summarise(helps),
        "plan_one": summarise(ones),
        "heavy_imports": heavy.split(",") if heavy else [],
    }


def bench(n: int, root: Path, runs: int, reuse: bool, use_dvc: bool, compare: Path | None = None) -> dict:
    info = setup(root, n, reuse, use_dvc)
    res: dict = {"n": n, "setup": info}
    res.update(noop_and_dvc(root, runs, use_dvc, compare))
    print(
        f"[plan N={n}] no-op plan {res['zrecipe']['wall']['median']:.3f} s"
        + (f", dvc status {res['dvc']['wall']['median']:.3f} s" if res["dvc"] else ""),
        flush=True,
    )
    res["in_process"] = in_process(root, runs)
    res["add10"] = after_adding(root, runs)
    touch_runs = runs if n <= 20_000 else max(3, runs // 2)
    res["touch"] = after_touching(root, touch_runs)
    res["startup"] = startup(root, runs)
    print(
        f"[plan N={n}] in-process {res['in_process']['wall']['median']:.3f} s, +10 images "
        f"{res['add10']['wall']['median']:.3f} s, touched {res['touch']['wall']['median']:.3f} s",
        flush=True,
    )
    return res


# --- report ----------------------------------------------------------------------------------------------


def _s(st: dict) -> str:
    return f"{st['median']:.3f} s ({st['min']:.3f}–{st['max']:.3f}, {st['runs']} runs)"


def _mib(b: float) -> str:
    return f"{b / 2**20:.0f} MiB"


def section(results: list[dict], load: tuple[float, float]) -> list[str]:
    rows = []
    for r in results:
        n, z, d = f"{r['n']:,}", r["zrecipe"], r["dvc"]
        fb = r["setup"]["first_build"]
        rows.append(
            [
                n,
                "first `zrecipe build --until resize`",
                f"{fb['wall']:.1f} s (1 run)",
                f"{fb['cpu']:.1f} s",
                f"{r['setup']['dvc_repro']['wall']:.1f} s (`dvc repro`)"
                if r["setup"].get("dvc_repro")
                else "–",
                "–",
                "–",
            ]
        )
        ratio_wall = f"{d['wall']['median'] / z['wall']['median']:.1f}×" if d else "–"
        ratio_cpu = f" (CPU {d['cpu']['median'] / z['cpu']['median']:.1f}×)" if d else ""
        target = "≥ 8× vs DVC" if r["n"] == 10_000 else ("≤ 1 s" if r["n"] == 100_000 else "")
        rows.append(
            [
                n,
                "no-op `zrecipe plan` (whole process)",
                _s(z["wall"]),
                f"{z['cpu']['median']:.3f} s",
                _s(d["wall"]) + f", CPU {d['cpu']['median']:.2f} s" if d else "not measured",
                ratio_wall + ratio_cpu,
                target,
            ]
        )
        for name, c in (r.get("compare") or {}).items():
            ratio = ""
            if name == "before":
                after = r["compare"]["after"]
                ratio = (
                    f"before / after: {c['wall']['median'] / after['wall']['median']:.2f}× wall, "
                    f"{c['cpu']['median'] / after['cpu']['median']:.2f}× CPU"
                )
            label = "code before the optimisations" if name == "before" else "this tree, same launcher"
            rows.append(
                [n, f"no-op plan, {label}", _s(c["wall"]), f"{c['cpu']['median']:.3f} s", "–", ratio, ""]
            )
        ip = r["in_process"]["wall"]
        rows.append([n, "no-op plan, in-process (`plan_recipe`)", _s(ip), "–", "–", "–", ""])
        rows.append(
            [
                n,
                "plan after adding 10 images (10 stale)",
                _s(r["add10"]["wall"]),
                f"{r['add10']['cpu']['median']:.3f} s",
                "–",
                "–",
                "",
            ]
        )
        rows.append(
            [
                n,
                "plan after touching every file (0 stale)",
                _s(r["touch"]["wall"]),
                f"{r['touch']['cpu']['median']:.3f} s",
                "–",
                "–",
                "",
            ]
        )
        rows.append(
            [
                n,
                "peak RSS of the no-op plan",
                _mib(z["rss_max"]),
                "–",
                _mib(d["rss_max"]) if d else "–",
                "–",
                "flat in N",
            ]
        )
    head = [
        "N images",
        "measurement",
        "zrecipe wall, median (min–max)",
        "zrecipe CPU",
        "DVC",
        "ratio",
        "target",
    ]
    lines = table(head, rows)
    first = results[0]["startup"]
    lines += [
        "",
        *table(
            ["start-up", "wall, median (min–max)", "CPU"],
            [
                [
                    "`python -c pass`",
                    _s(first["python"]["wall"]),
                    f"{first['python']['cpu']['median']:.3f} s",
                ],
                ["`zrecipe --help`", _s(first["help"]["wall"]), f"{first['help']['cpu']['median']:.3f} s"],
                [
                    "no-op `zrecipe plan` of a one-image recipe (start-up until planning begins)",
                    _s(first["plan_one"]["wall"]),
                    f"{first['plan_one']['cpu']['median']:.3f} s",
                ],
            ],
        ),
    ]
    heavy = first["heavy_imports"]
    lines.append("")
    lines.append(
        f"Heavy modules imported by `zrecipe plan`: {', '.join(heavy) if heavy else 'none (no MLX, numpy, PIL, torch)'}."
    )
    lines += [
        "",
        "Where the in-process no-op plan spends its CPU time (median seconds per phase; the last column is the "
        "floor any tool pays: listing the folder and one stat per image and per caption, measured in the same "
        "run):",
        "",
    ]
    names = list(results[0]["in_process"]["phases"])
    lines += table(
        ["N", *names],
        [[f"{r['n']:,}", *(f"{r['in_process']['phases'][k]['median']:.3f}" for k in names)] for r in results],
    )
    lines += [
        "",
        f"1-min load average {load[0]:.1f} at start, {load[1]:.1f} at the end on "
        f"{os.cpu_count()} cores: other jobs were running, so wall times are inflated and noisy; the CPU "
        "column (user + sys of the process) is the steadier number. zrecipe and DVC runs are interleaved "
        "run by run so both suffer the same load. Reused datasets: "
        + (", ".join(f"{r['n']:,}" for r in results if r["setup"].get("reused")) or "none")
        + ".",
    ]
    return lines


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=None, help="dataset sizes (default 10000 100000)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N = 10,000 only")
    ap.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "zrecipe-bench-plan")
    ap.add_argument("--reuse", action="store_true", help="reuse datasets built by an earlier run in --dir")
    ap.add_argument("--no-dvc", action="store_true")
    ap.add_argument("--write", action="store_true", help="replace the `plan` section of RESULTS.md")
    ap.add_argument(
        "--compare",
        type=Path,
        default=None,
        help="also time the no-op plan of the zrecipe package in this folder (e.g. an older revision: "
        "`git archive REV zrecipe | tar -x -C DIR`), interleaved with this tree's",
    )
    args = ap.parse_args(argv)
    sizes = args.n or ([10_000] if args.quick else [10_000, 100_000])
    load0 = os.getloadavg()[0]
    use_dvc = not args.no_dvc and dvc_cmd() is not None
    if not args.no_dvc and not use_dvc:
        print("dvc is not installed (pip install dvc): measuring zrecipe alone", flush=True)
    # An installed package has its bytecode: let the warm-up runs write it (for --compare's tree too),
    # or every run would compile the modules again.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    results = [bench(n, args.dir / f"n{n}", args.runs, args.reuse, use_dvc, args.compare) for n in sizes]
    lines = section(results, (load0, os.getloadavg()[0]))
    print("\n".join(lines))
    if args.write:
        write_section("plan", lines)
    return results


if __name__ == "__main__":
    main()
