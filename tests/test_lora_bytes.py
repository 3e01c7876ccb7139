"""Golden bytes: the adapter file and every export format are pinned for fixed weights.

The LoRA layers sit on a small stand-in module tree with Z-Image's paths, so the pins do not move when
the tiny model's sizes change; `zrecipe.__version__` is fixed because it is written into the metadata.
A change of these hashes is a change of a file format: do it on purpose (and bump the export step).
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn

import zrecipe
from zrecipe.export.lora_formats import read_lora, write_lora
from zrecipe.training.lora import apply_lora, lora_modules, save_adapter

DIM, HIDDEN, ADA = 8, 12, 6


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(DIM, DIM, bias=False) for _ in range(3))
        self.to_out = [nn.Linear(DIM, DIM, bias=False)]


class _FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(DIM, HIDDEN, bias=False), nn.Linear(DIM, HIDDEN, bias=False)
        self.w2 = nn.Linear(HIDDEN, DIM, bias=False)


class _Block(nn.Module):
    def __init__(self, modulation: bool):
        super().__init__()
        self.attention, self.feed_forward = _Attention(), _FeedForward()
        if modulation:
            self.adaLN_modulation = [nn.Linear(ADA, 4 * DIM)]


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = [_Block(True), _Block(True)]
        self.context_refiner = [_Block(False)]


GOLDEN = {
    "adapter": "1d97a9c82bd95996920d21cf0926a01ccb1b33a167a5b916de660e1a9566e3f0",
    "mflux/float32": "8dbda5be6c2a3d8ca049b74f079a5fbe396acc4888506dc80f850de86578c953",
    "mflux/bfloat16": "a93b391d343155a06c13eb14d9ff0fd5f14758459c7d75a93f40339188675e7c",
    "comfyui/float32": "6861c90a650d9d579d125a9fb30ac380b1b16c41488962b8c41d314bf0a23170",
    "diffusers/float32": "098f1cf4e7392364010fb3e3ff576879749823ad8ec2cd75d3d3e3ee6f81fd20",
    "diffusers/bfloat16": "265391f68a52fec9fa382ecf4c122f5ce90d07417a96a4f5547ba5a4be4946d7",
    # kohya became ComfyUI's names with fused qkv (issue #12); musubi holds the former kohya tensors.
    "kohya/float32": "f24cfd6ad623cd5e8596c073b5276929504862b7276ec9e7c4526b5f82c5c716",
    "kohya/bfloat16": "dc239c6b7acc4b8a3d145936caa79e9e3e200e36d45a8146c635234b2c446089",
    "musubi/float32": "796d270c8492fce60f4a4da37a4e5f1fe66cd7d416b37e033d6a0725b5fc80a2",
    "zrecipe/float32": "efd9f3ddae5b7874f1fd31349705d151ac49de82f2a5b3f104155ef264c6198a",
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    model = _Model()
    targets = [
        SimpleNamespace(
            block_type="layers",
            start=0,
            end=2,
            layer_types=("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                         "feed_forward.w2", "adaLN_modulation.0"),
            rank=4,
            alpha=8.0,
        ),
        SimpleNamespace(
            block_type="context_refiner", start=0, end=1, layer_types=("feed_forward.w1",), rank=3, alpha=3.0
        ),
    ]  # fmt: skip
    mx.random.seed(11)  # A's initialisation
    paths = apply_lora(model, targets)
    rng = np.random.default_rng(5)
    for path, layer in model.named_modules():
        if path in paths:
            layer.lora_b = mx.array(rng.standard_normal(layer.lora_b.shape).astype(np.float32) * 0.1)
    folder = tmp_path_factory.mktemp("golden")
    version = zrecipe.__version__
    zrecipe.__version__ = "0.0.golden"
    try:
        path = save_adapter(model, folder / "adapter.safetensors", {"base_model": "tiny", "step": 7})
        hashes = {"adapter": hashlib.sha256(path.read_bytes()).hexdigest()}
        source = read_lora(path)
        for name in GOLDEN:
            if "/" in name:
                fmt, dtype = name.split("/")
                out = write_lora(source, folder / f"{fmt}_{dtype}.safetensors", fmt, dtype)
                hashes[name] = hashlib.sha256(out.read_bytes()).hexdigest()
    finally:
        zrecipe.__version__ = version
    return hashes


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_file_bytes_are_pinned(adapter, name):
    assert adapter[name] == GOLDEN[name]


# DoRA, LoKr and LoHa adapters (one kind each, on q, out and w2) in the formats that hold them; kohya
# (ComfyUI's fused qkv names) holds a LoHa as its exact rank-r² LoRA, and no DoRA or LoKr on q.
KIND_GOLDEN = {
    "dora/adapter": "00f38ff5ad8e023c04314ca096716b22511070fa7c07c0460622f72dbfe3933d",
    "dora/comfyui": "599cbfae98225d7dbee5f9b60e68aee5bdf8f7745cde2669f23cf7f054743730",
    "dora/diffusers": "5502df882c5c2e71f8ca93fb2e7eb58363836b387866f77b127f9fc615e96676",
    "dora/musubi": "6dee1e4b9f565b4b08ed859b1c6b905c1a1243edc8700189e3beeb43771b92af",
    "loha/adapter": "dafd4d3cd6b3cc3ea3c2608f701fbc3f50a02795768dbc5d7e2b2c87ced7e05f",
    "loha/comfyui": "552680fc682a3d60dcb0e9245a51c3ff5f47fdf9f087c379701d54ce685d132c",
    "loha/diffusers": "ae0f895626ade6772f6cc2f2350f567aeebd6d4ae9c2708788e7fd1fe839064d",
    "loha/kohya": "973713b9ab4e886b41bb1283f5ef52c40fc35d7fefb51aa6580fb92058a28397",
    "loha/musubi": "4fe96589c2cca63c2b0f63639caed310ed00e2c4f21e20d6f670981586f86765",
    "lokr/adapter": "d5784bd44ca320d03552a912c760b9167cb49d822f151f4b255fed2930120e15",
    "lokr/comfyui": "6ce661a0149dc2e2bdd78550c7b4d5c649cc7648345dac972cf6adbd31086edb",
    "lokr/diffusers": "d61c1c8458fb947d86aeeea6d6ddd3ccef237cfcae69e5cc8df763e94d01fd5a",
    "lokr/musubi": "78da7d4638448719730df893bbe2dcf5040abe1164d9a7075459c2563a950d12",
}
KIND_FORMATS = {"dora": ("comfyui", "diffusers", "musubi"), "lokr": ("comfyui", "diffusers", "musubi"),
                "loha": ("comfyui", "diffusers", "musubi", "kohya")}  # fmt: skip


@pytest.fixture(scope="module")
def kind_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("golden_kinds")
    hashes = {}
    version = zrecipe.__version__
    zrecipe.__version__ = "0.0.golden"
    try:
        for kind, formats in KIND_FORMATS.items():
            mx.random.seed(12)  # the base weights (DoRA's magnitudes start from their norms)
            model = _Model()
            options = {"factor": 2} if kind == "lokr" else {}
            target = SimpleNamespace(block_type="layers", start=0, end=2, rank=2, alpha=3.0, kind=kind,
                                     layer_types=("attention.to_q", "attention.to_out.0", "feed_forward.w2"),
                                     **options)  # fmt: skip
            apply_lora(model, [target])
            rng = np.random.default_rng(6)
            for _, layer in sorted(lora_modules(model).items()):
                for name in layer.TRAINABLE:
                    noise = mx.array(rng.standard_normal(layer[name].shape).astype(np.float32))
                    layer[name] = layer[name] * (1 + 0.1 * noise) if name == "magnitude" else 0.1 * noise
            path = save_adapter(model, folder / f"{kind}.safetensors", {"base_model": "tiny", "step": 7})
            hashes[f"{kind}/adapter"] = hashlib.sha256(path.read_bytes()).hexdigest()
            for fmt in formats:
                out = write_lora(read_lora(path), folder / f"{kind}_{fmt}.safetensors", fmt, "float32")
                hashes[f"{kind}/{fmt}"] = hashlib.sha256(out.read_bytes()).hexdigest()
    finally:
        zrecipe.__version__ = version
    return hashes


def test_kind_file_bytes_are_pinned(kind_files):
    assert kind_files == KIND_GOLDEN
