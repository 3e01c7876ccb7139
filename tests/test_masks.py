"""Loss masks: cropped, oriented and scaled with their image onto the latent grid (against NumPy block means
and Pillow's own EXIF transpose), checked for what cannot be a mask, and planned as per-item nodes whose
keys cover exactly the mask."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from zrecipe.data.images import resize_image
from zrecipe.data.masks import find_masks, latent_mask
from zrecipe.errors import DatasetError

REPO = Path(__file__).resolve().parent.parent


def rgba(alpha: np.ndarray, exif_orientation: int | None = None) -> bytes:
    """A PNG whose alpha is `alpha` and whose colour is black where opaque (so the resized RGB, composited
    on white, shows the mask as darkness)."""
    h, w = alpha.shape
    pixels = np.zeros((h, w, 4), np.uint8)
    pixels[..., 3] = alpha
    image = Image.fromarray(pixels, "RGBA")
    out = io.BytesIO()
    if exif_orientation is None:
        image.save(out, format="PNG")
    else:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        image.save(out, format="PNG", exif=exif)
    return out.getvalue()


def blocks(a: np.ndarray, n: int) -> np.ndarray:
    """Mean of every n×n block (the reference area average)."""
    h, w = a.shape
    return a.reshape(h // n, n, w // n, n).mean(axis=(1, 3))


def random_alpha(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 16, w // 16))
    return np.kron(low, np.ones((16, 16))).astype(np.uint8) ^ rng.integers(0, 8, (h, w)).astype(np.uint8)


def test_alpha_mask_is_the_block_mean_of_the_alpha_channel(tmp_path):
    alpha = random_alpha(128, 128)
    path = tmp_path / "a.png"
    path.write_bytes(rgba(alpha))
    got = latent_mask(path, None, 64, bucketing=False)
    assert got.dtype == np.float32 and got.shape == (8, 8)  # 64×64 pixels → 8×8 latents
    assert np.abs(got - blocks(alpha / 255.0, 16)).max() < 1e-6


def test_the_mask_keeps_the_resize_crop(tmp_path):
    alpha = random_alpha(128, 256, seed=1)  # wide: a square crop keeps the centre 128 columns
    path = tmp_path / "wide.png"
    path.write_bytes(rgba(alpha))
    got = latent_mask(path, None, 64, bucketing=False)
    assert np.abs(got - blocks(alpha[:, 64:192] / 255.0, 16)).max() < 1e-6
    # ...the crop the resize itself keeps: the resized image's darkness is the mask
    image = np.asarray(resize_image(path, 64, bucketing=False).convert("L"), np.float64)
    assert np.abs(blocks(1.0 - image / 255.0, 8) - got).max() < 0.02


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_the_mask_follows_the_exif_orientation(tmp_path, orientation):
    alpha = random_alpha(128, 128, seed=orientation)
    path = tmp_path / "rotated.png"
    path.write_bytes(rgba(alpha, orientation))
    upright = np.asarray(ImageOps.exif_transpose(Image.open(path)).getchannel("A"), np.float64)
    assert not np.array_equal(upright, alpha)  # the orientation matters for this alpha
    got = latent_mask(path, None, 64, bucketing=False)
    assert np.abs(got - blocks(upright / 255.0, 16)).max() < 1e-6
    image = np.asarray(resize_image(path, 64, bucketing=False).convert("L"), np.float64)
    assert np.abs(blocks(1.0 - image / 255.0, 8) - got).max() < 0.02


def test_a_mask_file_of_half_the_size_with_the_same_aspect(tmp_path):
    Image.new("RGB", (128, 96), "gray").save(tmp_path / "img.png")
    mask = random_alpha(48, 64, seed=3)[:48, :64]  # a 64×48 greyscale mask for a 128×96 image
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    got = latent_mask(tmp_path / "img.png", tmp_path / "mask.png", 96, bucketing=False)
    # The square crop of the image is its centre 96×96 = the mask's centre 48×48 → 12×12 latent cells of 4×4.
    assert got.shape == (12, 12)
    assert np.abs(got - blocks(mask[:, 8:56] / 255.0, 4)).max() < 1e-6


def test_unmasked_weight_is_a_floor(tmp_path):
    alpha = np.zeros((64, 64), np.uint8)
    alpha[:, :32] = 255
    (tmp_path / "half.png").write_bytes(rgba(alpha))
    got = latent_mask(tmp_path / "half.png", None, 64, unmasked_weight=0.25)
    assert set(np.unique(got)) == {np.float32(0.25), np.float32(1.0)}


def test_what_cannot_be_a_mask_is_a_dataset_error_naming_the_file(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "opaque.png")
    with pytest.raises(DatasetError, match=r"opaque.png: has no alpha channel \(mode RGB\)"):
        latent_mask(tmp_path / "opaque.png", None, 64)
    (tmp_path / "clear.png").write_bytes(rgba(np.zeros((64, 64), np.uint8)))
    with pytest.raises(DatasetError, match="the mask is black everywhere"):
        latent_mask(tmp_path / "clear.png", None, 64)
    Image.new("L", (64, 32), 255).save(tmp_path / "wide_mask.png")
    with pytest.raises(DatasetError, match=r"the mask is 64×32 but its image .*opaque.png is 64×64"):
        latent_mask(tmp_path / "opaque.png", tmp_path / "wide_mask.png", 64)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png: cannot decode image"):
        latent_mask(tmp_path / "opaque.png", tmp_path / "broken.png", 64)


def test_masks_are_found_by_relative_path_and_stem(tmp_path):
    (tmp_path / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.webp", "c.jpg", "c.png"):
        Image.new("L", (16, 16)).save(tmp_path / name)
    found = find_masks(tmp_path, ["a.jpg", "sub/b.png", "missing.png"], recursive=True)
    assert {k: v.rel_path for k, v in found.items()} == {"a.jpg": "a.png", "sub/b.png": "sub/b.webp"}
    with pytest.raises(DatasetError, match=r"several masks for one image .*\n  c.jpg: c.jpg, c.png"):
        find_masks(tmp_path, ["c.jpg"], recursive=True)


# --- in the plan ---------------------------------------------------------------------------------------

RECIPE = """\
model: tiny
seed: 1
datasets:
  - name: shapes
    path: data
    resolution: 64
    on_error: {on_error}
    masks: {masks}
training_loop: {{max_steps: 2}}
"""


def project(tmp_path: Path, masks: str = "{folder: masks}", on_error: str = "fail", n: int = 4) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "masks").mkdir(exist_ok=True)
    for f in sorted((REPO / "recipes" / "data" / "tiny").glob("*.png"))[:n]:
        (tmp_path / "data" / f.name).write_bytes(f.read_bytes())
        (tmp_path / "data" / f.with_suffix(".txt").name).write_bytes(f.with_suffix(".txt").read_bytes())
        Image.new("L", Image.open(f).size, 200).save(tmp_path / "masks" / f.name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(masks=masks, on_error=on_error))
    return recipe


@pytest.fixture
def fixed_identity(monkeypatch):
    from zrecipe.pipeline import identity

    for component in ("transformer", "vae", "text_encoder"):
        monkeypatch.setattr(identity.ModelIdentity, component, property(lambda self, c=component: f"id:{c}"))
    monkeypatch.setattr(identity.ModelIdentity, "model_path", property(lambda self: None))


def keys(recipe: Path) -> dict[str, dict[str, str]]:
    from zrecipe.pipeline import plan_recipe
    from zrecipe.recipe import load_recipe

    plan = plan_recipe(load_recipe(recipe), recipe.parent / "cache").plan
    return {kind: {p.node.item: p.key for p in plan.nodes[kind]} for kind in plan.order}


def test_a_mask_edit_reruns_its_mask_and_training_but_no_encoding(tmp_path, fixed_identity):
    recipe = project(tmp_path)
    before = keys(recipe)
    assert sorted(before) == ["encode-image", "encode-text", "mask", "resize", "train"]
    assert before["mask"].keys() == before["resize"].keys()
    first = sorted(before["mask"])[0]
    Image.new("L", (160, 160), 100).save(tmp_path / "masks" / first.split("/", 1)[1])
    after = keys(recipe)
    assert [i for i in after["mask"] if after["mask"][i] != before["mask"][i]] == [first]
    assert after["train"] != before["train"]
    for kind in ("resize", "encode-image", "encode-text"):
        assert after[kind] == before[kind], kind
    # the floor is a mask parameter: every mask and the training change, nothing else
    recipe.write_text(recipe.read_text().replace("{folder: masks}", "{folder: masks, unmasked_weight: 0.5}"))
    floor = keys(recipe)
    assert (
        all(floor["mask"][i] != after["mask"][i] for i in after["mask"]) and floor["train"] != after["train"]
    )
    assert floor["encode-image"] == after["encode-image"]


def test_without_masks_the_plan_has_no_mask_kind(tmp_path, fixed_identity):
    recipe = project(tmp_path)
    recipe.write_text(recipe.read_text().replace("    masks: {folder: masks}\n", ""))
    assert "mask" not in keys(recipe)


def test_a_missing_mask_fails_the_plan_or_skips_the_image(tmp_path, fixed_identity):
    from zrecipe.pipeline import plan_recipe
    from zrecipe.recipe import load_recipe

    recipe = project(tmp_path)
    gone = sorted((tmp_path / "masks").iterdir())[1]
    gone.unlink()
    with pytest.raises(
        DatasetError, match=rf"1 mask problem\(s\):\n  dataset 'shapes': {gone.name}: no mask in"
    ):
        keys(recipe)
    recipe = project(tmp_path, on_error="skip")
    gone.unlink()
    outcome = plan_recipe(load_recipe(recipe), tmp_path / "cache")
    assert gone.name not in {p.node.item.split("/", 1)[1] for p in outcome.plan.nodes["resize"]}
    assert any(gone.name in line for line in outcome.skipped_at_plan)
