"""An adapter kind plugs in as one delta class: read, applied and written without touching those paths.

The kind used here is a made-up full-weight difference stored as `<name>.test_full` (zrecipe's real one,
`.diff`, is `zrecipe.lora.variants.DiffDelta`): not low-rank, so application adds it into the weights,
stacked with ordinary LoRAs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.export.apply import MultiLoRALinear, apply_loras
from zrecipe.export.lora_formats import read_lora, write_lora
from zrecipe.lora import delta as delta_module
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer

PATH = "layers.0.feed_forward.w1"


@dataclass(frozen=True)
class FullDelta:
    W: mx.array  # (out, in)
    strength: float = 1.0

    KIND: ClassVar[str] = "full"
    PART_PATTERNS: ClassVar = ((re.compile(r"\.test_full$"), "diff"),)

    @property
    def in_dims(self) -> int:
        return int(self.W.shape[1])

    @property
    def out_dims(self) -> int:
        return int(self.W.shape[0])

    @property
    def rank(self) -> int:
        return min(self.W.shape)

    @property
    def file_alpha(self) -> float:
        return float(self.rank)

    def weight_delta(self, base_weight=None) -> mx.array:
        return self.strength * self.W.astype(mx.float32)

    def low_rank(self):
        return None

    def scaled(self, strength: float) -> FullDelta:
        return FullDelta(self.W, self.strength * strength)

    def file_parts(self, style) -> dict:
        return {".test_full": self.weight_delta()}

    @classmethod
    def from_file_parts(cls, parts, scale_for):
        return cls(parts["diff"])

    def split_outputs(self, count):
        return list(map(FullDelta, mx.split(self.W, count, axis=0)))


@pytest.fixture
def full_kind(monkeypatch):
    monkeypatch.setitem(delta_module.DELTA_KINDS, "full", FullDelta)


def test_a_new_kind_is_read_applied_and_written(full_kind, tmp_path):
    tiny = create_tiny_model(tmp_path / "tiny", seed=2)
    rng = np.random.default_rng(4)
    diff = mx.array(rng.standard_normal((170, 64)).astype(np.float32) * 0.01)
    a, b = (mx.array(rng.standard_normal(s).astype(np.float32) * 0.1) for s in ((2, 64), (170, 2)))
    mx.save_safetensors(str(tmp_path / "full.safetensors"), {f"diffusion_model.{PATH}.test_full": diff})
    mx.save_safetensors(
        str(tmp_path / "lora.safetensors"),
        {f"diffusion_model.{PATH}.lora_A.weight": a, f"diffusion_model.{PATH}.lora_B.weight": b},
    )
    full = read_lora(tmp_path / "full.safetensors")
    assert isinstance(full.deltas[PATH], FullDelta)

    model = load_transformer(tiny, dtype="float32")
    base = np.array(dict(model.named_modules())[PATH].weight)
    apply_loras(model, [tmp_path / "full.safetensors", tmp_path / "lora.safetensors"], [0.5, 2.0])
    layer = dict(model.named_modules())[PATH]
    assert isinstance(layer, MultiLoRALinear)  # the LoRA stays unfused, the full delta went into the base
    np.testing.assert_allclose(np.array(layer.base.weight), base + 0.5 * np.array(diff), rtol=1e-6, atol=1e-7)
    x = mx.array(rng.standard_normal((3, 64)).astype(np.float32))
    want = np.array(x) @ (base + 0.5 * np.array(diff) + 2.0 * np.array(b) @ np.array(a)).T
    np.testing.assert_allclose(np.array(layer(x)), want, rtol=1e-5, atol=1e-5)

    out = write_lora(full, tmp_path / "out.safetensors", "comfyui", "float32")
    assert set(mx.load(str(out))) == {f"diffusion_model.{PATH}.test_full"}
    np.testing.assert_array_equal(np.array(read_lora(out).deltas[PATH].W), np.array(diff))
