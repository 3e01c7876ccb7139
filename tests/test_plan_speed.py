"""Planning speed without a clock: what a fast `zrecipe plan` relies on, checked by behaviour.

- The command line converts plain values without pydantic (zrecipe.cli.plain_values), with exactly the
  results and messages of typer's own converter, on the typer in use and (when ZRECIPE_TEST_OLD_TYPER
  names a folder holding another typer + click, e.g. 0.12.4) on that one too.
- `zrecipe plan` imports neither pydantic nor rich (nor MLX: tests/test_cli_imports.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zrecipe.cli.plain_values import NOT_PLAIN, plain_value

ROOT = Path(__file__).resolve().parent.parent

SAMPLES = {
    str: ["x", "", "héllo wörld", "-", " spaced ", "1"],
    int: [
        "0",
        "7",
        "42",
        "007",
        "-3",
        "+3",
        " 4",
        "1_000",
        "1e3",
        "1.0",
        "abc",
        "",
        "١٢",
        "9" * 18,
        "9" * 25,
    ],
    float: [
        "1.5",
        "0",
        "2",
        "0.25",
        "1.",
        ".5",
        "-1.5",
        "1e-4",
        "inf",
        "nan",
        "abc",
        " 2.5",
        "007.5",
        "1_0.5",
    ],
    Path: ["a", "a//b", "./a", "a/", "", "-", "sub/file.txt", "sub", "missing/x", "/", "é.yaml"],
}


def _params():
    """(command name, click param, its typer type descriptor) for every typer parameter of the app."""
    import typer.main

    from zrecipe.cli.main import app

    stack, out = [typer.main.get_command(app)], []
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        out += [(cmd, p, p.type_descriptor) for p in cmd.params if hasattr(p, "type_descriptor")]
    return out


def _outcome(convert, *args, **kwargs):
    from typer import BadParameter

    try:
        value = convert(*args, **kwargs)
    except BadParameter as exc:
        return ("error", exc.format_message())
    return ("value", type(value), value)


def test_plain_values_are_typers_values(tmp_path, monkeypatch):
    pytest.importorskip("typer._coercion", reason="this typer converts with click, not pydantic")
    from typer._click import Context
    from typer._coercion import build_runtime_param

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "file.txt").write_text("x")
    checked = {str: 0, int: 0, float: 0, Path: 0, list: 0}
    for cmd, param, desc in _params():
        ann = desc.annotation
        item = ann.__args__[0] if getattr(ann, "__origin__", None) is list else ann
        if item not in SAMPLES:
            continue
        ctx = Context(cmd)
        values = SAMPLES[item] if item is ann else [(v,) for v in SAMPLES[item]] + [tuple(SAMPLES[item][:2])]
        for value in values:
            plain = _outcome(plain_value, value, ann, desc.parameter_info, param, ctx)
            if plain[-1] is NOT_PLAIN:
                continue
            typers = _outcome(build_runtime_param(desc)._coerce_value, value, param=param, ctx=ctx)
            assert plain == typers, f"{cmd.name} {param.name} ({ann}) {value!r}"
            checked[list if item is not ann else item] += 1
    # The plain forms are taken (the pydantic path is not merely always chosen).
    assert all(n > 0 for n in checked.values()), checked
    info = next(
        d.parameter_info for _, _, d in _params() if d.annotation is int and d.parameter_info.min is None
    )
    assert [plain_value(v, int, info) for v in ("7", "007", "-3")] == [7, NOT_PLAIN, NOT_PLAIN]
    assert [plain_value(v, Path, info) for v in ("a//b", "")] == [NOT_PLAIN, NOT_PLAIN]


PROBE = """
import json, sys
from zrecipe.cli.main import app, run_app
rc = run_app(app, sys.argv[1:])
print("PROBE " + json.dumps({"rc": rc, "loaded": sorted({m.split(".")[0] for m in sys.modules}
                                                        & {"pydantic", "rich", "mlx"})}))
"""


def _probe(cwd: Path, *args: str, pythonpath: str | None = None) -> tuple[dict, str]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    out = proc.stdout + proc.stderr
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, out
    return json.loads(line[6:]), out


def _project(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes([i]))
        (data / f"img{i}.txt").write_text(f"caption {i}")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: tiny\nmode: lora\ndatasets:\n  - name: d\n    path: data\n    resolution: 64\n"
        "training_loop:\n  max_steps: 2\n"
    )
    return recipe


def test_plan_imports_neither_pydantic_nor_rich(tmp_path):
    _project(tmp_path)
    result, out = _probe(tmp_path, "plan", "recipe.yaml", "--until", "resize", "--force", "resize")
    assert result["rc"] == 0 and "3 step(s) to run" in out, out
    assert result["loaded"] == [], out


def _old_typer() -> str:
    folder = os.environ.get("ZRECIPE_TEST_OLD_TYPER")
    if not folder:
        pytest.skip("set ZRECIPE_TEST_OLD_TYPER to a folder holding another typer + click (pip --target)")
    return folder


@pytest.mark.parametrize("which", ["current", "old"])
def test_plan_and_usage_errors_on_either_typer(tmp_path, which):
    """The same plan and the same usage errors whichever typer runs it (the old one has no pydantic
    layer: plain_values leaves it alone)."""
    path = f"{_old_typer()}{os.pathsep}{ROOT}" if which == "old" else str(ROOT)
    _project(tmp_path)
    result, out = _probe(tmp_path, "plan", "recipe.yaml", "--until", "resize", pythonpath=path)
    assert result["rc"] == 0 and "3 step(s) to run" in out, out
    for args, message in [
        (["build", "--jobs", "abc", "recipe.yaml"], "--jobs"),
        (["plan", "recipe.yaml", "--until"], "requires an argument"),
        (["plan"], "Missing argument"),
    ]:
        result, out = _probe(tmp_path, *args, pythonpath=path)
        assert result["rc"] == 2 and message in out and "Traceback" not in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zrecipe selects the BLAS on Linux only")
def test_openblas_loads_with_mlx_not_with_zrecipe():
    """`import zrecipe` (every command, `plan` included) leaves OpenBLAS alone; the first MLX import
    loads it first, so MLX still binds the fast BLAS."""
    code = (
        "import zrecipe, sys\n"
        "maps = lambda: open('/proc/self/maps').read().lower()\n"
        "print('openblas' in maps())\n"
        "from zrecipe.cli.main import app, run_app\n"
        "run_app(app, ['--help'])\n"
        "print('openblas' in maps())\n"
        "import mlx.core as mx\n"
        "from zrecipe import backend\n"
        "print('openblas' in maps(), backend.blas_status())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines[0] == "False" and lines[-2] == "False", proc.stdout + proc.stderr
    assert lines[-1].startswith("True OpenBLAS"), lines[-1]


@pytest.mark.parametrize(
    "args",
    [["plan", "--help"], ["build", "--help"], ["plan"], ["build", "--jobs", "x", "r.yaml"], ["--help"]],
)
def test_a_command_built_alone_says_what_the_whole_app_says(args, capsys):
    """typer builds only the command the arguments name: its help and usage errors are unchanged."""
    import typer.main

    from zrecipe.cli.main import _command, app

    def run(command):
        try:
            command.main(args=list(args), prog_name="zrecipe", standalone_mode=False)
        except Exception as exc:  # click's usage errors: compare their message
            return type(exc).__name__, exc.format_message(), capsys.readouterr()
        return None, None, capsys.readouterr()

    alone, whole = _command(app, list(args)), typer.main.get_command(app)
    assert len(alone.commands) == (len(whole.commands) if args[0] == "--help" else 1)
    assert run(alone) == run(whole)
