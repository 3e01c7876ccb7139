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
    "dora/adapter": "7069fd0ccebea19e2f5ee1f143506b38ba430a66e6509b43d0825ed0894f7f70",
    "dora/comfyui": "92afd6fbf0da3434194b386884ab62f7d7e34c180240f618cba4839013ff622f",
    "dora/diffusers": "27bc86c31204e5e18536ae4cd9fe08c8939a7a3bbb01468e83101005dedb74a5",
    "dora/musubi": "aeebbb036192c5ca4d3c85cc2e07c31560e0ef7a19d514f7c04514f327479dbf",
    "loha/adapter": "44eebc9d811ec781589a07a19c07cf6f9bcc644189b7143f5fc9b7d324092220",
    "loha/comfyui": "5b74f8874827afc6c0e65eca41b79b0f9dd889b8f07e82eae20e49b3eda6e697",
    "loha/diffusers": "ad4692a154931104b76ae4af9d6d070d36a3f6b802cf2611f2eba8d9a46348ec",
    "loha/kohya": "adc80296481679d5c8d494e7d3ac5195bde55979350f6cc0a19ea42202bacf18",
    "loha/musubi": "2941bf0e118974012e039fedd2f10b978236ab104b17377cd2a3372dea3edca6",
    "lokr/adapter": "140bde6ec935975dfdd7eebdfacc4df12e035192b34570af18234875bf0120e8",
    "lokr/comfyui": "a772906117203ef92635a039a4e5739aeb75670076def561a1c1792457d3e157",
    "lokr/diffusers": "f8e77611abff52c8cdd4e2e206039846be3ed2e9561501a32710b9b24ebd9866",
    "lokr/musubi": "01d8c1747799075954cb93a7b599bb1077bac94ed96bd3227dab542477245b33",
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
