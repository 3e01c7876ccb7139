"""mflux training checkpoint zips: recognised, read by export / generate, converted for a zrecipe run.

The fixture zip is written the way mflux 0.24 writes one (`TrainingState.save`,
`ZImageTrainingAdapter.save_lora_adapter`, `Optimizer.save`, `Iterator.to_dict`, `Statistics.save` in
mflux/models/common/training/ and mflux/models/z_image/training_adapter/): an MLX model whose
`transformer` holds mflux's LoRA layers (`lora_A` (in, r), `lora_B` (r, out)) at mflux's module paths,
one real AdamW update over the whole model, `tree_flatten(optimizer.state)` saved as the optimizer file.
"""

from __future__ import annotations

import json
import zipfile

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.cli import export as export_cli
from zrecipe.cli.main import run_app
from zrecipe.errors import CheckpointError
from zrecipe.export.apply import apply_loras, linear_shapes
from zrecipe.export.lora_formats import read_lora
from zrecipe.lora.mflux_checkpoint import is_mflux_checkpoint, read_mflux_checkpoint
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.training.checkpoint import read_checkpoint
from zrecipe.training.lora import load_adapter_tensors
from zrecipe.training.optim import flatten_state, restore_state

STEP = 6
# mflux module path → (in, out, rank, alpha or None); mflux names t_embedder / final-layer adaLN its own way.
MFLUX_LAYERS = {
    "layers.0.attention.to_q": (64, 64, 4, 8.0),
    "layers.1.attention.to_q": (64, 64, 4, 8.0),
    "layers.0.attention.to_out.0": (64, 64, 4, 8.0),
    "layers.1.attention.to_out.0": (64, 64, 4, 8.0),
    "t_embedder.linear1": (256, 1024, 2, None),
    "all_final_layer.2-1.adaLN_modulation.0": (64, 64, 2, None),
}
ZRECIPE_PATH = {
    "t_embedder.linear1": "t_embedder.mlp.0",
    "all_final_layer.2-1.adaLN_modulation.0": "all_final_layer.2-1.adaLN_modulation.1",
}
CONFIG_TARGETS = [
    {"module_path": "layers.{block}.attention.to_q", "blocks": {"start": 0, "end": 2}, "rank": 4, "alpha": 8.0},
    {"module_path": "layers.{block}.attention.to_out.0", "blocks": {"start": 0, "end": 2}, "rank": 4, "alpha": 8.0},
    {"module_path": "t_embedder.linear1", "rank": 2},
    {"module_path": "all_final_layer.2-1.adaLN_modulation.0", "rank": 2},
]  # fmt: skip


class _MfluxLoRA(nn.Module):
    """mflux's LoRALinear (mflux/models/common/lora/layer/linear_lora_layer.py): its parameter names."""

    def __init__(self, din: int, dout: int, rank: int, scale: float, rng):
        super().__init__()
        self.linear = nn.Linear(din, dout, bias=False)
        self.scale = scale
        self.lora_A = mx.array(rng.uniform(-0.1, 0.1, (din, rank)).astype(np.float32))
        self.lora_B = mx.array(rng.standard_normal((rank, dout)).astype(np.float32) * 0.1)

    def __call__(self, x):
        return self.linear(x) + self.scale * ((x @ self.lora_A) @ self.lora_B)


def _tree(paths: dict) -> dict:
    root: dict = {}
    for path, module in paths.items():
        node = root
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = module
    return root


def _to_module(tree) -> nn.Module:
    module = nn.Module()
    for key, value in tree.items():
        setattr(module, key, value if isinstance(value, nn.Module) else _to_module(value))
    return module


def _mflux_zip(folder, optimizer_name="AdamW", rng_seed=0, shapes=None, targets=None):
    """(zip path, {mflux path: (A (r, in), B (out, r), scale)}, flattened optimizer state); `shapes` and
    `targets` default to MFLUX_LAYERS and CONFIG_TARGETS."""
    rng = np.random.default_rng(rng_seed)
    shapes = MFLUX_LAYERS if shapes is None else shapes
    layers = {p: _MfluxLoRA(i, o, r, 1.0 if a is None else a / r, rng) for p, (i, o, r, a) in shapes.items()}
    model = nn.Module()
    model.transformer = _to_module(_tree(layers))
    model.vae = nn.Linear(4, 4)  # frozen parts of the whole model carry no optimiser state
    model.freeze()
    for layer in layers.values():
        layer.unfreeze(keys=["lora_A", "lora_B"], recurse=False)

    def loss(m):
        return sum((layers[p](mx.ones((1, shapes[p][0]))) ** 2).sum() for p in layers)

    optimizer = (
        optim.AdamW(learning_rate=1e-3) if optimizer_name == "AdamW" else optim.Lion(learning_rate=1e-3)
    )
    for _ in range(2):
        _, grads = nn.value_and_grad(model, loss)(model)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    state = dict(tree_flatten(optimizer.state))
    prefix = f"{STEP:07d}"
    files = {
        "config": f"{prefix}_config.json",
        "optimizer": f"{prefix}_optimizer.safetensors",
        "lora_adapter": f"{prefix}_adapter.safetensors",
        "iterator": f"{prefix}_iterator.json",
        "loss": f"{prefix}_loss.json",
    }
    scratch = folder / "scratch"
    scratch.mkdir()
    mx.save_safetensors(str(scratch / files["optimizer"]), state)
    adapter = {f"diffusion_model.{p}.lora_A.weight": m.lora_A.T for p, m in layers.items()}
    adapter |= {f"diffusion_model.{p}.lora_B.weight": m.lora_B.T for p, m in layers.items()}
    mx.save_safetensors(
        str(scratch / files["lora_adapter"]), adapter, {"mflux_version": "0.24.0", "model": "z-image"}
    )
    config = {
        "model": "z-image",
        "seed": 4,
        "data": "/data/images",
        "training_loop": {"num_epochs": 3, "batch_size": 1},
        "optimizer": {"name": optimizer_name, "learning_rate": 1e-3},
        "checkpoint": {"save_frequency": 3, "output_path": "training"},
        "lora_layers": {"targets": CONFIG_TARGETS if targets is None else targets},
    }
    iterator = {
        "position": 2, "epoch": 1, "num_iterations": STEP, "current_permutation": [1, 0, 2],
        "rng_state": [3, [1, 2, 3], None], "batch_size": 1, "num_epochs": 3, "seed": 4,
        "start_date_time": "2026-01-01 10:00:00",
    }  # fmt: skip
    loss_doc = {
        "step_loss": [
            {"step": s, "loss": 1.0 / s, "time": f"2026-01-01 10:00:0{s}"} for s in range(1, STEP + 1)
        ],
        "batch_loss": [],
    }
    checkpoint = {"metadata": {"start": "2026-01-01 10:00:00", "number_of_training_data": 3}, "files": files}
    run = {"version": 1, "model": "z-image", "data_root": "/data/images", "checkpoint_files": files}
    for name, doc in ((files["config"], config), (files["iterator"], iterator), (files["loss"], loss_doc),
                      ("checkpoint.json", checkpoint), ("run.json", run)):  # fmt: skip
        (scratch / name).write_text(json.dumps(doc, indent=4))
    zip_path = folder / f"{STEP:07d}_checkpoint.zip"
    order = [files["optimizer"], files["lora_adapter"], files["iterator"], files["loss"], files["config"],
             "checkpoint.json", "run.json"]  # fmt: skip
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in order:
            zf.write(scratch / name, name)
    trained = {p: (m.lora_A.T, m.lora_B.T, m.scale) for p, m in layers.items()}
    return zip_path, trained, state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("mflux") / "tiny", seed=8)


@pytest.fixture(scope="module")
def mflux_zip(tmp_path_factory):
    return _mflux_zip(tmp_path_factory.mktemp("mflux_zip"))


def _expected_deltas(trained) -> dict[str, np.ndarray]:
    return {ZRECIPE_PATH.get(p, p): s * np.array(b) @ np.array(a) for p, (a, b, s) in trained.items()}


def test_read_checkpoint_says_what_the_zip_is(mflux_zip):
    path, _, _ = mflux_zip
    assert is_mflux_checkpoint(path)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint(path)
    message = str(err.value)
    assert "mflux training checkpoint (step 6)" in message and "damaged" not in message


def test_conversion_gives_adapter_optimizer_step_and_what_did_not_map(mflux_zip, tiny):
    path, trained, state = mflux_zip
    run = read_mflux_checkpoint(path)
    assert run.step == STEP and run.model == "z-image" and run.mflux_version == "0.24.0"
    assert run.optimizer_name == "AdamW"
    assert [h["step"] for h in run.loss] == list(range(1, STEP + 1))
    assert run.adapter_metadata["format"] == "zrecipe" and run.adapter_metadata["step"] == str(STEP)
    # Targets: the block ranges become recipe targets, the others are reported.
    assert [(t.block_type, t.start, t.end, t.layer_types, t.rank, t.alpha) for t in run.targets] == [
        ("layers", 0, 2, ("attention.to_q",), 4, 8.0),
        ("layers", 0, 2, ("attention.to_out.0",), 4, 8.0),
    ]
    assert any("t_embedder.linear1" in u for u in run.unmapped)
    assert any("data order" in u for u in run.unmapped)
    assert not any(u.startswith("optimizer") for u in run.unmapped)

    # The adapter loads into zrecipe's model at zrecipe's paths with mflux's scale (alpha from the config).
    model = load_transformer(tiny, dtype="float32")
    model.freeze()  # as training does: only the adapters train
    load_adapter_tensors(model, run.adapter, str(path))
    modules = dict(model.named_modules())
    for zpath, delta in _expected_deltas(trained).items():
        np.testing.assert_allclose(np.array(modules[zpath].delta()), delta, rtol=1e-6, atol=1e-7)
    # The optimiser state is exactly what zrecipe's AdamW for that model restores.
    optimizer = optim.AdamW(learning_rate=1e-3)
    optimizer.init(model.trainable_parameters())
    restore_state(optimizer, run.optimizer, str(path))
    restored = flatten_state(optimizer)
    assert restored["step"].item() == state["step"].item() == 2
    for mpath in MFLUX_LAYERS:
        zpath = ZRECIPE_PATH.get(mpath, mpath)
        for ab in "AB":
            for mv in "mv":
                assert mx.array_equal(
                    restored[f"{zpath}.lora_{ab.lower()}.{mv}"], state[f"transformer.{mpath}.lora_{ab}.{mv}"]
                )


def test_optimizer_without_an_adamw_equivalent_is_reported(tmp_path):
    path, _, _ = _mflux_zip(tmp_path, optimizer_name="Lion")
    run = read_mflux_checkpoint(path)
    assert run.optimizer == {} and any("Lion" in u for u in run.unmapped)
    assert run.adapter  # the adapter still converts


def test_export_and_generate_read_the_adapter_of_an_mflux_zip(mflux_zip, tiny, tmp_path, capsys):
    path, trained, _ = mflux_zip
    app = export_cli.typer.Typer()
    app.callback()(lambda: None)
    export_cli.register(app)
    out = tmp_path / "from_mflux.safetensors"
    assert (
        run_app(app, ["export", str(path), "--format", "comfyui", "-o", str(out), "--dtype", "float32"]) == 0
    )
    assert "mflux training checkpoint" in capsys.readouterr().err
    exported = read_lora(out)
    for zpath, delta in _expected_deltas(trained).items():
        np.testing.assert_allclose(np.array(exported.deltas[zpath].delta()), delta, rtol=1e-6, atol=1e-7)
    # generate --lora-paths ZIP: apply_loras reads the zip's adapter.
    model = load_transformer(tiny, dtype="float32")
    layer = "layers.0.attention.to_q"
    x = mx.array(np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32))
    before = np.array(dict(model.named_modules())[layer](x))
    assert layer in apply_loras(model, [path])
    after = np.array(dict(model.named_modules())[layer](x))
    np.testing.assert_allclose(
        after - before, np.array(x) @ _expected_deltas(trained)[layer].T, rtol=1e-4, atol=1e-5
    )
    assert set(read_lora(path, linear_shapes(model)).deltas) == set(_expected_deltas(trained))


def test_damaged_mflux_zip_is_refused(mflux_zip, tmp_path):
    path, _, _ = mflux_zip
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{STEP:07d}_adapter.safetensors")
    data[info.header_offset + 60] ^= 0xFF  # inside the deflated adapter member
    broken = tmp_path / "broken.zip"
    broken.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        read_mflux_checkpoint(broken)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(path.read_bytes()[:200])
    assert not is_mflux_checkpoint(truncated)
