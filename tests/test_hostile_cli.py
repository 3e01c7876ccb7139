"""Hostile: the command line. Every usage error gets typer's own message and exit 2 (never a traceback),
whichever click typer uses; Ctrl-C exits 130 with one line; mflux's flag forms for `generate` work and
mean the same as the repeated form; the seed's command names keep the seed's flags."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers_hostile import make_project, run_cli, run_subprocess

USAGE_ERRORS = [
    (["build", "--no-such-flag", "r.yaml"], "No such option: --no-such-flag"),
    (["generate", "--promt", "x"], "No such option: --promt"),
    (["build"], "Missing argument"),
    (["plan"], "Missing argument"),
    (["build", "--jobs", "abc", "r.yaml"], "--jobs"),
    (["memory", "--mode", "lora", "--available-memory-gb", "lots"], "--available-memory-gb"),
    (["no-such-command"], "No such command"),
    (["generate"], "Missing option '--prompt'"),
    (["generate", "--prompt", "x", "--lora", "a.safetensors", "strong"], "the scale must be a number"),
    (["export", "r.yaml", "--format"], "requires an argument"),
]


@pytest.mark.parametrize(("argv", "message"), USAGE_ERRORS, ids=[" ".join(a) for a, _ in USAGE_ERRORS])
def test_usage_errors_exit_2_with_typers_message(tmp_path, argv, message):
    proc = run_subprocess(*argv, cwd=tmp_path)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "Traceback" not in text and message in text


def test_the_seed_command_names_keep_usage_errors(tmp_path):
    code = "import sys; from zrecipe.cli.main import generate_alias; sys.argv = ['mflux-generate-z-image-base', '--promt', 'x']; generate_alias()"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert (
        proc.returncode == 2 and "No such option: --promt" in proc.stderr and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize("form", ["chmod", "folder", "fifo"])
def test_unreadable_recipe(tmp_path, form):
    recipe = tmp_path / "r.yaml"
    if form == "chmod":
        make_project(tmp_path, "tiny")
        (tmp_path / "recipe.yaml").rename(recipe)
        recipe.chmod(0)
    elif form == "folder":
        recipe.mkdir()
    else:
        import os

        os.mkfifo(recipe)
    proc = run_subprocess("plan", recipe, unprivileged=form == "chmod", timeout=60)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2 and str(recipe) in text and "Traceback" not in text


def test_ctrl_c_exits_130_with_one_line(tmp_path, monkeypatch, capsys):
    import zrecipe.pipeline as pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "plan_recipe", interrupted)
    recipe = make_project(tmp_path, "tiny")
    rc, out, err = run_cli(capsys, "plan", recipe)
    assert rc == 130 and err.strip() == "interrupted" and out == ""


def test_os_fault_that_reaches_the_top_is_a_message(tmp_path, monkeypatch, capsys):
    # Any OSError on a user's path that no layer turned into a message still is one (exit 2).
    import zrecipe.pipeline as pipeline

    def disk_gone(*args, **kwargs):
        raise OSError(5, "Input/output error", str(tmp_path / "somewhere"))

    monkeypatch.setattr(pipeline, "plan_recipe", disk_gone)
    rc, _, err = run_cli(capsys, "plan", make_project(tmp_path, "tiny"))
    assert rc == 2 and f"{tmp_path / 'somewhere'}: input/output error" in err


def test_bugs_keep_their_traceback(tmp_path, monkeypatch, capsys):
    import zrecipe.pipeline as pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "plan_recipe", bug)
    with pytest.raises(ZeroDivisionError):
        run_cli(capsys, "plan", make_project(tmp_path, "tiny"))


# --- mflux's flag forms --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (["--lora-paths", "A", "B", "--lora-scales", "1", "0.5"],
         ["--lora-paths", "A", "--lora-paths", "B", "--lora-scales", "1", "--lora-scales", "0.5"]),
        (["--lora-paths", "A", "--lora-paths", "B"], ["--lora-paths", "A", "--lora-paths", "B"]),
        (["--lora", "A", "1", "--lora", "B", "0.5"],
         ["--lora-paths", "A", "--lora-paths", "B", "--lora-scales", "1.0", "--lora-scales", "0.5"]),
        (["--lora", "A", "0.7", "--lora-paths", "B"],
         ["--lora-paths", "A", "--lora-paths", "B", "--lora-scales", "0.7", "--lora-scales", "1.0"]),
        (["--lora-scales", "-0.5", "2", "--lora-paths", "A", "B"],
         ["--lora-paths", "A", "--lora-paths", "B", "--lora-scales", "-0.5", "--lora-scales", "2"]),
        (["--prompt", "x", "--", "--lora-paths", "A", "B"], ["--prompt", "x", "--", "--lora-paths", "A", "B"]),
    ],
)  # fmt: skip
def test_expand_generate_args(given, expected):
    from zrecipe.cli.generate import expand_generate_args

    # The LoRA options come first, paths then scales; everything else follows in its order.
    assert expand_generate_args(["generate", *given]) == ["generate", *expected]


def test_other_commands_are_not_rewritten():
    from zrecipe.cli.generate import expand_generate_args

    argv = ["build", "r.yaml", "--lora-paths", "A", "B"]
    assert expand_generate_args(argv) == argv


def test_mflux_forms_reach_generate_as_the_same_loras(tiny_model, tmp_path, monkeypatch, capsys):
    import importlib

    generation = importlib.import_module("zrecipe.generation.generate")  # the package re-exports the name
    seen = []

    def fake_generate(folder, settings, lora_paths, lora_scales, *args, **kwargs):
        seen.append(([p.name for p in lora_paths], lora_scales))
        return []

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.setattr(generation, "output_paths", lambda output, seeds: [])  # nothing to save
    base = ["generate", "--prompt", "x", "--model", tiny_model, "-o", tmp_path / "x.png"]
    forms = [
        ["--lora-paths", "a.safetensors", "b.safetensors", "--lora-scales", "1", "0.5"],
        ["--lora-paths", "a.safetensors", "--lora-paths", "b.safetensors", "--lora-scales", "1", "--lora-scales", "0.5"],
        ["--lora", "a.safetensors", "1", "--lora", "b.safetensors", "0.5"],
    ]  # fmt: skip
    for form in forms:
        assert run_cli(capsys, *base, *form)[0] == 0
    assert seen == [(["a.safetensors", "b.safetensors"], [1.0, 0.5])] * 3


def test_generate_help_documents_the_forms(capsys):
    rc, out, _ = run_cli(capsys, "generate", "--help")
    text = " ".join(out.replace("│", " ").split())  # typer's help panel wraps lines
    assert rc == 0 and "--lora PATH SCALE" in text and "--lora-paths A B" in text
