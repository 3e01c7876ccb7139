"""`zrecipe --help` and `zrecipe plan` stay light: no MLX (nor numpy, PIL, torch, safetensors) imported.

Each check runs the CLI in a fresh interpreter (this test process may already have imported MLX) and lists
the heavy top-level modules present in `sys.modules` when the command has finished.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("mlx", "numpy", "PIL", "torch", "safetensors", "transformers", "diffusers")

PROBE = """
import json, sys
from zrecipe.cli.main import app, run_app
rc = run_app(app, sys.argv[1:])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
print("PROBE " + json.dumps({"rc": rc, "heavy": heavy}))
""".replace("HEAVY", repr(HEAVY))

RECIPE = """model: tiny
mode: lora
datasets:
  - name: d
    path: data
    resolution: 64
training_loop:
  max_steps: 2
sample:
  prompts: [a red square]
export:
  formats: [mflux]
"""

# A valid 1×1 PNG: planning never decodes images, but the bytes are those of a real one.
PNG_1X1 = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8cf"
    "c0000003010100c9fe92ef0000000049454e44ae426082"
)


def run_probe(cwd: Path, *args: str) -> tuple[dict, str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, proc.stdout + proc.stderr
    return json.loads(line[6:]), proc.stdout


def test_help_imports_no_heavy_module(tmp_path: Path) -> None:
    result, out = run_probe(tmp_path, "--help")
    assert result["rc"] == 0 and "plan" in out
    assert result["heavy"] == []


def test_plan_imports_no_heavy_module(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"img{i}.png").write_bytes(PNG_1X1)
        (data / f"img{i}.txt").write_text(f"caption {i}")
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    # The whole graph (the tiny model is identified without being created), then the --until form.
    result, out = run_probe(tmp_path, "plan", "recipe.yaml", "--json")
    assert result["rc"] == 0, out
    plan = json.loads(out[: out.index("PROBE ")])
    assert plan["kinds"]["resize"]["total"] == 3 and plan["kinds"]["train"]["total"] == 1
    assert result["heavy"] == []
    result, out = run_probe(tmp_path, "plan", "recipe.yaml", "--until", "resize")
    assert result["rc"] == 0 and "resize" in out
    assert result["heavy"] == []
