"""The recipe keys of the training methods: validation, loss masks, per-dataset loss weight, the
assistant LoRA and Z-Image-Turbo's sampling defaults — defaults, strict errors, the resolved round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zrecipe.recipe import Recipe, load_recipe
from zrecipe.recipe.schema import TURBO_SAMPLE, Masks, Sample, Validation

BASE = """\
model: {model}
mode: {mode}
datasets:
  - name: a
    path: data
{dataset}  - name: b
    path: more
training_loop:
  max_steps: 10
{loop}{extra}"""


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    for name in ("data", "more", "masks"):
        (tmp_path / name).mkdir()
    (tmp_path / "helper.safetensors").write_bytes(b"")
    return tmp_path


def text(model="tiny", mode="lora", dataset="", loop="", extra="") -> str:
    return BASE.format(model=model, mode=mode, dataset=dataset, loop=loop, extra=extra)


def load(folder: Path, body: str) -> Recipe:
    (folder / "r.yaml").write_text(body)
    return load_recipe(folder / "r.yaml")


def problems(folder: Path, body: str) -> list[str]:
    from zrecipe.errors import RecipeError

    with pytest.raises(RecipeError) as info:
        load(folder, body)
    return [p.split(": ", 1)[1] for p in info.value.problems]


def test_defaults_are_off(proj):
    r = load(proj, text())
    assert r.validation is None and r.training_loop.assistant_lora is None
    assert all(d.loss_weight == 1.0 and d.masks is None for d in r.datasets)


def test_validation_forms_and_defaults(proj):
    r = load(proj, text(extra="validation: {fraction: 0.2}\n"))
    assert r.validation == Validation(fraction=0.2)
    assert Validation().sigmas == (0.25, 0.5, 0.75) and Validation().seed == 0 and Validation().every is None
    full = "validation: {dataset: b, sigmas: [0.1, 0.9], seed: 5, every: 3}\n"
    assert load(proj, text(extra=full)).validation == Validation(None, "b", (0.1, 0.9), 5, 3)


@pytest.mark.parametrize(
    "validation, expected",
    [
        (
            "{}",
            "validation: give exactly one of `fraction: F` (held out by content hash) or `dataset: NAME`, got neither",
        ),
        (
            "{fraction: 0.1, dataset: b}",
            "validation: give exactly one of `fraction: F` (held out by content hash) or `dataset: NAME`, got both",
        ),
        ("{fraction: 1.0}", "validation.fraction: must be less than 1, got 1"),
        ("{fraction: 0}", "validation.fraction: must be greater than 0, got 0"),
        ("{dataset: c}", "validation.dataset: no dataset is named 'c' (datasets: a, b)"),
        ("{dataset: bb}", "validation.dataset: no dataset is named 'bb' (datasets: a, b); did you mean `b`?"),
        ("{fraction: 0.1, sigmas: []}", "validation.sigmas: must not be empty"),
        ("{fraction: 0.1, sigmas: [0.5, 1.0]}", "validation.sigmas[1]: must be less than 1, got 1"),
        ("{fraction: 0.1, sigmas: [0.5, 0.5]}", "validation.sigmas[1]: 0.5 is listed twice (also item 0)"),
        ("{fraction: 0.1, every: 0}", "validation.every: must be at least 1, got 0"),
        ("{fraction: 0.1, sigma: [0.5]}", "validation.sigma: unknown key; did you mean `sigmas`?"),
    ],
)
def test_validation_errors(proj, validation, expected):
    assert problems(proj, text(extra=f"validation: {validation}\n")) == [expected]


def test_the_only_dataset_cannot_be_the_validation_set(proj):
    body = "model: tiny\ndatasets: [{name: a, path: data}]\ntraining_loop: {max_steps: 1}\nvalidation: {dataset: a}\n"
    assert problems(proj, body) == [
        "validation.dataset: 'a' is the only dataset: nothing would be left to train on"
    ]


def test_masks_and_loss_weight(proj):
    r = load(proj, text(dataset="    loss_weight: 2.5\n    masks: {alpha: true}\n"))
    assert r.datasets[0].loss_weight == 2.5 and r.datasets[0].masks == Masks("alpha")
    r = load(proj, text(dataset="    masks: {folder: masks, unmasked_weight: 0.1}\n"))
    assert r.datasets[0].masks == Masks("folder", proj / "masks", 0.1)


@pytest.mark.parametrize(
    "dataset, expected",
    [
        ("loss_weight: 0", "datasets[0].loss_weight: must be greater than 0, got 0"),
        ("loss_weight: 1001", "datasets[0].loss_weight: must be at most 1000, got 1001"),
        ("loss_weight: heavy", "datasets[0].loss_weight: expected a number, got 'heavy' (text)"),
        ("masks: alpha", "datasets[0].masks: expected a mapping of keys, got 'alpha' (text)"),
        ("masks: {}", "datasets[0].masks: give exactly one of `alpha: true` or `folder: PATH`, got neither"),
        ("masks: {alpha: true, folder: masks}",
         "datasets[0].masks: give exactly one of `alpha: true` or `folder: PATH`, got both alpha and folder"),
        ("masks: {alpha: false}", "datasets[0].masks.alpha: write `alpha: true`; got false (a boolean)"),
        ("masks: {folder: nowhere}", "datasets[0].masks.folder: folder not found: {proj}/nowhere (relative paths resolve against {proj})"),
        ("masks: {folder: data}", "datasets[0].masks.folder: {proj}/data is the dataset folder: the masks would be read as training images; keep them in a folder of their own"),
        ("masks: {alpha: true, unmasked_weight: 1}", "datasets[0].masks.unmasked_weight: must be less than 1, got 1"),
        ("masks: {alpha: true, floor: 0.1}", "datasets[0].masks.floor: unknown key"),
    ],
)  # fmt: skip
def test_mask_and_weight_errors(proj, dataset, expected):
    assert problems(proj, text(dataset=f"    {dataset}\n")) == [expected.format(proj=proj)]


def test_a_mask_folder_inside_a_recursive_dataset_is_refused(proj):
    (proj / "data" / "masks").mkdir()
    body = text(dataset="    recursive: true\n    masks: {folder: data/masks}\n")
    assert problems(proj, body) == [
        f"datasets[0].masks.folder: {proj}/data/masks is the dataset folder or inside it (recursive: true): "
        "the masks would be read as training images; keep them in a folder of their own"
    ]


def test_assistant_lora_forms(proj):
    def assistant(value: str) -> str:
        return load(proj, text(loop=f"  assistant_lora: {value}\n")).training_loop.assistant_lora

    assert assistant("helper.safetensors") == str(proj / "helper.safetensors")
    assert assistant("./helper.safetensors") == str(proj / "helper.safetensors")
    assert assistant("ostris/adapter:v2/adapter.safetensors") == "ostris/adapter:v2/adapter.safetensors"
    assert assistant("ostris/adapter") == "ostris/adapter"


@pytest.mark.parametrize(
    "value, expected",
    [
        ("missing.safetensors", "no such file: {proj}/missing.safetensors (relative paths resolve against {proj}; a Hub file is org/repo:FILE)"),
        ("./data", "{proj}/data is not a .safetensors LoRA file"),
        ("42", "expected a LoRA file or a Hugging Face `org/repo[:file]`, got 42 (an integer)"),
        ("org/repo:weights.bin", "{proj}/org/repo:weights.bin is not a .safetensors LoRA file"),
    ],
)  # fmt: skip
def test_assistant_lora_errors(proj, value, expected):
    got = problems(proj, text(loop=f"  assistant_lora: {value}\n"))
    assert got == ["training_loop.assistant_lora: " + expected.format(proj=proj)]


def test_assistant_lora_is_for_lora_training_only(proj):
    got = problems(proj, text(mode="full", loop="  assistant_lora: helper.safetensors\n"))
    assert got == [
        "training_loop.assistant_lora: applies to LoRA only: it is fused into the base under a trained LoRA "
        "and left out of the exports; a full fine-tune would bake it into every weight. Remove it or use "
        "`mode: lora`"
    ]


@pytest.mark.parametrize("model", ["z-image-turbo", "Tongyi-MAI/Z-Image-Turbo", "{base: z-image-turbo}"])
def test_turbo_samples_in_few_steps_without_cfg_unless_told(proj, model):
    r = load(proj, text(model=model, extra="sample: {prompts: [a cat]}\n"))
    assert (
        (r.sample.steps, r.sample.guidance) == (TURBO_SAMPLE["steps"], TURBO_SAMPLE["guidance"]) == (9, 0.0)
    )
    r = load(proj, text(model=model, extra="sample: {prompts: [a cat], steps: 4, guidance: 1.5}\n"))
    assert (r.sample.steps, r.sample.guidance) == (4, 1.5)
    r = load(proj, text(model="z-image", extra="sample: {prompts: [a cat]}\n"))
    assert (r.sample.steps, r.sample.guidance) == (Sample.steps, Sample.guidance)


def test_resolved_recipe_round_trips_every_new_key(proj):
    body = text(
        dataset="    loss_weight: 3.0\n    masks: {folder: masks, unmasked_weight: 0.2}\n",
        loop="  assistant_lora: helper.safetensors\n",
        extra="validation: {dataset: b, sigmas: [0.4]}\n",
    )
    r = load(proj, body)
    data = json.loads(json.dumps(r.to_dict()))
    assert data["validation"] == {"dataset": "b", "sigmas": [0.4], "seed": 0, "every": None}
    assert data["datasets"][0]["masks"] == {"folder": str(proj / "masks"), "unmasked_weight": 0.2}
    assert Recipe.from_dict(data, source=r.source) == r
    alpha = load(proj, text(dataset="    masks: {alpha: true}\n", extra="validation: {fraction: 0.5}\n"))
    assert Recipe.from_dict(json.loads(json.dumps(alpha.to_dict())), source=alpha.source) == alpha
