"""The recipe language: defaults, every error kind with file:line and key path, the seed configs,
JSON/YAML equivalence, path resolution, LoRA forms, caption sources and the recipe hash."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zrecipe.errors import RecipeError, UserError
from zrecipe.recipe import (
    Bucketing,
    CaptionSource,
    Dataset,
    Export,
    FullFinetune,
    LoraSpec,
    LoraTarget,
    Optimizer,
    Recipe,
    Sample,
    Save,
    TrainingLoop,
    load_recipe,
    recipe_hash,
)

SEED = Path(__file__).parent / "fixtures" / "seed"
ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")

BASE = """\
model: tiny
mode: lora
seed: 7
datasets:
  - path: data
training_loop:
  max_steps: 10
"""


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    return tmp_path


def load(folder: Path, text: str, name: str = "recipe.yaml") -> Recipe:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return load_recipe(path)


def problems(folder: Path, text: str, name: str = "recipe.yaml") -> list[str]:
    """The problems of a bad recipe, with the `FILE:` prefix checked and removed."""
    with pytest.raises(RecipeError) as info:
        load(folder, text, name)
    err = info.value
    assert isinstance(err, UserError) and err.exit_code == 2
    assert str(err) == "\n".join(err.problems)
    prefix = f"{folder / name}:"
    assert all(p.startswith(prefix) for p in err.problems), err.problems
    return [p[len(prefix) :] for p in err.problems]


# ------------------------------------------------------------------------------------------ seed configs


def test_seed_lora_config_loads_unchanged(tmp_path):
    shutil.copy(SEED / "lora_config.json", tmp_path)
    (tmp_path / "images").mkdir()
    r = load_recipe(tmp_path / "lora_config.json")
    assert (r.model, r.mode, r.seed) == ("z-image", "lora", 42)
    assert r.datasets == (
        Dataset(
            name="images",
            path=tmp_path / "images",
            resolution=1024,
            captions=CaptionSource(
                kind="inline", items=(("img1.jpg", "description 1"), ("img2.jpg", "description 2"))
            ),
        ),
    )
    assert r.training_loop == TrainingLoop(num_epochs=10, batch_size=16)
    assert r.optimizer == Optimizer(learning_rate=1e-4)
    assert r.lora == LoraSpec((LoraTarget("layers", 0, 30, ATTN, 32, 32.0),))
    assert r.save == Save(output_path=Path(os.path.expanduser("~/z_image_lora")), checkpoint_frequency=500)
    # The seed's top-level steps / guidance / width / height are the sample settings.
    assert r.sample == Sample(steps=50, guidance=3.5, width=1024, height=1024, seeds=(42,))


def test_seed_lora_config_without_images_folder_names_the_line(tmp_path):
    shutil.copy(SEED / "lora_config.json", tmp_path)
    lines = (tmp_path / "lora_config.json").read_text().splitlines()
    line = next(i for i, s in enumerate(lines, 1) if '"path": "./images"' in s)
    got = problems(tmp_path, (tmp_path / "lora_config.json").read_text(), "lora_config.json")
    assert got == [
        (
            f"{line}: examples.path: folder not found: {tmp_path / 'images'} "
            f"(relative paths resolve against {tmp_path})"
        )
    ]


def test_seed_full_config_loads_with_no_dataset(tmp_path):
    shutil.copy(SEED / "full_config.json", tmp_path)
    r = load_recipe(tmp_path / "full_config.json")
    assert r.mode == "full" and r.datasets == () and r.lora is None and r.sample is None
    assert r.training_loop == TrainingLoop(num_epochs=5, batch_size=8, gradient_accumulation_steps=4)
    assert r.optimizer.learning_rate == 1e-5
    assert r.full_finetune == FullFinetune(True, False, False)


# ---------------------------------------------------------------------------------------------- defaults


def test_every_section_default(proj):
    r = load(proj, BASE)
    assert r.source == proj / "recipe.yaml" and r.root == proj and r.cache is None
    assert r.datasets == (Dataset(name="data", path=proj / "data"),)
    d = r.datasets[0]
    assert (d.repeats, d.resolution, d.upscale, d.recursive, d.trigger, d.caption_dropout, d.on_error) == (
        1,
        1024,
        False,
        False,
        None,
        0.0,
        "fail",
    )
    assert d.captions == CaptionSource("sidecar", None, (), None, ".txt")
    assert d.bucketing == Bucketing(True, 2.0, 16)
    assert r.training_loop == TrainingLoop(
        num_epochs=None,
        max_steps=10,
        batch_size=1,
        gradient_accumulation_steps=1,
        sigma_sampling="shifted",
        logit_mean=0.0,
        logit_std=1.0,
        shift=None,
        gradient_checkpointing=False,
        compute_dtype="auto",
        max_grad_norm=1.0,
        low_ram=False,
        quantize=None,
    )
    assert r.optimizer == Optimizer("AdamW", 1e-4, (0.9, 0.999), 0.01, 1e-8, 0, "constant", 0.0)
    # mode lora with no LoRA section: attention q/k/v/out of every `layers` block, rank 16, alpha = rank.
    assert r.lora == LoraSpec((LoraTarget("layers", 0, None, ATTN, 16, 16.0),))
    assert r.full_finetune == FullFinetune(True, False, False)
    assert r.save == Save(output_path=proj / "output" / "recipe", checkpoint_frequency=500, keep_last=None)
    assert r.sample is None
    assert r.export == Export(
        output_path=proj / "output" / "recipe" / "exports", formats=(), dtype="bfloat16"
    )


def test_sample_defaults_and_seed_zero(proj):
    r = load(proj, BASE.replace("seed: 7", "seed: 0") + "sample:\n  prompts: [a cat]\n")
    assert r.seed == 0
    assert r.sample == Sample(
        prompts=("a cat",),
        negative_prompt="",
        guidance=3.5,
        steps=50,
        width=1024,
        height=1024,
        seeds=(0,),
        every=None,
        cfg_normalization=False,
        cfg_truncation=1.0,
    )


def test_top_level_sample_settings_fill_defaults_and_sample_section_wins(proj):
    r = load(proj, BASE + "steps: 20\nguidance: 4.0\nwidth: 512\nsample:\n  steps: 30\n  seeds: [1, 2]\n")
    assert (r.sample.steps, r.sample.guidance, r.sample.width, r.sample.height, r.sample.seeds) == (
        30,
        4.0,
        512,
        1024,
        (1, 2),
    )


def test_examples_resolution_comes_from_width_height(proj):
    r = load(
        proj,
        "model: tiny\nwidth: 512\nheight: 768\ntraining_loop: {max_steps: 1}\n"
        "examples: {path: data, images: [{image: a.png, prompt: x}]}\n",
    )
    assert r.datasets[0].resolution == 768 and r.datasets[0].name == "data"


def test_full_mode_defaults(proj):
    r = load(proj, BASE.replace("mode: lora", "mode: full"))
    assert r.lora is None and r.full_finetune == FullFinetune()


# ------------------------------------------------------------------------------------------ error kinds


@pytest.mark.parametrize(
    "extra, expected",
    [
        ("sed: 1", "8: sed: unknown key; did you mean `seed`?"),
        ("learning_rate: 0.1", "8: learning_rate: unknown key; it belongs in `optimizer`"),
        (
            "optimizer:\n  learning_rat: 1e-4",
            "9: optimizer.learning_rat: unknown key; did you mean `learning_rate`?",
        ),
        ("optimizer:\n  learning_rate: 0", "9: optimizer.learning_rate: must be greater than 0, got 0"),
        (
            "optimizer:\n  learning_rate: -1e-4",
            "9: optimizer.learning_rate: must be greater than 0, got -0.0001",
        ),
        ("optimizer:\n  learning_rate: .nan", "9: optimizer.learning_rate: must be a finite number, got nan"),
        (
            "optimizer: {name: Lamb}",
            "8: optimizer.name: must be one of AdamW, AdamW8bit, Lion, SGD, Adafactor, Prodigy; got 'Lamb'",
        ),
        (
            "optimizer: {name: adamw}",
            "8: optimizer.name: must be one of AdamW, AdamW8bit, Lion, SGD, Adafactor, Prodigy; got 'adamw'; "
            "did you mean `AdamW`?",
        ),
        (
            "optimizer: {name: SGD, betas: [0.9, 0.9]}",
            "8: optimizer.betas: not used by SGD (AdamW, AdamW8bit, Lion, Prodigy only); remove it",
        ),
        ("optimizer: {momentum: 0.9}", "8: optimizer.momentum: not used by AdamW (SGD only); remove it"),
        ("optimizer: {name: SGD, momentum: 1.0}", "8: optimizer.momentum: must be less than 1, got 1"),
        (
            "optimizer: {name: SGD, momentum: 0, nesterov: true}",
            "8: optimizer.nesterov: Nesterov momentum needs momentum > 0",
        ),
        ("optimizer: {name: Prodigy, d0: 0}", "8: optimizer.d0: must be greater than 0, got 0"),
        (
            "optimizer: {name: Prodigy, growth_rate: 0.5}",
            "8: optimizer.growth_rate: must be at least 1, got 0.5",
        ),
        (
            "optimizer: {name: AdamW8bit, min_8bit_size: 0}",
            "8: optimizer.min_8bit_size: must be at least 1, got 0",
        ),
        (
            "optimizer: {name: Adafactor, decay_rate: 0.8}",
            "8: optimizer.decay_rate: must be less than 0, got 0.8",
        ),
        (
            "optimizer: {name: Adafactor, warmup_init: true}",
            "8: optimizer.warmup_init: needs `relative_step: true` (it warms up the relative step)",
        ),
        (
            "optimizer: {name: Adafactor, relative_step: true, learning_rate: 1e-3}",
            "8: optimizer.learning_rate: Adafactor with `relative_step: true` computes its own step size, "
            "min(1e-2, 1/sqrt(t)); remove it or set relative_step: false",
        ),
        (
            "optimizer: {num_cycles: 2}",
            "8: optimizer.num_cycles: only used by `schedule: cosine_with_restarts`; remove it",
        ),
        (
            "optimizer: {schedule: cosine_with_restarts, num_cycles: 0}",
            "8: optimizer.num_cycles: must be at least 1, got 0",
        ),
        (
            "optimizer: {schedule: linear, min_learning_rate: 1e-6}",
            "8: optimizer.min_learning_rate: `linear` decays to 0 as transformers' schedule does; min_learning_rate "
            "is the `cosine` schedule's floor. Remove it or use `schedule: cosine`",
        ),
        ("optimizer: {betas: [0.9, 1.0]}", "8: optimizer.betas[1]: must be less than 1, got 1"),
        (
            "optimizer: {schedule: cosin}",
            "8: optimizer.schedule: must be one of constant, cosine, constant_with_warmup, linear, "
            "cosine_with_restarts; got 'cosin'; did you mean `cosine`?",
        ),
        (
            "optimizer: {learning_rate: 1e-4, min_learning_rate: 1e-3}",
            "8: optimizer.min_learning_rate: must not exceed learning_rate (0.0001), got 0.001",
        ),
        (
            "optimizer: {warmup_steps: 11}",
            "8: optimizer.warmup_steps: longer than training_loop.max_steps (10), got 11",
        ),
        ("mode: ful", "8: mode: duplicate key (first at line 2)"),
        (
            "export: {use_ema: true}",
            "8: export.use_ema: needs `training_loop.ema: {decay: ...}` (no EMA weights are kept)",
        ),
        ("sample: {use_ema: 1}", "8: sample.use_ema: expected true or false, got 1 (an integer)"),
        ("sample: {width: 1000}", "8: sample.width: must be a multiple of 16, got 1000 (try 992)"),
        ("sample: {seeds: []}", "8: sample.seeds: must not be empty"),
        ("sample: {cfg_truncation: 2}", "8: sample.cfg_truncation: must be at most 1, got 2"),
        ("sample: {prompts: a cat}", "8: sample.prompts: expected a list, got 'a cat' (text)"),
        (
            "export: {formats: [kohya, safetensors]}",
            "8: export.formats[1]: must be one of mflux, comfyui, diffusers, kohya, musubi; got 'safetensors'",
        ),
        (
            "export: {dtype: float16}",
            "8: export.dtype: must be one of bfloat16, float32; got 'float16'; did you mean `bfloat16`?",
        ),
        ("save: {checkpoint_frequency: 0}", "8: save.checkpoint_frequency: must be at least 1, got 0"),
        ("save: {keep_last: true}", "8: save.keep_last: expected an integer or null, got true (a boolean)"),
        ("steps: 0", "8: steps: must be at least 1, got 0"),
        ("width: 100", "8: width: must be a multiple of 16, got 100 (try 96)"),
        (
            "cache: $ZRECIPE_TEST_UNSET_VAR/x",
            "8: cache: environment variable $ZRECIPE_TEST_UNSET_VAR is not set",
        ),
    ],
)
def test_error_names_line_and_key(proj, extra, expected):
    assert problems(proj, BASE + extra + "\n") == [expected]


@pytest.mark.parametrize(
    "replace, by, expected",
    [
        ("seed: 7", "seed: true", "3: seed: expected an integer, got true (a boolean)"),
        ("seed: 7", "seed: -1", "3: seed: must be at least 0, got -1"),
        ("seed: 7", "seed: 1.5", "3: seed: expected an integer, got 1.5 (a number)"),
        ("mode: lora", "mode: dreambooth", "2: mode: must be one of lora, full; got 'dreambooth'"),
        (
            "model: tiny",
            "model: z-imag",
            "1: model: unknown model preset 'z-imag'; did you mean `z-image`? (or give a folder as ./z-imag)",
        ),
        ("model: tiny", "model: 3", "1: model: expected text, got 3 (an integer)"),
        ("  max_steps: 10", "  max_steps: 0", "7: training_loop.max_steps: must be at least 1, got 0"),
        (
            "  max_steps: 10",
            "  max_steps: true",
            "7: training_loop.max_steps: expected an integer or null, got true (a boolean)",
        ),
        (
            "  max_steps: 10",
            "  num_epochs: null",
            "6: training_loop: set `num_epochs` or `max_steps` (or both: training stops at the first reached)",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  batch_size: big",
            "8: training_loop.batch_size: expected an integer or `auto`, got 'big' (text)",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  sigma_sampling: logitnormal",
            (
                "8: training_loop.sigma_sampling: must be one of shifted, uniform, logit_normal; got 'logitnormal'; "
                "did you mean `logit_normal`?"
            ),
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  quantize: 6",
            "8: training_loop.quantize: must be one of 4, 8 or null, got 6",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  loss_weighting: cosmapp",
            "8: training_loop.loss_weighting: must be one of none, sigma_sqrt, cosmap, logit_normal; got "
            "'cosmapp'; did you mean `cosmap`?",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  sigma_sampling: logit_normal\n  loss_weighting: logit_normal",
            "9: training_loop.loss_weighting: `logit_normal` weighting on logit-normal σ samples applies the "
            "density twice; use one of them (sigma_sampling: logit_normal samples by it, loss_weighting: "
            "logit_normal weights by it)",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  noise_offset: -0.1",
            "8: training_loop.noise_offset: must be at least 0, got -0.1",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  tensorboard: 1",
            "8: training_loop.tensorboard: expected true or false, got 1 (an integer)",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  ema: {decay: 1}",
            "8: training_loop.ema.decay: must be less than 1, got 1",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  ema: {dacay: 0.9}",
            "8: training_loop.ema.dacay: unknown key; did you mean `decay`?",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  ema: {every: 0}",
            "8: training_loop.ema.every: must be at least 1, got 0",
        ),
        (
            "  max_steps: 10",
            "  max_steps: 1\n  ema: 0.999",
            "8: training_loop.ema: expected a mapping of decay, start_step, every (or null for no EMA), got 0.999 (a number)",
        ),
        (
            "  - path: data",
            "  - path: data\n    repeats: 0",
            "6: datasets[0].repeats: must be at least 1, got 0",
        ),
        (
            "  - path: data",
            "  - path: data\n    repeats: 2.0",
            "6: datasets[0].repeats: expected an integer, got 2.0 (a number)",
        ),
        (
            "  - path: data",
            "  - path: data\n    resolution: 1000",
            "6: datasets[0].resolution: must be a multiple of 16, got 1000 (try 992)",
        ),
        (
            "  - path: data",
            "  - path: data\n    resolution: 48",
            "6: datasets[0].resolution: must be at least 64, got 48",
        ),
        (
            "  - path: data",
            "  - path: data\n    caption_dropout: 1.0",
            "6: datasets[0].caption_dropout: must be less than 1, got 1",
        ),
        (
            "  - path: data",
            "  - path: data\n    caption_dropout: -0.1",
            "6: datasets[0].caption_dropout: must be at least 0, got -0.1",
        ),
        (
            "  - path: data",
            "  - path: data\n    upscale: 1",
            "6: datasets[0].upscale: expected true or false, got 1 (an integer)",
        ),
        (
            "  - path: data",
            "  - path: data\n    on_error: ignore",
            "6: datasets[0].on_error: must be one of fail, skip; got 'ignore'",
        ),
        (
            "  - path: data",
            "  - path: data\n    bucketing: {max_aspect: 0.5}",
            "6: datasets[0].bucketing.max_aspect: must be at least 1, got 0.5",
        ),
        (
            "  - path: data",
            "  - path: data\n    bucketing: {step: 32}",
            "6: datasets[0].bucketing.step: unknown key",
        ),
        (
            "  - path: data",
            "  - path: data\n    captoins: filename",
            "6: datasets[0].captoins: unknown key; did you mean `captions`?",
        ),
        (
            "  - path: data",
            "  - path: missing",
            ("5: datasets[0].path: folder not found: {proj}/missing (relative paths resolve against {proj})"),
        ),
        ("  - path: data", "  - name: x", "5: datasets[0].path: missing; the folder of images"),
        (
            "datasets:\n  - path: data",
            "datasets: data",
            "4: datasets: expected a list of datasets (`- path: FOLDER`), got 'data' (text)",
        ),
        (
            "model: tiny\n",
            "",
            (
                "1: model: missing; a preset (z-image, z-image-turbo, tiny), a model folder or a Hugging "
                "Face repo id such as Tongyi-MAI/Z-Image"
            ),
        ),
        (
            "training_loop:\n  max_steps: 10\n",
            "",
            "1: training_loop: missing; set `training_loop: {num_epochs: N}` or `max_steps: N`",
        ),
    ],
)
def test_error_in_place_names_line_and_key(proj, replace, by, expected):
    text = BASE.replace(replace, by)
    assert text != BASE
    assert problems(proj, text) == [expected.replace("{proj}", str(proj))]


@pytest.mark.parametrize(
    "captions, expected",
    [
        (
            "{manifest: caps.jsonl}",
            "manifest file not found: {proj}/caps.jsonl (relative paths resolve against {proj})",
        ),
        ("{manifest: caps.txt}", "a manifest is a .jsonl or .csv file, got 'caps.txt'"),
        (
            "{template: 'a {captoin}'}",
            "unknown placeholder {captoin}; use {trigger}, {caption} or {filename}; did you mean `caption`?",
        ),
        ("{template: 'a {trigger}'}", "uses {trigger} but the dataset sets no `trigger`"),
        (
            "{template: 'a {'}",
            (
                "not a valid template (Single '{' encountered in format string); write literal braces "
                "as {{ and }}"
            ),
        ),
        ("{extension: txt}", "must be a file extension such as `.txt`, got 'txt'"),
        (
            "{inline: [{image: a.png, caption: x}, {image: ./a.png, caption: y}]}",
            "'a.png' is listed twice (also item 0)",
        ),
        (
            "{inline: [{image: ../a.png, caption: x}]}",
            "must be a file inside the dataset folder, got '../a.png'",
        ),
        ("{inline: [{image: a.png}]}", "missing `caption`"),
        (
            "sidecars",
            (
                "must be `sidecar` or `filename`, or a mapping such as `{manifest: FILE}`, `{inline: [...]}`, "
                "`{template: TEXT}`; got 'sidecars'; did you mean `sidecar`?"
            ),
        ),
        ("{manifest: a.csv, template: x}", "choose one caption source, got manifest, template"),
    ],
)
def test_caption_source_errors(proj, captions, expected):
    got = problems(proj, BASE.replace("  - path: data", f"  - path: data\n    captions: {captions}"))
    assert len(got) == 1 and got[0].startswith("6: datasets[0].captions")
    assert got[0].split(": ", 2)[2] == expected.replace("{proj}", str(proj))


def test_several_problems_reported_at_once_in_line_order(proj):
    text = (
        "model: tiny\nmode: lora\nseed: -3\ndatasets:\n  - path: nope\n    repeats: 0\n"
        "training_loop:\n  max_steps: 10\n  batch_size: 0\noptimizer:\n  learning_rat: 1e-4\n"
        "lora:\n  rank: 0\n"
    )
    got = problems(proj, text)
    assert [g.split(":")[0] for g in got] == ["3", "5", "6", "9", "11", "13"]
    assert got[4] == "11: optimizer.learning_rat: unknown key; did you mean `learning_rate`?"


def test_yaml_syntax_error_has_line(proj):
    got = problems(proj, BASE + "optimizer: {learning_rate: 1e-4\nsave: x\n")
    assert len(got) == 1 and got[0].startswith("9: invalid YAML:")


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            b"model: tiny\nseed: \xff\n",
            "2: not UTF-8 text (byte 0xff at offset 18); save the recipe as UTF-8",
        ),
        (b"", "1: the recipe is empty; start from `zrecipe init` or the README's example"),
        (b"- a\n- b\n", "1: expected a mapping of keys, got a list"),
        (b"[1, 2", None),
        (b"a: !python/object:os.system x\n", None),
        (b"a: &x [*x]\n", None),
    ],
)
def test_unreadable_text_is_a_recipe_error(proj, data, expected):
    (proj / "r.yaml").write_bytes(data)
    with pytest.raises(RecipeError) as info:
        load_recipe(proj / "r.yaml")
    assert all(p.startswith(f"{proj / 'r.yaml'}:") for p in info.value.problems)
    if expected:
        assert info.value.problems[0] == f"{proj / 'r.yaml'}:{expected}"


def test_missing_file_and_folder_are_recipe_errors(proj):
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(proj / "nope.yaml")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(proj / "data")


def test_from_dict_errors_have_no_line_and_root_is_cwd(proj, monkeypatch):
    monkeypatch.chdir(proj)
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict({"model": "tiny", "training_loop": {"max_steps": True}})
    assert info.value.problems == [
        "<recipe>: training_loop.max_steps: expected an integer or null, got true (a boolean)"
    ]
    r = Recipe.from_dict({"model": "tiny", "training_loop": {"max_steps": 1}, "datasets": [{"path": "data"}]})
    assert r.datasets[0].path == proj / "data"
    with pytest.raises(RecipeError, match="keys must be text"):
        Recipe.from_dict({1: 2, "model": "tiny", "training_loop": {"max_steps": 1}})


def test_duplicate_dataset_names(proj):
    (proj / "other" / "data").mkdir(parents=True)
    got = problems(proj, BASE.replace("  - path: data", "  - path: data\n  - path: other/data"))
    assert got == [
        "6: datasets[1].name: dataset name 'data' is already used by datasets[0]; set a different `name:`"
    ]
    r = load(proj, BASE.replace("  - path: data", "  - path: data\n  - path: other/data\n    name: b"))
    assert [d.name for d in r.datasets] == ["data", "b"]


def test_full_finetune_rejects_training_frozen_parts(proj):
    text = (
        BASE.replace("mode: lora", "mode: full")
        + "full_finetune:\n  train_vae: true\n  train_text_encoder: true\n"
    )
    assert problems(proj, text) == [
        "9: full_finetune.train_vae: not supported: the VAE and text encoder stay frozen; set it to false",
        "10: full_finetune.train_text_encoder: not supported: the VAE and text encoder stay frozen; set it to false",
    ]


# ------------------------------------------------------------------------------------------------- LoRA

SEED_LORA = """\
lora_layers:
  {group}:
    block_range: {{start: 0, end: 2}}
    layer_types: {types}
    lora_rank: 4
"""


def test_lora_seed_form_groups_and_alpha(proj):
    r = load(
        proj,
        BASE
        + SEED_LORA.format(group="main_layers", types="[attention.to_q]")
        + "  refine:\n    block_type: noise_refiner\n    layer_types: [feed_forward]\n    lora_rank: 8\n"
        "    lora_alpha: 4\n  context_refiner:\n    layer_types: [attention.to_k, attention.to_q]\n"
        "    lora_rank: 2\n",
    )
    assert r.lora.targets == (
        LoraTarget("layers", 0, 2, ("attention.to_q",), 4, 4.0),
        LoraTarget(
            "noise_refiner", 0, None, ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"), 8, 4.0
        ),
        LoraTarget("context_refiner", 0, None, ("attention.to_q", "attention.to_k"), 2, 2.0),
    )


@pytest.mark.parametrize(
    "group, types, expected",
    [
        (
            "context_refiner",
            "[adaLN_modulation.0]",
            (
                "11: lora_layers.context_refiner.layer_types[0]: context_refiner blocks have no adaLN_modulation.0 "
                "(they have no timestep modulation)"
            ),
        ),
        (
            "layers",
            "[attention.to_qq]",
            "11: lora_layers.layers.layer_types[0]: unknown layer type 'attention.to_qq'; "
            "did you mean `attention.to_q`?; known: "
            + ", ".join(ATTN)
            + ", feed_forward.w1, feed_forward.w2, "
            "feed_forward.w3, adaLN_modulation.0",
        ),
        (
            "layers",
            "[attention, attention.to_q]",
            "11: lora_layers.layers.layer_types[1]: attention.to_q is listed twice",
        ),
        ("layers", "[]", "11: lora_layers.layers.layer_types: must not be empty"),
        (
            "blocks",
            "[attention.to_q]",
            (
                "9: lora_layers.blocks: cannot tell which blocks this group targets: name it "
                "layers (or main_layers), noise_refiner or context_refiner, or set `block_type`"
            ),
        ),
    ],
)
def test_lora_seed_form_errors(proj, group, types, expected):
    assert problems(proj, BASE + SEED_LORA.format(group=group, types=types)) == [expected]


def test_lora_block_range_and_rank_errors(proj):
    text = BASE + "lora_layers:\n  layers:\n    block_range: {start: 5, end: 5}\n    lora_rank: 0\n"
    assert problems(proj, text) == [
        "10: lora_layers.layers.block_range: start must be less than end (end is exclusive), got start 5, end 5",
        "11: lora_layers.layers.lora_rank: must be at least 1, got 0",
    ]


def test_lora_native_form(proj):
    r = load(
        proj,
        BASE
        + "lora:\n  rank: 8\n  targets:\n    - {blocks: layers, range: [0, 30], layer_types: [attention]}\n"
        "    - {blocks: layers, range: [0, 30], layer_types: [feed_forward.w1], rank: 4, alpha: 2}\n"
        "    - {blocks: context_refiner, range: [1, null]}\n",
    )
    assert r.lora.targets == (
        LoraTarget("layers", 0, 30, ATTN, 8, 8.0),
        LoraTarget("layers", 0, 30, ("feed_forward.w1",), 4, 2.0),
        LoraTarget("context_refiner", 1, None, ATTN, 8, 8.0),
    )
    assert load(proj, BASE + "lora: {rank: 4, alpha: 1}\n").lora.targets == (
        LoraTarget("layers", 0, None, ATTN, 4, 1.0),
    )


def test_lora_overlap_both_forms_and_full_mode_are_errors(proj):
    overlap = BASE + (
        "lora:\n  targets:\n    - {range: [0, 10], layer_types: [attention.to_q]}\n"
        "    - {range: [9, 12], layer_types: [attention]}\n"
    )
    assert problems(proj, overlap) == [
        (
            "11: lora.targets[1]: overlaps lora.targets[0] on layers attention.to_q: "
            "a layer can carry only one LoRA"
        )
    ]
    both = BASE + "lora: {rank: 4}\n" + SEED_LORA.format(group="layers", types="[attention]")
    assert problems(proj, both) == ["8: lora: give either `lora_layers` (seed form) or `lora`, not both"]
    full = BASE.replace("mode: lora", "mode: full") + SEED_LORA.format(group="layers", types="[attention]")
    assert problems(proj, full) == [
        "8: lora_layers: `mode: full` trains the whole transformer; remove this section or set `mode: lora`"
    ]


# ------------------------------------------------------------------------------------- datasets, model


def test_inline_image_may_be_an_absolute_path_inside_the_dataset_folder(proj):
    (proj / "data" / "sub").mkdir()
    inside, outside = proj / "data" / "sub" / "a.png", proj / "b.png"
    text = (
        "model: tiny\ntraining_loop: {max_steps: 1}\n"
        f"examples: {{path: data, images: [{{image: '{inside}', prompt: hi}}]}}\n"
    )
    assert load(proj, text).datasets[0].captions.items == (("sub/a.png", "hi"),)
    native = (
        "model: tiny\ntraining_loop: {max_steps: 1}\n"
        f"datasets: [{{path: data, captions: {{inline: [{{image: '{proj / 'data' / 'a.png'}', caption: x}}]}}}}]\n"
    )
    assert load(proj, native).datasets[0].captions.items == (("a.png", "x"),)
    (line,) = problems(proj, text.replace(str(inside), str(outside)))
    assert "must be a file inside the dataset folder" in line


def test_full_mode_refuses_quantize(proj):
    (line,) = problems(proj, BASE.replace("mode: lora", "mode: full") + "  quantize: 4\n")
    assert line.startswith("8: training_loop.quantize: applies to LoRA only")


def test_caption_sources(proj):
    (proj / "caps.csv").write_text("file,caption\n")
    text = (
        "model: tiny\ntraining_loop: {max_steps: 1}\ndatasets:\n"
        "  - {path: data, name: a, captions: {extension: .caption}}\n"
        "  - {path: data, name: b, captions: filename}\n"
        "  - {path: data, name: c, captions: {manifest: caps.csv}}\n"
        "  - {path: data, name: d, captions: {inline: [{image: x/../a.png, caption: hi}]}}\n"
        "  - {path: data, name: e, trigger: sks, captions: {template: 'photo of {trigger}, {caption}'}}\n"
        "  - {path: data, name: f, bucketing: false, upscale: true, recursive: true, on_error: skip}\n"
    )
    ds = load(proj, text).datasets
    assert [d.captions for d in ds[:5]] == [
        CaptionSource("sidecar", extension=".caption"),
        CaptionSource("filename"),
        CaptionSource("manifest", file=proj / "caps.csv"),
        CaptionSource("inline", items=(("a.png", "hi"),)),
        CaptionSource("template", template="photo of {trigger}, {caption}"),
    ]
    assert ds[4].trigger == "sks"
    assert (ds[5].bucketing.enabled, ds[5].upscale, ds[5].recursive, ds[5].on_error) == (
        False,
        True,
        True,
        "skip",
    )


def test_paths_resolve_against_recipe_folder_with_home_and_env(proj, tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("home")
    (home / "imgs").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ZR_DATA", str(proj / "data"))
    monkeypatch.chdir(home)  # relative paths must not depend on the current folder
    text = (
        "model: tiny\ntraining_loop: {max_steps: 1}\ncache: ../cache\nsave: {output_path: out/run}\n"
        "datasets:\n  - {path: ~/imgs}\n  - {path: $ZR_DATA, name: b}\n  - {path: '${ZR_DATA}/', name: c}\n"
        "  - {path: ./data/../data, name: d}\n"
    )
    r = load(proj, text)
    assert [d.path for d in r.datasets] == [home / "imgs"] + [proj / "data"] * 3
    assert r.cache == proj.parent / "cache"
    assert (
        r.save.output_path == proj / "out" / "run"
        and r.export.output_path == proj / "out" / "run" / "exports"
    )


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("z-image-turbo", "z-image-turbo"),
        ("Tongyi-MAI/Z-Image", "Tongyi-MAI/Z-Image"),
        ("./weights", "{proj}/weights"),
        ("data", "{proj}/data"),  # an existing folder wins over the repo-id reading
        ("~/models/zi", "{home}/models/zi"),
    ],
)
def test_model_spec(proj, spec, expected):
    r = load(proj, BASE.replace("model: tiny", f"model: {spec}"))
    assert r.model == expected.format(proj=proj, home=os.path.expanduser("~"))


# --------------------------------------------------------------------------------------- equivalence


FULL_YAML = """\
# every section once
model: tiny
mode: lora
seed: 3
datasets:
  - path: data
    captions: {template: "{trigger} {caption}", extension: .cap}
    trigger: sks
    repeats: 2
    resolution: 512
    bucketing: {enabled: true, max_aspect: 1.5}
    caption_dropout: 0.1
training_loop: {max_steps: 20, batch_size: auto, sigma_sampling: logit_normal, quantize: 8, shift: 3}
optimizer: {learning_rate: 5e-5, betas: [0.8, 0.99], warmup_steps: 5, schedule: cosine}
lora: {rank: 4, targets: [{blocks: noise_refiner, layer_types: [adaLN_modulation.0]}]}
save: {checkpoint_frequency: 10, keep_last: 2}
sample: {prompts: [a, b], negative_prompt: blurry, every: 10, cfg_normalization: true}
export: {formats: [mflux, kohya], dtype: float32}
cache: cache
"""


def test_json_and_yaml_are_equivalent(proj):
    from_yaml = load(proj, FULL_YAML)
    data = yaml.safe_load(FULL_YAML)
    data["optimizer"]["learning_rate"] = 5e-5  # YAML 1.1 reads 5e-5 as text; we read it as JSON does
    from_json = load(proj, json.dumps(data, indent="\t"), "recipe.json")
    assert dataclasses.replace(from_json, source=from_yaml.source) == from_yaml
    assert recipe_hash(from_json) == recipe_hash(from_yaml)
    assert from_yaml.optimizer.learning_rate == 5e-5 and from_yaml.training_loop.batch_size == "auto"


def test_to_dict_round_trips_and_is_json(proj):
    for text in (FULL_YAML, BASE, BASE.replace("mode: lora", "mode: full")):
        r = load(proj, text)
        data = json.loads(json.dumps(r.to_dict()))
        assert Recipe.from_dict(data, source=r.source) == r


def test_recipe_hash_ignores_key_order_and_path_spelling(proj):
    a = load(proj, BASE)
    b = load(
        proj,
        "training_loop:\n  max_steps: 10\ndatasets:\n  - path: ./data/\nseed: 7\nmode: lora\nmodel: tiny\n",
    )
    assert recipe_hash(a) == recipe_hash(b)
    assert len(recipe_hash(a)) == 32 and int(recipe_hash(a), 16) >= 0
    groups = ["  x:\n    block_type: noise_refiner\n    lora_rank: 2\n", "  layers:\n    lora_rank: 4\n"]
    c = load(proj, BASE + "lora_layers:\n" + "".join(groups))
    d = load(proj, BASE + "lora_layers:\n" + "".join(reversed(groups)))
    assert c.lora == d.lora and recipe_hash(c) == recipe_hash(d) != recipe_hash(a)


@pytest.mark.parametrize(
    "replace, by",
    [
        ("seed: 7", "seed: 8"),
        ("model: tiny", "model: z-image"),
        ("max_steps: 10", "max_steps: 11"),
        ("  - path: data", "  - path: data\n    repeats: 2"),
        ("  - path: data", "  - path: data\n    trigger: x"),
        ("mode: lora", "mode: full"),
        ("seed: 7", "seed: 7\nlora: {rank: 8}"),
        ("seed: 7", "seed: 7\nsteps: 20"),
        ("seed: 7", "seed: 7\noptimizer: {learning_rate: 2e-4}"),
        ("seed: 7", "seed: 7\nexport: {formats: [mflux]}"),
    ],
)
def test_recipe_hash_changes_with_any_value(proj, replace, by):
    assert recipe_hash(load(proj, BASE)) != recipe_hash(load(proj, BASE.replace(replace, by)))


def test_recipe_package_imports_no_mlx_or_numpy():
    code = (
        "import sys, zrecipe.recipe; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mlx', 'numpy', 'PIL', 'torch', 'safetensors')];"
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ training-method keys


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "SGD", "Adafactor", "Prodigy"])
def test_each_optimizer_resolves_its_own_keys_and_defaults(proj, name):
    from zrecipe.recipe.schema import OPTIMIZER_DEFAULTS, OPTIMIZER_KEYS, SCHEDULE_KEYS

    r = load(proj, BASE + f"optimizer: {{name: {name}}}\n")
    assert r.optimizer == Optimizer(name=name, **OPTIMIZER_DEFAULTS[name])
    resolved = r.to_dict()["optimizer"]
    assert set(resolved) == {"name", *SCHEDULE_KEYS, *OPTIMIZER_KEYS[name]}
    assert Recipe.from_dict(r.to_dict(), source=r.source) == r


def test_adamw_resolves_as_before_and_defaults_per_optimizer(proj):
    r = load(proj, BASE)
    assert list(r.to_dict()["optimizer"]) == [
        "name", "learning_rate", "betas", "weight_decay", "eps", "warmup_steps", "schedule", "min_learning_rate",
    ]  # fmt: skip
    assert load(proj, BASE + "optimizer: {name: Prodigy}\n").optimizer.learning_rate == 1.0
    assert load(proj, BASE + "optimizer: {name: Lion}\n").optimizer.betas == (0.9, 0.99)
    restarts = load(proj, BASE + "optimizer: {schedule: cosine_with_restarts, num_cycles: 3}\n")
    assert restarts.to_dict()["optimizer"]["num_cycles"] == 3
    relative = load(proj, BASE + "optimizer: {name: Adafactor, relative_step: true}\n")
    assert "learning_rate" not in relative.to_dict()["optimizer"]
    assert Recipe.from_dict(relative.to_dict(), source=relative.source) == relative


def test_training_loop_methods_round_trip(proj):
    from zrecipe.recipe import Ema

    r = load(proj, BASE + "  loss_weighting: cosmap\n  noise_offset: 0.05\n  tensorboard: true\n"
                          "  ema: {decay: 0.99, every: 2}\nsample: {use_ema: true}\nexport: {use_ema: true}\n")  # fmt: skip
    loop = r.training_loop
    assert (loop.loss_weighting, loop.noise_offset, loop.tensorboard) == ("cosmap", 0.05, True)
    assert loop.ema == Ema(decay=0.99, start_step=0, every=2) and r.sample.use_ema and r.export.use_ema
    assert r.to_dict()["training_loop"]["ema"] == {"decay": 0.99, "start_step": 0, "every": 2}
    assert Recipe.from_dict(r.to_dict(), source=r.source) == r
    assert load(proj, BASE + "  ema: {}\n").training_loop.ema == Ema()
    assert load(proj, BASE).training_loop.ema is None


def test_the_training_methods_example_recipe_loads():
    r = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny_methods.yaml")
    assert r.optimizer.name == "Prodigy" and r.optimizer.num_cycles == 2 and r.training_loop.ema.decay == 0.9
    assert r.sample.use_ema and r.export.use_ema and r.training_loop.tensorboard
