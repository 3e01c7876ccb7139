"""The model files people have: ComfyUI / original single files and mflux-save folders (plain and quantised).

The tiny model's weights are re-saved in each layout (tests/layouts.py), loaded through the recipe /
`--model` spec forms, and compared with the diffusers-folder load: transformer forward, VAE encode and
decode, text-encoder hidden states (all ≤ 1e-4; the same weights in fp32 give exactly equal outputs). The
VAE file is also loaded by diffusers' own single-file loader. Strict loading lists every problem at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import layouts
import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from safetensors.numpy import load_file

from zrecipe.errors import ModelError, RecipeError
from zrecipe.models.z_image.resolve import ModelSpec, resolve_model
from zrecipe.models.z_image.text_encoder import load_text_encoder
from zrecipe.models.z_image.tiny import TEXT_HIDDEN, create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.models.z_image.vae import load_vae
from zrecipe.recipe import Recipe, load_recipe

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return create_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny")


def max_err(a: mx.array, b: mx.array) -> float:
    return float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))))


def transformer_out(model) -> mx.array:
    x = mx.random.normal((2, 16, 8, 8), key=mx.random.key(1))
    t = mx.array([0.3, 0.8])
    caps = [
        mx.random.normal((5, TEXT_HIDDEN), key=mx.random.key(2)),
        mx.random.normal((9, TEXT_HIDDEN), key=mx.random.key(5)),
    ]
    return model(x, t, caps)


def vae_out(model) -> tuple[mx.array, mx.array]:
    images = mx.random.uniform(-1, 1, (1, 32, 32, 3), key=mx.random.key(3))
    return model.encode(images), model.decode(mx.random.normal((1, 4, 4, 16), key=mx.random.key(4)))


def text_out(model) -> mx.array:
    ids = mx.array([[3, 17, 99, 250, 7, 1, 0], [5, 6, 7, 8, 9, 10, 11]])
    return model(ids, mx.array([[1, 1, 1, 1, 1, 0, 0], [1] * 7]))


def _as_mx(weights: dict) -> dict:
    return {k: mx.array(v) for k, v in weights.items()}


# -- ComfyUI / original single files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def comfy_files(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("comfyui")
    levels = len(json.loads((tiny / "vae" / "config.json").read_text())["block_out_channels"])
    te = layouts.read_folder(tiny / "text_encoder")
    te["lm_head.weight"] = te["model.embed_tokens.weight"]  # tied head, as some exports carry it
    return {
        "transformer": layouts.save_single(
            out / "z_image_bf16.safetensors",
            layouts.original_transformer(layouts.read_folder(tiny / "transformer")),
        ),
        "text_encoder": layouts.save_single(out / "qwen_3_4b.safetensors", te),
        "vae": layouts.save_single(
            out / "ae.safetensors", layouts.original_vae(layouts.read_folder(tiny / "vae"), levels)
        ),
    }


def test_comfyui_transformer_file_equals_the_diffusers_folder(tiny, comfy_files, tmp_path):
    reference = transformer_out(load_transformer(tiny, dtype="float32"))
    folder = resolve_model(f"{tiny},transformer={comfy_files['transformer']}")
    err = max_err(transformer_out(load_transformer(folder, dtype="float32")), reference)
    assert err <= TOLERANCE, err
    # The same file with ComfyUI's full-checkpoint prefix, and in bf16, loads too.
    prefixed = layouts.original_transformer(
        layouts.read_folder(tiny / "transformer"), "model.diffusion_model."
    )
    bf16 = tmp_path / "z_image_bf16.safetensors"
    mx.save_safetensors(str(bf16), {k: mx.array(v).astype(mx.bfloat16) for k, v in prefixed.items()})
    tiny_bf16 = create_tiny_model(tmp_path / "tiny-bf16", dtype="bfloat16")
    ours = load_transformer(resolve_model(f"{tiny},transformer={bf16}"), dtype="float32")
    assert (
        max_err(transformer_out(ours), transformer_out(load_transformer(tiny_bf16, dtype="float32"))) == 0.0
    )


def test_comfyui_text_encoder_file_equals_the_diffusers_folder(tiny, comfy_files):
    folder = resolve_model(f"{tiny},text_encoder={comfy_files['text_encoder']}")
    err = max_err(
        text_out(load_text_encoder(folder, dtype="float32")),
        text_out(load_text_encoder(tiny, dtype="float32")),
    )
    assert err <= TOLERANCE, err


def test_original_vae_file_equals_the_diffusers_folder(tiny, comfy_files):
    folder = resolve_model(f"{tiny},vae={comfy_files['vae']}")
    ours, reference = vae_out(load_vae(folder, dtype="float32")), vae_out(load_vae(tiny, dtype="float32"))
    errs = [max_err(a, b) for a, b in zip(ours, reference, strict=True)]
    assert max(errs) <= TOLERANCE, errs


@pytest.mark.parity
def test_original_vae_file_matches_diffusers_single_file_loading(tiny, comfy_files):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.AutoencoderKL.from_single_file(
        str(comfy_files["vae"]), config=str(tiny / "vae"), local_files_only=True, torch_dtype=torch.float32
    ).eval()
    ours = load_vae(resolve_model(f"{tiny},vae={comfy_files['vae']}"), dtype="float32")
    images = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        posterior = reference.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
        latents = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 16, 4, 4)).astype(np.float32))
        decoded = reference.decode(latents).sample
    mean = np.asarray(ours.encode(mx.array(images))).transpose(0, 3, 1, 2)
    image = np.asarray(ours.decode(mx.array(latents.permute(0, 2, 3, 1).numpy()))).transpose(0, 3, 1, 2)
    enc_err = np.abs(mean - posterior.numpy()).max() / np.abs(posterior.numpy()).max()
    dec_err = np.abs(image - decoded.numpy()).max() / np.abs(decoded.numpy()).max()
    print(f"diffusers single-file VAE: encode {enc_err:.2e}, decode {dec_err:.2e} (max relative)")
    assert enc_err <= TOLERANCE and dec_err <= TOLERANCE, (enc_err, dec_err)


@pytest.mark.parity
def test_the_original_transformer_naming_is_what_diffusers_single_file_converts(tiny, comfy_files):
    """Our writer of the original naming agrees with diffusers' single-file converter for Z-Image."""
    torch = pytest.importorskip("torch")
    utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    original = {k: torch.from_numpy(v) for k, v in load_file(str(comfy_files["transformer"])).items()}
    converted = utils.convert_z_image_transformer_checkpoint_to_diffusers(original)
    reference = layouts.read_folder(tiny / "transformer")
    assert sorted(converted) == sorted(reference)
    assert all(np.array_equal(converted[k].numpy(), reference[k]) for k in reference)


RECIPE = """\
model:
  base: {base}
  transformer: comfy/z_image_bf16.safetensors
  text_encoder: comfy/qwen_3_4b.safetensors
  vae: comfy/ae.safetensors
datasets: []
training_loop: {{max_steps: 1}}
"""


def test_recipe_names_component_files_and_gets_their_content_identity(tiny, comfy_files, tmp_path):
    from zrecipe.engine import StatCache
    from zrecipe.pipeline.identity import ModelIdentity

    shutil.copytree(comfy_files["vae"].parent, tmp_path / "comfy")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(RECIPE.format(base=tiny))
    recipe = load_recipe(recipe_file)
    spec = ModelSpec.parse(recipe.model)
    assert spec.base == str(tiny)
    assert dict(spec.files) == {
        "transformer": str(tmp_path / "comfy" / "z_image_bf16.safetensors"),
        "text_encoder": str(tmp_path / "comfy" / "qwen_3_4b.safetensors"),
        "vae": str(tmp_path / "comfy" / "ae.safetensors"),
    }
    assert Recipe.from_dict(recipe.to_dict(), source=recipe_file) == recipe  # the string form round-trips

    # The same files placed by hand in a diffusers-layout folder: the same identity, component by component.
    by_hand = tmp_path / "by-hand"
    shutil.copytree(tiny, by_hand)
    placed = {
        "transformer/diffusion_pytorch_model.safetensors": "z_image_bf16.safetensors",
        "vae/diffusion_pytorch_model.safetensors": "ae.safetensors",
        "text_encoder/model.safetensors": "qwen_3_4b.safetensors",
    }
    for target, source in placed.items():
        for old in (by_hand / target).parent.glob("*.safetensors*"):
            old.unlink()
        shutil.copy(tmp_path / "comfy" / source, by_hand / target)
    with StatCache(tmp_path / "stat.sqlite") as sc:
        named = ModelIdentity(recipe.model, tmp_path / "store", sc)
        hand = ModelIdentity(str(by_hand), tmp_path / "store", sc)
        diffusers = ModelIdentity(str(tiny), tmp_path / "store", sc)
        assert (named.transformer, named.vae, named.text_encoder) == (
            hand.transformer,
            hand.vae,
            hand.text_encoder,
        )
        assert named.transformer != diffusers.transformer  # other bytes, other identity
        renamed = tmp_path / "elsewhere.safetensors"
        shutil.copy(comfy_files["transformer"], renamed)
        moved = ModelIdentity(f"{tiny},transformer={renamed}", tmp_path / "store", sc)
        assert moved.transformer == named.transformer  # the name and place of a file do not matter
    loaded = load_transformer(named.model_path, dtype="float32")
    assert (
        max_err(transformer_out(loaded), transformer_out(load_transformer(tiny, dtype="float32")))
        <= TOLERANCE
    )


def test_recipe_model_errors_are_listed_with_lines(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        f"model:\n  base: {tiny}\n  transformer: missing.safetensors\n  vae: notes.txt\n"
        "  mflux_save: plain\n  text_encodr: x.safetensors\ndatasets: []\ntraining_loop: {max_steps: 1}\n"
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe_file)
    text = str(info.value)
    assert f"recipe.yaml:3: model.transformer: no such file: {tmp_path / 'missing.safetensors'}" in text
    assert "recipe.yaml:4: model.vae:" in text and "is not a .safetensors file" in text
    assert "recipe.yaml:5: model.mflux_save:" in text and "not a folder written by mflux-save" in text
    assert "recipe.yaml:6: model.text_encodr: unknown key; did you mean `text_encoder`?" in text
    recipe_file.write_text(
        "model: {transformer: a.safetensors}\ndatasets: []\ntraining_loop: {max_steps: 1}\n"
    )
    with pytest.raises(RecipeError, match=r"model.base: missing"):
        load_recipe(recipe_file)


def test_strict_errors_list_every_problem_of_an_original_file(tiny, comfy_files, tmp_path):
    transformer = layouts.original_transformer(layouts.read_folder(tiny / "transformer"))
    del transformer["layers.0.attention.qkv.weight"]
    transformer["layers.0.attention.extra.weight"] = np.zeros((2, 2), np.float32)
    transformer["cap_pad_token"] = np.zeros((1, 3), np.float32)
    broken = layouts.save_single(tmp_path / "broken.safetensors", transformer)
    with pytest.raises(ModelError) as info:
        load_transformer(resolve_model(f"{tiny},transformer={broken}"))
    text = str(info.value)
    assert "missing (3): layers.0.attention.to_k.weight; layers.0.attention.to_q.weight" in text
    assert "unexpected (1): layers.0.attention.extra.weight" in text
    assert "mis-shaped (1): cap_pad_token: file (1, 3) vs model (1, 64)" in text

    vae = layouts.original_vae(layouts.read_folder(tiny / "vae"), 4)
    del vae["encoder.mid.attn_1.q.weight"]
    vae["decoder.up.0.block.0.nin_shortcut.bias"] = np.zeros(8, np.float32)
    broken = layouts.save_single(tmp_path / "ae.safetensors", vae)
    with pytest.raises(ModelError) as info:
        load_vae(resolve_model(f"{tiny},vae={broken}"))
    assert "missing (1): encoder.mid_block.attentions.0.to_q.weight" in str(info.value)
    assert "unexpected (1): decoder.up_blocks.3.resnets.0.conv_shortcut.bias" in str(info.value)


# -- mflux-save ---------------------------------------------------------------------------------------


def write_mflux_save(tiny: Path, folder: Path, bits: int | None) -> Path:
    """The tiny model as `mflux-save [-q bits]` writes it (see tests/layouts.py)."""
    transformer = load_transformer(tiny, dtype="float32")
    text_encoder = load_text_encoder(tiny, dtype="float32")
    if bits:
        layouts.quantize_like_mflux(transformer, bits)
        layouts.quantize_like_mflux(text_encoder, bits)
    layouts.write_mflux_component(
        folder / "transformer", layouts.mflux_transformer(layouts.module_weights(transformer)), bits
    )
    config = json.loads((tiny / "text_encoder" / "config.json").read_text())
    te = layouts.mflux_text_encoder(
        layouts.module_weights(text_encoder), config["head_dim"], config["rope_theta"]
    )
    layouts.write_mflux_component(folder / "text_encoder", te, bits)
    layouts.write_mflux_component(
        folder / "vae", layouts.mflux_vae(layouts.read_folder(tiny / "vae")), bits, 1
    )
    shutil.copytree(tiny / "tokenizer", folder / "tokenizer")
    return folder


def test_mflux_save_folder_equals_the_diffusers_folder(tiny, tmp_path):
    saved = write_mflux_save(tiny, tmp_path / "saved", None)
    folder = resolve_model(f"{tiny},mflux_save={saved}")
    errs = {
        "transformer": max_err(
            transformer_out(load_transformer(folder, dtype="float32")),
            transformer_out(load_transformer(tiny, dtype="float32")),
        ),
        "text_encoder": max_err(
            text_out(load_text_encoder(folder, dtype="float32")),
            text_out(load_text_encoder(tiny, dtype="float32")),
        ),
        "vae": max(
            max_err(a, b)
            for a, b in zip(
                vae_out(load_vae(folder, dtype="float32")),
                vae_out(load_vae(tiny, dtype="float32")),
                strict=True,
            )
        ),
    }
    assert max(errs.values()) <= TOLERANCE, errs


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_mflux_save_loads_quantised_and_is_a_qlora_base(tiny, tmp_path, bits):
    from zrecipe.recipe.schema import LoraTarget
    from zrecipe.training.lora import apply_lora, trainable_parameter_count

    saved = write_mflux_save(tiny, tmp_path / "saved", bits)
    folder = resolve_model(f"{tiny},mflux_save={saved}")
    model = load_transformer(folder, dtype="float32")
    reference = load_transformer(tiny, dtype="float32")
    layouts.quantize_like_mflux(reference, bits)
    quantised = [p for p, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantised == [p for p, m in reference.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert "layers.0.attention.to_q" in quantised and all(
        m.bits == bits for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)
    )
    base_out = transformer_out(model)
    assert max_err(base_out, transformer_out(reference)) <= TOLERANCE

    te = load_text_encoder(folder, dtype="float32")
    te_ref = load_text_encoder(tiny, dtype="float32")
    layouts.quantize_like_mflux(te_ref, bits)
    assert isinstance(te.model.embed_tokens, nn.QuantizedEmbedding)
    assert max_err(text_out(te), text_out(te_ref)) <= TOLERANCE

    # QLoRA: LoRA over the QuantizedLinear layers; B = 0, so the output is unchanged at the start.
    paths = apply_lora(model, [LoraTarget("layers", 0, None, ("attention.to_q", "attention.to_v"), 4, 4.0)])
    assert paths and trainable_parameter_count(model) == sum(4 * (64 + 64) for _ in paths)
    assert max_err(transformer_out(model), base_out) == 0.0
    with pytest.raises(ModelError, match=f"stored quantised to {bits} bits"):
        load_transformer(folder, quantize=12 - bits)


def test_quantised_mflux_save_refuses_full_fine_tuning_in_the_recipe(tiny, tmp_path):
    saved = write_mflux_save(tiny, tmp_path / "saved", 4)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        f"model: {{base: {tiny}, mflux_save: {saved}}}\nmode: full\ndatasets: []\ntraining_loop: {{max_steps: 1}}\n"
    )
    with pytest.raises(
        RecipeError, match=r"recipe.yaml:1: model.mflux_save: .* is quantised \(4-bit\); a full fine-tune"
    ):
        load_recipe(recipe_file)


def test_quantised_weights_that_do_not_fit_are_listed(tiny, tmp_path):
    saved = write_mflux_save(tiny, tmp_path / "saved", 4)
    scales = []
    for shard in sorted((saved / "transformer").glob("*.safetensors")):
        weights, meta = mx.load(str(shard), return_metadata=True)
        for key in sorted(k for k in weights if k.startswith("layers.") and k.endswith(".scales"))[:1]:
            weights[key] = mx.concatenate(
                [weights[key]] * 3, axis=1
            )  # 64 inputs in 3 groups: no quantisation
            scales.append(key)
        mx.save_safetensors(str(shard), weights, meta)
    assert scales
    with pytest.raises(ModelError) as info:
        load_transformer(resolve_model(f"{tiny},mflux_save={saved}"))
    text = str(info.value)
    assert "quantised weights that do not fit the model" in text
    assert all(key.removesuffix(".scales") in text for key in scales)


def test_generate_accepts_a_spec_with_component_files(tiny, comfy_files, tmp_path, capsys):
    from zrecipe.cli.main import app, run_app

    out = tmp_path / "image.png"
    spec = f"{tiny},transformer={comfy_files['transformer']},vae={comfy_files['vae']}"
    argv = ["generate", "--prompt", "a circle", "--model", spec, "--steps", "1", "--width", "32", "--height", "32",
            "-o", str(out)]  # fmt: skip
    assert run_app(app, argv) == 0
    assert out.is_file()


@pytest.mark.slow
def test_build_trains_a_qlora_on_a_quantised_mflux_save_base(tiny, tmp_path):
    """The whole graph on `{base: tiny, mflux_save: <4-bit folder>}` with ComfyUI's VAE file (about 15 s)."""
    from zrecipe.cli.main import app, run_app

    saved = write_mflux_save(tiny, tmp_path / "q4", 4)
    layouts.save_single(
        tmp_path / "ae.safetensors", layouts.original_vae(layouts.read_folder(tiny / "vae"), 4)
    )
    (tmp_path / "data").mkdir()
    for f in sorted((Path(__file__).parents[1] / "recipes" / "data" / "tiny").iterdir())[:8]:
        shutil.copy2(f, tmp_path / "data" / f.name)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {{base: tiny, mflux_save: {saved}, vae: ae.safetensors}}\n"
        "datasets: [{path: data, resolution: 64}]\ntraining_loop: {max_steps: 2, batch_size: 2}\n"
        "lora: {rank: 4}\nsave: {checkpoint_frequency: 2, output_path: out}\n"
        "sample: {prompts: [a circle], steps: 2, width: 32, height: 32}\nexport: {formats: [mflux]}\n"
    )
    assert run_app(app, ["build", str(recipe), "-q"]) == 0
    assert (tmp_path / "out" / "adapter.safetensors").is_file()
    assert run_app(app, ["plan", str(recipe), "--check"]) == 0
