"""Hostile: values that validate alone but cannot work with this data or model — refused (or warned about)
at plan time with the key and the fix, before any step runs, instead of a MemoryError in training, a
silent clamp or a silent truncation."""

from __future__ import annotations

import warnings

import pytest
from helpers_hostile import make_project, run_cli, write_recipe

# Ten million examples per epoch (zrecipe.pipeline.checks.MAX_EPOCH_EXAMPLES).
MAX_EPOCH_EXAMPLES = 10_000_000


def test_repeats_too_large_for_an_epoch(tmp_path, capsys):
    recipe = make_project(tmp_path, "tiny", repeats=1_000_000_000)
    rc, _, err = run_cli(capsys, "plan", recipe)
    assert rc == 2 and "datasets[0].repeats: 1,000,000,000 × 4 images" in err and "lower `repeats`" in err
    write_recipe(recipe, "tiny", repeats=MAX_EPOCH_EXAMPLES // 4)  # exactly at the limit: fine
    rc, _, _ = run_cli(capsys, "plan", recipe)
    assert rc == 0


def test_rank_larger_than_the_layer(tmp_path, capsys):
    recipe = make_project(tmp_path, "tiny", rank=65)  # the tiny model's attention is 64 → 64
    rc, _, err = run_cli(capsys, "plan", recipe)
    assert rc == 2 and "rank 65 is larger than attention.to_q (64 → 64 features)" in err
    write_recipe(recipe, "tiny", rank=64)
    assert run_cli(capsys, "plan", recipe)[0] == 0


@pytest.mark.parametrize("block_range", ["[0, 3]", "[2, 3]", "[5, 9]"])
def test_block_range_past_the_last_block(tmp_path, capsys, block_range):
    recipe = make_project(tmp_path, "tiny", block_range=block_range)
    rc, _, err = run_cli(capsys, "plan", recipe)
    assert rc == 2 and "the model has 2 layers blocks (0..1, end is exclusive)" in err


def test_model_checks_use_the_model_folder(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model, block_range="[0, 30]")  # the seed's range, a 2-block model
    rc, _, err = run_cli(capsys, "build", recipe, "--quiet")
    assert rc == 2 and "layers[0:30]" in err
    assert not list((tmp_path / "cache").glob("objects/*/*"))  # refused before any step


def test_layer_shapes_match_the_real_modules(tiny_model):
    import json

    import mlx.nn as nn

    from zrecipe.models.z_image.transformer import load_transformer
    from zrecipe.pipeline.checks import block_counts, layer_shapes

    config = json.loads((tiny_model / "transformer" / "config.json").read_text())
    model = load_transformer(tiny_model)
    modules = dict(model.named_modules())
    shapes = layer_shapes(config)
    for block_type, count in block_counts(config).items():
        assert (
            f"{block_type}.{count - 1}.attention.to_q" in modules and f"{block_type}.{count}" not in modules
        )
        for layer_type, (fan_in, fan_out) in shapes.items():
            module = modules.get(f"{block_type}.0.{layer_type}")
            if module is None:  # context_refiner has no adaLN_modulation
                continue
            assert isinstance(module, nn.Linear)
            assert tuple(module.weight.shape) == (fan_out, fan_in), layer_type


def test_long_captions_are_counted_at_plan_time(tmp_path, tiny_model, capsys):
    recipe = make_project(tmp_path, tiny_model)
    captions = sorted((tmp_path / "data").glob("*.txt"))
    long = " ".join(f"word{i}" for i in range(700))
    for side in captions[:2]:
        side.write_text(f"{side.stem} {long}")
    rc, _, err = run_cli(capsys, "plan", recipe)
    assert rc == 0
    assert "warning: 2 caption(s)/prompt(s) are longer than the text encoder's 512 tokens" in err
    assert captions[0].with_suffix(".png").name in err or captions[0].stem in err
    # Once encoded, they are not stale: a no-op plan neither tokenizes nor warns again.
    assert run_cli(capsys, "build", recipe, "--quiet")[0] == 0
    rc, _, err = run_cli(capsys, "plan", recipe)
    assert rc == 0 and "warning" not in err
    # Editing the ignored tail is still an edit (the text's key covers all of it): one stale text, warned.
    captions[0].write_text(captions[0].read_text() + " more")
    rc, out, err = run_cli(capsys, "plan", recipe)
    assert "warning: 1 caption(s)/prompt(s)" in err and "1 stale" in out


def test_no_warning_for_short_captions(tmp_path, tiny_model, capsys):
    from zrecipe.errors import ZRecipeWarning

    recipe = make_project(tmp_path, tiny_model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZRecipeWarning)
        assert run_cli(capsys, "plan", recipe)[0] == 0
