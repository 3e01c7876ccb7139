"""Property tests of the recipe loader: any input gives a Recipe or a RecipeError (never another
exception), and valid recipes survive `to_dict` → `from_dict` unchanged."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zrecipe.errors import RecipeError
from zrecipe.recipe import LAYER_TYPES, Recipe, load_recipe, recipe_hash

SETTINGS = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def root():
    folder = Path(tempfile.mkdtemp(prefix="zrecipe-hyp-"))
    for name in ("data", "data2", "weights"):
        (folder / name).mkdir()
    (folder / "caps.jsonl").write_text("")
    yield folder
    shutil.rmtree(folder)


# --------------------------------------------------------------------------------- valid recipes


def _opt(**kw: st.SearchStrategy) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries({}, optional=kw)


_side = st.integers(4, 128).map(lambda n: n * 16)
_unit = st.floats(0.0, 0.99)
_captions = st.one_of(
    st.just("sidecar"),
    st.just("filename"),
    st.just({"extension": ".cap"}),
    st.just({"manifest": "caps.jsonl"}),
    st.lists(
        st.tuples(st.sampled_from(["a.png", "b/c.jpg", "d.webp"]), st.text(min_size=1).filter(str.strip)),
        min_size=1,
        max_size=3,
        unique_by=lambda t: t[0],
    ).map(lambda items: {"inline": [{"image": i, "caption": c} for i, c in items]}),
    st.sampled_from(["{caption}", "photo, {filename}, {caption}"]).map(lambda t: {"template": t}),
    st.fixed_dictionaries(
        {
            "generate": st.fixed_dictionaries(
                {"model": st.sampled_from(["tiny-vlm", "Qwen/Qwen2-VL-2B-Instruct"])},
                optional={
                    "prompt": st.text(min_size=1).filter(str.strip),
                    "max_tokens": st.integers(1, 1024),
                    "repetition_penalty": st.none() | st.floats(0.5, 2.0),
                },
            )
        },
        optional={
            "prefer": st.sampled_from(["sidecar", "generated"]),
            "template": st.just("{caption}, photo"),
        },
    ),
)


def _dataset(i: int) -> st.SearchStrategy[dict]:
    return st.fixed_dictionaries(
        {"path": st.sampled_from(["data", "./data/", "data2", "data/../data2"]), "name": st.just(f"set{i}")},
        optional={
            "captions": _captions,
            "repeats": st.integers(1, 10),
            "resolution": _side.filter(lambda s: s >= 64),
            "bucketing": st.one_of(
                st.booleans(), _opt(enabled=st.booleans(), max_aspect=st.floats(1.0, 8.0))
            ),
            "upscale": st.booleans(),
            "recursive": st.booleans(),
            "trigger": st.none() | st.text(min_size=1).filter(str.strip),
            "caption_dropout": _unit,
            "on_error": st.sampled_from(["fail", "skip"]),
        },
    )


_datasets = st.integers(0, 3).flatmap(lambda n: st.tuples(*[_dataset(i) for i in range(n)]).map(list))
_training_loop = st.fixed_dictionaries(
    {"max_steps": st.integers(1, 10**6)},
    optional={
        "num_epochs": st.none() | st.integers(1, 100),
        "batch_size": st.integers(1, 64) | st.just("auto"),
        "gradient_accumulation_steps": st.integers(1, 16),
        "sigma_sampling": st.sampled_from(["shifted", "uniform", "logit_normal"]),
        "logit_mean": st.floats(-3, 3),
        "logit_std": st.floats(0.1, 3),
        "shift": st.none() | st.floats(0.5, 10),
        "gradient_checkpointing": st.booleans(),
        "compute_dtype": st.sampled_from(["auto", "float32", "bfloat16"]),
        "max_grad_norm": st.none() | st.floats(0.1, 10),
        "low_ram": st.booleans(),
        "quantize": st.sampled_from([None, 4, 8]),
    },
)
_optimizer = _opt(
    name=st.just("AdamW"),
    learning_rate=st.floats(1e-7, 1e-2),
    betas=st.tuples(_unit, _unit).map(list),
    weight_decay=st.floats(0, 1),
    eps=st.floats(1e-12, 1e-4),
    warmup_steps=st.integers(0, 1),
    schedule=st.sampled_from(["constant", "cosine"]),
)
_types = st.lists(st.sampled_from(LAYER_TYPES[:7] + ("attention", "feed_forward")), min_size=1, max_size=1)
_seed_lora = st.fixed_dictionaries(
    {
        "main_layers": _opt(
            block_range=st.tuples(st.integers(0, 10), st.integers(1, 20))
            .filter(lambda r: r[0] < r[1])
            .map(lambda r: {"start": r[0], "end": r[1]}),
            layer_types=_types,
            lora_rank=st.integers(1, 128),
            lora_alpha=st.floats(0.5, 64),
        ),
    },
    optional={
        "refine": st.fixed_dictionaries(
            {"block_type": st.just("noise_refiner")},
            optional={"layer_types": _types, "lora_rank": st.integers(1, 8)},
        )
    },
)
_native_lora = _opt(
    rank=st.integers(1, 64),
    alpha=st.floats(0.5, 64),
    targets=st.lists(
        st.sampled_from(["layers", "noise_refiner", "context_refiner"]), min_size=1, max_size=3, unique=True
    ).flatmap(
        lambda blocks: st.tuples(
            *[
                _opt(layer_types=_types, rank=st.integers(1, 8), range=st.just([0, None])).map(
                    lambda t, b=b: {"blocks": b, **t}
                )
                for b in blocks
            ]
        ).map(list)
    ),
)
_sample = _opt(
    prompts=st.lists(st.text(min_size=1).filter(str.strip), unique=True, max_size=3),
    negative_prompt=st.text(),
    guidance=st.floats(0, 20),
    steps=st.integers(1, 100),
    width=_side,
    height=_side,
    seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=3, unique=True),
    every=st.none() | st.integers(1, 1000),
    cfg_normalization=st.booleans(),
    cfg_truncation=st.floats(0, 1),
)


@st.composite
def valid_recipes(draw: Any) -> dict:
    mode = draw(st.sampled_from(["lora", "full"]))
    data = {
        "model": draw(
            st.sampled_from(["tiny", "z-image", "z-image-turbo", "Tongyi-MAI/Z-Image", "./weights"])
        ),
        "mode": mode,
        "training_loop": draw(_training_loop),
        **draw(
            _opt(
                seed=st.integers(0, 2**64 - 1),
                datasets=_datasets,
                optimizer=_optimizer,
                sample=_sample,
                steps=st.integers(1, 100),
                guidance=st.floats(0, 20),
                width=_side,
                height=_side,
                save=_opt(
                    checkpoint_frequency=st.integers(1, 1000),
                    output_path=st.just("out"),
                    keep_last=st.none() | st.integers(1, 5),
                ),
                export=_opt(
                    formats=st.lists(
                        st.sampled_from(["mflux", "comfyui", "diffusers", "kohya"]), unique=True
                    ),
                    dtype=st.sampled_from(["bfloat16", "float32"]),
                ),
                cache=st.just("~/.cache/zr"),
            )
        ),
    }
    if mode == "lora":
        data.update(draw(_opt(lora_layers=_seed_lora) | _opt(lora=_native_lora)))
    else:
        data.update(draw(_opt(full_finetune=_opt(train_transformer=st.just(True), train_vae=st.just(False)))))
        data["training_loop"]["quantize"] = None  # LoRA only: full fine-tuning keeps every weight unquantised
    return data


@SETTINGS
@given(data=valid_recipes())
def test_valid_recipes_load_and_round_trip(root, data):
    source = root / "recipe.yaml"
    r = Recipe.from_dict(data, source=source)
    resolved = json.loads(json.dumps(r.to_dict()))
    again = Recipe.from_dict(resolved, source=source)
    assert again == r
    assert recipe_hash(again) == recipe_hash(r)
    # The YAML text of the same data loads to the same recipe.
    source.write_text(yaml.safe_dump(json.loads(json.dumps(data))), encoding="utf-8")
    assert load_recipe(source) == r


# ------------------------------------------------------------------------------------------ mutations

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["auto", "lora", "~", "$HOME", "data", "a/b", "\0", ""])
)
_values = st.recursive(
    _scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=6,
)
_keys = st.text(max_size=10) | st.sampled_from(
    [
        "model",
        "path",
        "captions",
        "lora_rank",
        "targets",
        "range",
        "block_range",
        "layer_types",
        "images",
        "examples",
        "seed",
    ]
)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(data: Any, path: tuple, how: str, value: Any, key: str) -> Any:
    if not path:
        return value if how == "replace" else data
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "delete":
        del parent[last]
    elif how == "replace":
        parent[last] = value
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    elif isinstance(parent[last], list):
        parent[last].append(value)
    return data


@SETTINGS
@given(
    data=valid_recipes(),
    edits=st.lists(
        st.tuples(st.integers(0, 10**6), st.sampled_from(["delete", "replace", "add"]), _values, _keys),
        min_size=1,
        max_size=3,
    ),
)
def test_mutated_recipes_only_raise_recipe_error(root, data, edits):
    data = json.loads(json.dumps(data))
    for index, how, value, key in edits:
        paths = _paths(data)
        data = _mutate(data, paths[index % len(paths)], how, value, key)
    try:
        Recipe.from_dict(data, source=root / "recipe.yaml")
    except RecipeError as exc:
        assert exc.problems and str(exc) == "\n".join(exc.problems)
    # The same data as YAML text through the file loader (YAML may read some strings differently).
    try:
        text = yaml.safe_dump(data, allow_unicode=False)
    except yaml.YAMLError:
        return
    (root / "mutated.yaml").write_text(text, encoding="utf-8")
    try:
        load_recipe(root / "mutated.yaml")
    except RecipeError as exc:
        assert exc.problems


_tokens = st.sampled_from(
    [
        "model",
        "mode",
        "datasets",
        "lora_layers",
        "path",
        ":",
        ": ",
        "\n",
        "  ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        ",",
        "&a ",
        "*a",
        "<<: ",
        "!!str ",
        "!!binary ",
        "!x ",
        "'",
        '"',
        "\t",
        "#",
        "1e-4",
        "true",
        "null",
        "~",
        "?",
        "|",
        ">",
        "---\n",
        "...\n",
        "\\",
        "%YAML 1.1\n",
        "\ufeff",
    ]
)


@SETTINGS
@given(text=st.one_of(st.text(max_size=200), st.lists(_tokens, max_size=40).map("".join)))
def test_random_yaml_text_only_raises_recipe_error(root, text):
    file = root / "random.yaml"
    file.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_recipe(file)
    except RecipeError as exc:
        assert exc.problems


@SETTINGS
@given(raw=st.binary(max_size=200))
def test_random_bytes_only_raise_recipe_error(root, raw):
    file = root / "random.bin"
    file.write_bytes(raw)
    try:
        load_recipe(file)
    except RecipeError as exc:
        assert exc.problems
