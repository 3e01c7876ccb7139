"""DoRA, LoKr and LoHa through the public `train(...)`: checkpoint zips hold each kind's parameters, and
N/2 steps + resume + N/2 steps == N straight steps bit-exactly, with LoRA dropout, caption dropout and
gradient accumulation on (the pattern of tests/test_training.py::test_resume_is_bit_exact)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_training import quiet_train

from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import load_transformer
from zrecipe.recipe import LoraTarget, Optimizer
from zrecipe.training.checkpoint import read_checkpoint
from zrecipe.training.data import Example
from zrecipe.training.loop import TrainSettings

ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FFN = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
# Each kind's parameter names in the checkpoint's adapter.safetensors (zrecipe layout).
PARTS = {
    "dora": (".lora_A.weight", ".lora_B.weight", ".dora_scale"),
    "lokr": (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b"),
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"),
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("kinds") / "tiny")


def _examples(cap_dim: int, n: int = 4, wide: int = 2) -> list[Example]:
    rng = np.random.default_rng(0)
    items = []
    for i in range(n + wide):
        h, w = (8, 8) if i < n else (8, 16)
        latents = np.kron(rng.standard_normal((16, h // 4, w // 4)), np.ones((1, 4, 4))).astype(np.float32)
        caption = rng.standard_normal((4 + i, cap_dim)).astype(np.float32)
        items.append(Example(latents, caption, (h, w), dataset="a", caption_dropout=0.5))
    return items


def _settings(kind: str, steps: int, **overrides) -> TrainSettings:
    # The kind on attention (LoKr with an explicit factor), plain LoRA beside it on the FFN: a mixed adapter.
    options = {"factor": 4} if kind == "lokr" else {}
    targets = (
        LoraTarget("layers", 0, None, ATTN, rank=2, alpha=4.0, kind=kind, dropout=0.25, **options),
        LoraTarget("layers", 0, None, FFN, rank=4, alpha=4.0, dropout=0.1),
    )
    base = {
        "mode": "lora", "seed": 5, "batch_size": 2, "max_steps": steps, "sigma_sampling": "uniform",
        "shift": 6.0, "lora_targets": targets, "optimizer": Optimizer(learning_rate=1e-2),
        "checkpoint_frequency": 1000,
    }  # fmt: skip
    base.update(overrides)
    return TrainSettings(**base)


def _identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key, value in a.items():
        assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
        assert np.array(value).tobytes() == np.array(b[key]).tobytes(), key


@pytest.mark.parametrize("kind", ["dora", "lokr", "loha"])
def test_resume_is_bit_exact_for_every_kind(tiny_path, tmp_path, kind):
    n = 4
    cfg = _settings(kind, n, gradient_accumulation_steps=2, checkpoint_frequency=n // 2)
    model = load_transformer(tiny_path, dtype="float32")
    examples = _examples(model.config.cap_feat_dim)
    empty = np.zeros((3, model.config.cap_feat_dim), np.float32)
    straight = quiet_train(model, examples, empty, cfg, tmp_path / "straight", "tiny")
    half = tmp_path / "straight" / "checkpoints" / f"{n // 2:07d}_checkpoint.zip"
    adapter = read_checkpoint(half).adapter
    for part in PARTS[kind]:  # the kind's own parameters are in the zip, and they trained
        assert f"layers.0.attention.to_q{part}" in adapter
    assert "layers.0.feed_forward.w1.lora_A.weight" in adapter

    resumed = quiet_train(
        load_transformer(tiny_path, dtype="float32"),
        examples,
        empty,
        cfg,
        tmp_path / "resumed",
        "tiny",
        resume_from=half,
    )
    assert resumed.step == n
    for member in ("adapter", "optimizer"):
        a, b = (getattr(read_checkpoint(r.checkpoint), member) for r in (straight, resumed))
        _identical(a, b)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    _identical(mx.load(str(straight.final_path)), mx.load(str(resumed.final_path)))
    start = read_checkpoint(half).adapter
    final = mx.load(str(straight.final_path))
    moved = [
        k for k in start if k.startswith("layers.0.attention.to_q") and not mx.array_equal(start[k], final[k])
    ]
    assert moved, "the kind's parameters did not train"


def test_dropout_masks_survive_gradient_checkpointing(tiny_path, tmp_path):
    """Recomputed blocks draw the same dropout masks: the same losses with and without checkpointing; and
    dropout changes the run (it is on)."""
    histories = {}
    for name, overrides in (("plain", {}), ("ckpt", {"gradient_checkpointing": True})):
        model = load_transformer(tiny_path, dtype="float32")
        examples = _examples(model.config.cap_feat_dim, wide=0)
        result = quiet_train(model, examples, np.zeros((2, model.config.cap_feat_dim), np.float32),
                             _settings("dora", 3, **overrides), tmp_path / name)  # fmt: skip
        histories[name] = [h["loss"] for h in result.history]
    assert np.allclose(histories["plain"], histories["ckpt"], rtol=1e-5)

    no_dropout = tuple(
        LoraTarget(**{**t.__dict__, "dropout": 0.0}) for t in _settings("dora", 3).lora_targets
    )
    model = load_transformer(tiny_path, dtype="float32")
    examples = _examples(model.config.cap_feat_dim, wide=0)
    result = quiet_train(model, examples, np.zeros((2, model.config.cap_feat_dim), np.float32),
                         _settings("dora", 3, lora_targets=no_dropout), tmp_path / "off")  # fmt: skip
    assert [h["loss"] for h in result.history][1:] != histories["plain"][1:]
