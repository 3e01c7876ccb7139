"""The diffusers-format LoRA export, loaded by diffusers + peft, gives zrecipe's output (fp32, CPU)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

import mlx.core as mx

from zrecipe.export.apply import apply_loras, linear_shapes
from zrecipe.export.lora_formats import read_lora, write_lora
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.training.lora import apply_lora, save_adapter

pytestmark = pytest.mark.parity
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers_lora")
    tiny = create_tiny_model(root / "tiny", seed=5)
    model = load_transformer(tiny, dtype="float32")
    targets = [
        SimpleNamespace(
            block_type="layers",
            start=0,
            end=2,
            layer_types=(
                "attention.to_q",
                "attention.to_v",
                "attention.to_out.0",
                "feed_forward.w1",
                "adaLN_modulation.0",
            ),
            rank=4,
            alpha=6.0,
        ),
        SimpleNamespace(
            block_type="noise_refiner", start=0, end=1, layer_types=("feed_forward.w3",), rank=2, alpha=2.0
        ),
        SimpleNamespace(
            block_type="context_refiner", start=0, end=1, layer_types=("attention.to_k",), rank=3, alpha=1.5
        ),
    ]
    paths = apply_lora(model, targets)
    rng = np.random.default_rng(1)
    for path, layer in model.named_modules():
        if path in paths:  # B large enough that the LoRA visibly changes the output
            layer.lora_b = mx.array(rng.standard_normal(layer.lora_b.shape).astype(np.float32) * 0.3)
    adapter = save_adapter(model, root / "adapter.safetensors", {"base_model": "tiny"})
    exported = write_lora(
        read_lora(adapter), root / "diffusers_lora.safetensors", "diffusers", dtype="float32"
    )
    return tiny, adapter, exported


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 6, 8, generator=gen)
    caps = [torch.randn(n, 64, generator=gen) for n in (5, 37)]
    return x, torch.tensor([0.3, 0.8]), caps


def _reference(model, x, t, caps):
    with torch.no_grad():
        out = model([xi[:, None] for xi in x], t, caps, return_dict=False)[0]
    return torch.stack([o[:, 0] for o in out]).numpy()


def _ours(model, x, t, caps):
    return np.array(model(mx.array(x.numpy()), mx.array(t.numpy()), [mx.array(c.numpy()) for c in caps]))


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("loader", ["load_lora_adapter", "load_lora_weights"])
def test_diffusers_loads_export_and_matches_zrecipe(setup, loader):
    tiny, adapter, exported = setup
    x, t, caps = _inputs()
    reference = diffusers.ZImageTransformer2DModel.from_pretrained(tiny / "transformer").eval()
    base_out = _reference(reference, x, t, caps)
    if loader == "load_lora_adapter":
        reference.load_lora_adapter(str(exported), adapter_name="zr", prefix="transformer")
    else:
        pipe = diffusers.ZImagePipeline(
            scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=reference
        )
        pipe.load_lora_weights(str(exported), adapter_name="zr")
    lora_out = _reference(reference, x, t, caps)

    ours = load_transformer(tiny, dtype="float32")
    assert _rel(_ours(ours, x, t, caps), base_out) <= TOLERANCE
    apply_loras(ours, [read_lora(adapter, linear_shapes(ours))])
    ours_out = _ours(ours, x, t, caps)
    assert _rel(lora_out, base_out) > 1e-2  # the LoRA really changes the output
    assert _rel(ours_out, lora_out) <= TOLERANCE
