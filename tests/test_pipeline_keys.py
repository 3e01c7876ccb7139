"""The Z-Image graph: golden node keys, the step table every list of kinds comes from, and the train
settings built from the train node's parameters alone.

Golden keys: every node key of the shipped tiny recipes is pinned.

The model identity is fixed here (it is the models layer's business, tested there), so these digests change
only when the pipeline changes what a node's key covers. A deliberate change bumps that kind's version
(pipeline/kinds.py) and updates its digest here, on purpose.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xxhash

from zrecipe.recipe import LAYER_TYPES, load_recipe

REPO = Path(__file__).resolve().parent.parent

GOLDEN = {
    "tiny.yaml": {
        "resize": (12, "a2d634d7d4f161be"),
        "encode-text": (10, "344c7124ef03d398"),
        "encode-image": (12, "ac4b17f740209ddf"),
        "train": (
            1,
            "6b345a2252ffc71c",
        ),  # AdamW follows torch.optim.AdamW (v2); the loss options join the params
        "sample": (2, "9a7cade2b2d9791d"),
        "export": (1, "e92310e6498a8b01"),  # v2: the file name became a parameter
        "contact-sheet": (1, "260913da40e7638d"),
    },
    "tiny_full.yaml": {
        "resize": (12, "a2d634d7d4f161be"),
        "encode-text": (9, "455419ac53a714a4"),
        "encode-image": (12, "ac4b17f740209ddf"),
        "train": (1, "57b17e3820a74781"),
        "sample": (1, "fcedb1f983d50ca7"),
        "export": (1, "cfb417d47452b678"),  # v2: name; the VAE and text encoder
        "contact-sheet": (1, "7e78a226f2d83df9"),
    },
    "seed-form.json": {
        "resize": (3, "48b0a209dae7ef79"),
        "encode-text": (3, "4e8d221ef213104f"),
        "encode-image": (3, "4c4fbc51295020f6"),
        "train": (1, "1502784b1247cd7c"),
    },
}


SEED_FORM = {
    "model": "tiny",
    "mode": "lora",
    "seed": 7,
    "steps": 4,
    "width": 64,
    "height": 64,
    "training_loop": {"num_epochs": 1, "batch_size": 1},
    "lora_layers": {"main_layers": {"layer_types": ["attention.to_q"], "lora_rank": 4}},
    "save": {"checkpoint_frequency": 1},
    "examples": {
        "path": str(REPO / "recipes" / "data" / "tiny"),
        "images": [
            {"image": "00_red_circle.png", "prompt": "a red circle"},
            {"image": "01_blue_square.jpg", "prompt": "a blue square"},
            {"image": "02_green_triangle.jpg", "prompt": "a red circle"},
        ],
    },
}


def recipe_file(name: str, tmp_path: Path) -> Path:
    if name != "seed-form.json":
        return REPO / "recipes" / name
    import json

    path = tmp_path / name
    path.write_text(json.dumps(SEED_FORM))
    return path


@pytest.fixture
def fixed_identity(monkeypatch):
    from zrecipe.pipeline import identity

    for component in ("transformer", "vae", "text_encoder"):
        monkeypatch.setattr(identity.ModelIdentity, component, property(lambda self, c=component: f"id:{c}"))
    monkeypatch.setattr(identity.ModelIdentity, "model_path", property(lambda self: None))


def node_keys(recipe_path: Path, cache: Path) -> dict[str, tuple[int, str]]:
    """{kind: (node count, xxh64 of every "item key" line)} of the recipe's plan on an empty store."""
    from zrecipe.pipeline import plan_recipe

    plan = plan_recipe(load_recipe(recipe_path), cache).plan
    out = {}
    for kind in plan.order:
        lines = sorted(f"{p.node.item}\t{p.key}" for p in plan.nodes[kind])
        out[kind] = (len(lines), xxhash.xxh64_hexdigest("\n".join(lines).encode()))
    return out


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_node_keys(name, tmp_path, fixed_identity):
    assert node_keys(recipe_file(name, tmp_path), tmp_path / "cache") == GOLDEN[name]


def plan_of(name: str, tmp_path: Path):
    from zrecipe.pipeline import plan_recipe

    return plan_recipe(load_recipe(recipe_file(name, tmp_path)), tmp_path / "cache").plan


def test_the_step_table_is_what_the_graph_runs(tmp_path, fixed_identity):
    from zrecipe.pipeline import KINDS, kinds

    # The full graph: tiny.yaml with loss masks, so that every kind of the table has nodes.
    text = (
        (REPO / "recipes" / "tiny.yaml")
        .read_text()
        .replace("trigger: zshapes", "trigger: zshapes\n    masks: {alpha: true}")
    )
    (tmp_path / "data").symlink_to(REPO / "recipes" / "data")
    (tmp_path / "masked.yaml").write_text(text)
    graph = plan_of(str(tmp_path / "masked.yaml"), tmp_path).graph
    assert tuple(graph.kinds) == KINDS == tuple(k.name for k in kinds.TABLE)
    for name, step in graph.kinds.items():
        row = kinds.BY_NAME[name]
        assert step.version == row.version and step.run is row.run and step.after == row.needs
        # The table's dependencies are exactly what the nodes reference, and --until's closure is the
        # engine's subgraph of the real graph.
        refs = {i.kind for node in graph.nodes[name].values() for i in node.inputs if not isinstance(i, str)}
        assert refs == set(row.needs), name
        assert set(graph.until(name).kinds) == kinds.until_closure(name), name
        # The model identities among a kind's inputs are those of components its row says it reads.
        used = {i[3:] for node in graph.nodes[name].values() for i in node.inputs if isinstance(i, str)
                if i.startswith("id:")}  # fmt: skip
        assert used <= set(row.models) and (used or not row.models or name == "export"), name
    assert set(kinds.MODEL_KINDS) == {"encode-image", "encode-text", "train", "sample", "export"}
    by_distribution = {
        d: {k.name for k in kinds.TABLE if k.distribution == d} for d in ("sharded", "collective")
    }
    assert by_distribution == {"sharded": {"resize", "mask", "encode-image", "encode-text"},
                               "collective": {"train"}}  # fmt: skip


def test_full_mode_exports_cover_the_model_parts_they_carry(tmp_path, fixed_identity):
    graph = plan_of("tiny_full.yaml", tmp_path).graph
    (node,) = graph.nodes["export"].values()
    assert node.inputs[1:] == ["id:vae", "id:text_encoder"] and node.params["name"] == "tiny_full_diffusers"


def test_train_settings_come_from_the_train_params_alone(tmp_path, fixed_identity):
    import json

    from zrecipe.recipe import LoraTarget, Optimizer
    from zrecipe.training.settings import TrainSettings

    text = (
        (REPO / "recipes" / "tiny.yaml").read_text().replace("max_steps: 40", "max_steps: 40\n  shift: 2.5")
    )
    (tmp_path / "data").symlink_to(REPO / "recipes" / "data")
    (tmp_path / "r.yaml").write_text(text)
    params = plan_recipe_node(tmp_path / "r.yaml", tmp_path).params
    settings = TrainSettings.from_params(json.loads(json.dumps(params)), 6.0, 2, 3)  # as stored: plain JSON
    assert settings == TrainSettings(
        mode="lora", seed=42, batch_size=2, gradient_accumulation_steps=3, max_steps=40, shift=2.5,
        lora_targets=(LoraTarget("layers", 0, None, LAYER_TYPES[:4], 8, 8.0),),
        optimizer=Optimizer(learning_rate=1e-3), checkpoint_frequency=20,
    )  # fmt: skip
    # Every field the loop reads is in the key: a recipe edit that leaves the params alone (samples,
    # exports, output folder) cannot change the settings, and every training value is in the params.
    edited = text.replace("steps: 8", "steps: 9").replace("formats: [mflux]", "formats: [kohya]")
    edited = edited.replace("checkpoint_frequency: 20", "checkpoint_frequency: 20\n  output_path: elsewhere")
    (tmp_path / "r.yaml").write_text(edited)
    assert plan_recipe_node(tmp_path / "r.yaml", tmp_path).params == params
    # Every training_loop field is a train parameter, except the runtime options (memory release, logging).
    from zrecipe.recipe.schema import TrainingLoop
    from zrecipe.training.settings import NOT_PARAMS_LOOP_FIELDS

    loop_fields = set(TrainingLoop.__dataclass_fields__) - set(NOT_PARAMS_LOOP_FIELDS)
    assert set(params["training_loop"]) == loop_fields and "low_ram" not in loop_fields
    # The optimizer fields that apply to the chosen optimiser and schedule (the others cannot change a value).
    from zrecipe.recipe.schema import optimizer_fields

    assert set(params["optimizer"]) == set(optimizer_fields("AdamW", "constant"))


def plan_recipe_node(recipe: Path, tmp_path: Path):
    from zrecipe.pipeline import plan_recipe

    (node,) = plan_recipe(load_recipe(recipe), tmp_path / "cache").plan.nodes["train"]
    return node.node


def test_every_lora_target_field_survives_the_train_params():
    """The train step rebuilds its LoRA targets from the train params: no field may be lost on the way
    (a kind, dropout or LoKr option dropped there trains something other than what the key says)."""
    import dataclasses

    from zrecipe.recipe import LoraTarget
    from zrecipe.recipe.serialize import _target, lora_target_from_dict

    plain = LoraTarget("layers", 0, 4, LAYER_TYPES[:2], rank=4, alpha=8.0)
    every = LoraTarget(
        "noise_refiner", 1, None, LAYER_TYPES[4:6], rank=2, alpha=1.0, kind="lokr", dropout=0.25,
        factor=4, decompose_both=True, full_matrix=True,
    )  # fmt: skip
    for target in (plain, every):
        assert lora_target_from_dict(_target(target)) == target
    # Every field of LoraTarget is covered by this check (a new field must be added to the serialiser too).
    assert {f.name for f in dataclasses.fields(LoraTarget)} <= set(dataclasses.asdict(every))
    changed = {
        f.name for f in dataclasses.fields(LoraTarget) if getattr(every, f.name) != getattr(plain, f.name)
    }
    assert changed == {f.name for f in dataclasses.fields(LoraTarget)}
