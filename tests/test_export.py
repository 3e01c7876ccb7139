"""`zrecipe export` from an adapter, a checkpoint zip and a recipe; full fine-tunes as model folders."""

from __future__ import annotations

import json
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
import typer
from mlx.utils import tree_flatten

from zrecipe.cli import export as export_cli
from zrecipe.cli.main import run_app
from zrecipe.export.full_export import export_full_model, shard_plan
from zrecipe.export.lora_formats import read_lora
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.training.checkpoint import write_checkpoint
from zrecipe.training.lora import adapter_metadata, adapter_tensors, apply_lora, save_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("export") / "tiny", seed=4)


@pytest.fixture(scope="module")
def trained(tiny):
    model = load_transformer(tiny, dtype="float32")
    target = SimpleNamespace(
        block_type="layers",
        start=0,
        end=2,
        layer_types=("attention.to_q", "feed_forward.w3"),
        rank=4,
        alpha=2.0,
    )
    paths = apply_lora(model, [target])
    rng = np.random.default_rng(3)
    for path, layer in model.named_modules():
        if path in paths:
            layer.lora_b = mx.array(rng.standard_normal(layer.lora_b.shape).astype(np.float32))
    return model


def _app():
    app = typer.Typer()
    app.callback()(lambda: None)
    export_cli.register(app)
    return app


def _export(*argv) -> int:
    return run_app(_app(), ["export", *map(str, argv)])


def _same_deltas(a, b, rtol=1e-6):
    assert set(a.deltas) == set(b.deltas)
    for path in a.deltas:
        np.testing.assert_allclose(
            np.array(a.deltas[path].delta()), np.array(b.deltas[path].delta()), rtol=rtol, atol=1e-6
        )


def test_export_adapter_file_each_format(trained, tmp_path, capsys):
    adapter = save_adapter(trained, tmp_path / "adapter.safetensors", {"base_model": "tiny", "step": 9})
    source = read_lora(adapter)
    for fmt in ("mflux", "comfyui", "diffusers", "kohya", "musubi"):
        out = tmp_path / f"out_{fmt}.safetensors"
        assert _export(adapter, "--format", fmt, "-o", out, "--dtype", "float32") == 0
        assert f"wrote {out}" in capsys.readouterr().out
        _same_deltas(source, read_lora(out))
        assert mx.load(str(out), return_metadata=True)[1]["step"] == "9"
    assert _export(adapter, "--format", "mflux", "--format", "kohya") == 0  # defaults beside the input
    assert (tmp_path / "adapter_mflux.safetensors").is_file() and (
        tmp_path / "adapter_kohya.safetensors"
    ).is_file()
    assert (
        mx.load(str(tmp_path / "adapter_kohya.safetensors"))[
            "lora_unet_layers_0_attention_qkv.lora_down.weight"
        ].dtype
        == mx.bfloat16
    )


def test_export_checkpoint_zip(trained, tmp_path):
    meta = {"base_model": "tiny", "step": "20"}
    zip_path = write_checkpoint(
        tmp_path / "run",
        20,
        (adapter_tensors(trained), adapter_metadata(trained, meta)),
        {"m": mx.zeros((1,))},
        {"epoch": 0},
        [],
        {"model": "tiny"},
        {"mode": "lora"},
    )
    out = tmp_path / "ckpt.safetensors"
    assert _export(zip_path, "--format", "diffusers", "-o", out, "--dtype", "float32") == 0
    ref = read_lora(save_adapter(trained, tmp_path / "ref.safetensors"))
    _same_deltas(ref, read_lora(out))
    _same_deltas(ref, read_lora(zip_path))  # generate --lora-paths CHECKPOINT.zip reads its adapter


def test_export_recipe_uses_its_output_and_formats(trained, tiny, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "recipe.yaml").write_text(
        f"model: {tiny}\ndatasets:\n  - path: imgs\ntraining_loop: {{max_steps: 2}}\n"
        "save: {output_path: out}\nexport: {formats: [kohya, mflux], dtype: float32}\n"
    )
    assert _export(tmp_path / "recipe.yaml") == 2
    assert "run `zrecipe build` first" in capsys.readouterr().err
    save_adapter(trained, tmp_path / "out" / "adapter.safetensors")
    assert _export(tmp_path / "recipe.yaml") == 0
    exports = tmp_path / "out" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == [
        "adapter_kohya.safetensors",
        "adapter_mflux.safetensors",
    ]
    _same_deltas(
        read_lora(tmp_path / "out" / "adapter.safetensors"), read_lora(exports / "adapter_kohya.safetensors")
    )


def test_bad_inputs_exit_2(tmp_path, capsys):
    assert _export(tmp_path / "nope.safetensors", "--format", "mflux") == 2
    (tmp_path / "a.txt").write_text("x")
    assert _export(tmp_path / "a.txt", "--format", "mflux") == 2
    assert "unknown input type" in capsys.readouterr().err
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    assert _export(junk, "--format", "mflux") == 2
    mx.save_safetensors(
        str(tmp_path / "l.safetensors"),
        {"x.lora_A.weight": mx.zeros((1, 2)), "x.lora_B.weight": mx.zeros((2, 1))},
    )
    assert _export(tmp_path / "l.safetensors", "--format", "onnx") == 2
    assert "unknown --format onnx" in capsys.readouterr().err
    assert _export(tmp_path / "l.safetensors") == 2  # no --format and no recipe to take them from


def test_shard_plan():
    assert shard_plan({"a": 4, "b": 4, "c": 4}, 8) == [["a", "b"], ["c"]]
    assert shard_plan({"a": 20, "b": 1}, 8) == [["a"], ["b"]]


def test_full_finetune_exports_a_loadable_model_folder(tiny, tmp_path):
    model = load_transformer(tiny, dtype="float32")
    weights = dict(tree_flatten(model.parameters()))
    weights["layers.0.attention.to_q.weight"] = weights["layers.0.attention.to_q.weight"] + 0.5  # "trained"
    full = tmp_path / "transformer.safetensors"
    mx.save_safetensors(str(full), weights, metadata={"format": "zrecipe-full", "base_model": str(tiny)})
    out = tmp_path / "model"
    assert _export(full, "--format", "diffusers", "-o", out, "--dtype", "float32") == 0
    # The tiny model fits one shard: a single file, no index.
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    for name in ("model_index.json", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / name).exists()
    loaded = load_transformer(out, dtype="float32")
    got = dict(tree_flatten(loaded.parameters()))
    np.testing.assert_array_equal(
        np.array(got["layers.0.attention.to_q.weight"]), np.array(weights["layers.0.attention.to_q.weight"])
    )
    assert _export(full, "--format", "kohya", "-o", tmp_path / "k") == 2  # LoRA-only format
    sharded = export_full_model(weights, tiny, tmp_path / "sharded", "float32", max_shard_bytes=200_000)
    index = json.loads(
        (sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text()
    )
    assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(weights)
    again = dict(tree_flatten(load_transformer(sharded, dtype="float32").parameters()))
    assert all(np.array_equal(np.array(again[k]), np.array(weights[k])) for k in weights)
    bad = dict(weights)
    bad.pop("layers.1.feed_forward.w2.weight")
    with pytest.raises(Exception, match="missing"):
        export_full_model(bad, tiny, tmp_path / "bad")


@pytest.mark.parity
def test_full_export_loads_in_diffusers(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    model = load_transformer(tiny, dtype="float32")
    weights = dict(tree_flatten(model.parameters()))
    out = export_full_model(weights, tiny, tmp_path / "m", "float32", max_shard_bytes=200_000)
    reference = diffusers.ZImageTransformer2DModel.from_pretrained(out / "transformer")
    state = reference.state_dict()
    assert set(state) == set(weights)
    key = "layers.1.feed_forward.w1.weight"
    np.testing.assert_array_equal(state[key].to(torch.float32).numpy(), np.array(weights[key]))
