"""The training methods through the build on the tiny model: an optimiser, loss weighting, noise offset,
EMA (final file, per-checkpoint samples and exports from it) and TensorBoard logs land where the README
says, and `explain` names each changed key."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_e2e_build import make_project, ran, tiny_model, zrecipe  # noqa: F401 (tiny_model: a fixture)

METHODS = {
    "  gradient_accumulation_steps: 2\n": (
        "  gradient_accumulation_steps: 2\n  loss_weighting: cosmap\n  noise_offset: 0.05\n"
        "  tensorboard: true\n  ema: {decay: 0.5}\n"
    ),
    "optimizer:\n  learning_rate: 1.0e-3\n": "optimizer:\n  name: Lion\n  learning_rate: 1.0e-4\n",
    "  seeds: [1]\n": "  seeds: [1]\n  every: 2\n  use_ema: true\n",
    "export:\n": "export:\n  use_ema: true\n",
}


def test_training_methods_in_a_build(tmp_path, tiny_model, capsys):  # noqa: F811
    import mlx.core as mx

    from zrecipe.export.lora_formats import read_lora

    recipe = make_project(tmp_path, tiny_model, steps=4, every=2)
    text = recipe.read_text()
    for old, new in METHODS.items():
        assert old in text
        text = text.replace(old, new)
    recipe.write_text(text)
    assert zrecipe("build", recipe) == 0
    out = tmp_path / "out"
    raw, ema = out / "adapter.safetensors", out / "adapter_ema.safetensors"
    assert raw.is_file() and ema.is_file()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert "tensorboard:" in capsys.readouterr().out
    steps = [h["step"] for h in json.loads((out / "loss.json").read_text())]
    assert steps == [1, 2, 3, 4]

    # the export is the EMA's LoRA (in bf16), not the trained one's
    exported = read_lora(out / "exports" / "recipe_mflux.safetensors").deltas
    averaged, trained = read_lora(ema).deltas, read_lora(raw).deltas
    for path, delta in averaged.items():
        got = np.array(exported[path].weight_delta(None).astype(mx.float32))
        np.testing.assert_allclose(got, np.array(delta.weight_delta(None)), rtol=2e-2, atol=1e-6)
    assert any(
        not np.allclose(
            np.array(exported[p].weight_delta(None).astype(mx.float32)),
            np.array(d.weight_delta(None)),
            rtol=2e-2,
            atol=1e-6,
        )  # fmt: skip
        for p, d in trained.items()
    )

    # sampling the trained weights instead: only the samples run again, and they change
    before = sorted((out / "samples").glob("*.png"))
    images = {p.name: p.read_bytes() for p in before}
    recipe.write_text(recipe.read_text().replace("  use_ema: true\n", "  use_ema: false\n", 1))
    capsys.readouterr()
    assert zrecipe("explain", recipe, "sample") == 0
    assert "use_ema" in capsys.readouterr().out
    assert zrecipe("build", recipe) == 0
    counts = ran(recipe)
    assert counts["train"] == 0 and counts["sample"] == 1 and counts["export"] == 0
    assert any(images[p.name] != p.read_bytes() for p in sorted((out / "samples").glob("*.png")))

    # explain names a changed training key
    for old, new, shown in (
        ("ema: {decay: 0.5}", "ema: {decay: 0.7}", "training_loop.ema.decay 0.5 → 0.7"),
        ("loss_weighting: cosmap", "loss_weighting: sigma_sqrt", 'training_loop.loss_weighting "cosmap" → "sigma_sqrt"'),
        ("name: Lion", "name: SGD", 'optimizer.name "Lion" → "SGD"'),
    ):  # fmt: skip
        recipe.write_text(recipe.read_text().replace(old, new))
        capsys.readouterr()
        assert zrecipe("explain", recipe, "train") == 0
        assert shown in capsys.readouterr().out
        recipe.write_text(recipe.read_text().replace(new, old))


@pytest.mark.parametrize("key", ["sample", "export"])
def test_use_ema_without_ema_is_a_recipe_error(tmp_path, tiny_model, capsys, key):  # noqa: F811
    recipe = make_project(tmp_path, tiny_model)
    text = recipe.read_text()
    text = (
        text.replace("  seeds: [1]\n", "  seeds: [1]\n  use_ema: true\n")
        if key == "sample"
        else text.replace("export:\n", "export:\n  use_ema: true\n")
    )
    recipe.write_text(text)
    assert zrecipe("plan", recipe) == 2
    assert f"{key}.use_ema: needs `training_loop.ema" in capsys.readouterr().err
