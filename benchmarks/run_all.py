"""Rerun every benchmark and rewrite its table in benchmarks/RESULTS.md.

    python benchmarks/run_all.py                 # full settings (tens of minutes on 2 cores)
    python benchmarks/run_all.py --quick         # smaller sizes, a smoke check of every comparison
    python benchmarks/run_all.py --only plan e2e --reuse
    python benchmarks/run_all.py --list

Every `benchmarks/bench_*.py` runs in its own Python process, one after the other (a fresh process per
benchmark: no MLX, BLAS-thread or allocator state leaks from one comparison into the next, and a crash in
one does not stop the others). A script that has a `--write` option rewrites its own RESULTS.md section
(medians of ≥ 5 runs, min–max, machine, versions, ratio); for a script without one, this runner puts its
command line and printed output into a `run-<name>` section. Each script stays usable alone. A `run-all`
section records when, where and how long each ran, and what failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import table, write_section  # noqa: E402

# Arguments per script beyond --quick/--write (which are passed when the script has them). Sizes are
# chosen so that the full run finishes in tens of minutes on a 2-core machine; each script's section
# states the sizes it used.
ARGS: dict[str, dict[str, list[str]]] = {
    # 1,000 photo-sized JPEGs (issue 7's count) take ~40 minutes per variant set on 2 loaded cores.
    "bench_resize": {"quick": ["--n", "20", "--runs", "5", "--skip-decomposition"],
                     "full": ["--n", "100", "--runs", "5"]},
    "bench_engine_plan": {"quick": ["10000", "--repeat", "5"], "full": ["10000", "100000", "--repeat", "5"]},
    "bench_train_step": {"quick": ["--small", "--steps", "3", "--rounds", "1"], "full": ["--steps", "5", "--rounds", "2"]},
    "bench_denoise": {"quick": ["--repeat", "5"], "full": ["--repeat", "5"]},
}  # fmt: skip
# Scripts that are not comparisons run by default (the GPU script needs a GPU machine).
SKIP_BY_DEFAULT = ("bench_gpu",)


def scripts() -> list[str]:
    """Names (without .py) of every benchmarks/bench_*.py, sorted."""
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def _has_option(source: str, option: str) -> bool:
    return f'"{option}"' in source or f"'{option}'" in source


def command(name: str, quick: bool, write: bool, extra: list[str]) -> tuple[list[str], bool]:
    """(argv, writes its own section) for script `name`."""
    source = (HERE / f"{name}.py").read_text()
    argv = [sys.executable, str(HERE / f"{name}.py")]
    argv += ARGS.get(name, {}).get("quick" if quick else "full", [])
    if quick and _has_option(source, "--quick"):
        argv.append("--quick")
    self_writing = _has_option(source, "--write")
    if write and self_writing:
        argv.append("--write")
    return argv + extra, self_writing


def run_one(name: str, argv: list[str], timeout: float) -> tuple[int, float, str]:
    """Run one benchmark, echoing its output live; → (exit code, seconds, output)."""
    print(f"\n=== {name}: {' '.join(Path(a).name if a.endswith('.py') else a for a in argv[1:])}", flush=True)
    start = time.perf_counter()
    lines: list[str] = []
    proc = subprocess.Popen(
        argv, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the timeout is checked between lines: benchmarks print progress
            print(line, end="", flush=True)
            lines.append(line)
            if time.perf_counter() - start > timeout:
                proc.kill()
                lines.append(f"\n(killed after {timeout:.0f} s)\n")
                break
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        raise
    return rc, time.perf_counter() - start, "".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="each script's quick settings")
    ap.add_argument("--only", nargs="+", default=None, help="script names (with or without bench_)")
    ap.add_argument("--skip", nargs="+", default=[], help="script names to leave out")
    ap.add_argument("--reuse", action="store_true", help="bench_plan: reuse datasets built by an earlier run")
    ap.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per script")
    ap.add_argument("--list", action="store_true", help="list the benchmarks and their command lines")
    args = ap.parse_args(argv)

    def norm(names: list[str]) -> set[str]:
        return {n if n.startswith("bench_") else f"bench_{n}" for n in names}

    selected = [n for n in scripts() if (n in norm(args.only) if args.only else n not in SKIP_BY_DEFAULT)]
    selected = [n for n in selected if n not in norm(args.skip)]
    write = not args.no_write
    plan: list[tuple[str, list[str], bool]] = []
    for name in selected:
        extra = ["--reuse"] if name == "bench_plan" and args.reuse else []
        plan.append((name, *command(name, args.quick, write, extra)))
    if args.list:
        for name, cmd, own in plan:
            print(f"{name:<20} {'writes its section' if own else 'section run-' + name[6:]:<20} "
                  + " ".join(cmd[2:]))  # fmt: skip
        return 0

    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load0 = os.getloadavg()[0]
    rows = []
    for name, cmd, own in plan:
        rc, seconds, output = run_one(name, cmd, args.timeout)
        rows.append([name, " ".join(cmd[2:]) or "(defaults)", "ok" if rc == 0 else f"FAILED ({rc})",
                     f"{seconds:.0f} s"])  # fmt: skip
        if write and not own:
            short = name.removeprefix("bench_")
            write_section(f"run-{short}", [
                f"`python benchmarks/{name}.py {' '.join(cmd[2:])}` (run by run_all.py, {started}; exit {rc}):",
                "", "```", output.rstrip("\n")[-6000:], "```",
            ])  # fmt: skip
    summary = [
        f"Last `run_all.py{' --quick' if args.quick else ''}`: started {started} on {platform.node() or '?'} "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}); 1-min load "
        f"average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        *table(["benchmark", "arguments", "result", "time"], rows),
    ]
    print("\n" + "\n".join(summary))
    if write:
        write_section("run-all", summary)
    return 0 if all(r[2] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
