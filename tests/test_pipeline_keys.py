"""Golden keys of the Z-Image graph: every node key of the shipped tiny recipes is pinned.

The model identity is fixed here (it is the models layer's business, tested there), so these digests change
only when the pipeline changes what a node's key covers. A deliberate change bumps that kind's version
(pipeline/kinds.py) and updates its digest here, on purpose.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import xxhash

from zrecipe.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent

GOLDEN = {
    "tiny.yaml": {
        "resize": (12, "a2d634d7d4f161be"),
        "encode-text": (10, "344c7124ef03d398"),
        "encode-image": (12, "ac4b17f740209ddf"),
        "train": (1, "48e75da57642304e"),
        "sample": (2, "b1fcc60b7c91909f"),
        "export": (1, "de70cd781cb8cac5"),  # v2: the file name became a parameter
        "contact-sheet": (1, "28e9bf166da4fadf"),
    },
    "tiny_full.yaml": {
        "resize": (12, "a2d634d7d4f161be"),
        "encode-text": (9, "455419ac53a714a4"),
        "encode-image": (12, "ac4b17f740209ddf"),
        "train": (1, "459d32cde1bb3f07"),
        "sample": (1, "0493147891ef5bcf"),
        "export": (1, "7c2232c424c436ae"),  # v2: name; the VAE and text encoder
        "contact-sheet": (1, "2eab2589f3791b3d"),
    },
    "seed-form.json": {
        "resize": (3, "48b0a209dae7ef79"),
        "encode-text": (3, "4e8d221ef213104f"),
        "encode-image": (3, "4c4fbc51295020f6"),
        "train": (1, "054296bdd49b6484"),
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
