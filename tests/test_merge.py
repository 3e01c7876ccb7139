"""`zrecipe merge`: weighted LoRAs → one LoRA (exact at full rank; at lower rank numpy's truncated SVD and
its energy figure), and LoRAs fused into the base (diffusers folder or one original-naming file)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.cli.main import app, run_app
from zrecipe.export.apply import apply_loras
from zrecipe.export.full_export import original_naming
from zrecipe.export.lora_formats import read_lora
from zrecipe.export.merge import merge_loras
from zrecipe.lora.delta import dense_weight
from zrecipe.models.z_image.tiny import create_tiny_model
from zrecipe.models.z_image.transformer import export_weights, load_transformer
from zrecipe.recipe import LoraTarget
from zrecipe.training.lora import apply_lora, lora_modules, save_adapter

ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return create_tiny_model(tmp_path_factory.mktemp("merge") / "tiny", seed=3)


def _adapter(tiny, path, targets, seed):
    model = load_transformer(tiny, dtype="float32")
    apply_lora(model, targets)
    rng = np.random.default_rng(seed)
    for layer in lora_modules(model).values():
        for name in layer.TRAINABLE:
            noise = mx.array(rng.standard_normal(layer[name].shape).astype(np.float32))
            layer[name] = layer[name] * (1 + 0.1 * noise) if name == "magnitude" else 0.2 * noise
    return save_adapter(model, path)


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_inputs")
    a = _adapter(tiny, root / "a.safetensors", [LoraTarget("layers", 0, None, ATTN, rank=3, alpha=6.0)], 1)
    b = _adapter(tiny, root / "b.safetensors", [LoraTarget("layers", 0, 1, ("attention.to_q", "feed_forward.w1"),
                                                           rank=2, alpha=1.0)], 2)  # fmt: skip
    lokr = _adapter(tiny, root / "lokr.safetensors",
                    [LoraTarget("layers", 0, 1, ("attention.to_q",), rank=2, alpha=2.0, kind="lokr", factor=4)], 3)  # fmt: skip
    return a, b, lokr


def _weighted(loras, weights, base):
    out = {}
    for lora, w in zip(loras, weights, strict=True):
        for path, d in lora.deltas.items():
            out[path] = out.get(path, 0) + w * np.array(d.weight_delta(base.get(path)), np.float64)
    return out


def _base(tiny):
    model = load_transformer(tiny, dtype="float32")
    return {
        p: dense_weight(m) for p, m in model.named_modules() if hasattr(m, "weight") and m.weight.ndim == 2
    }


def test_full_rank_merge_is_the_weighted_sum(tiny, files):
    loras = [read_lora(files[0]), read_lora(files[1])]
    result = merge_loras(loras, [1.0, 0.5])
    want = _weighted(loras, [1.0, 0.5], {})
    assert set(result.deltas) == set(want)
    for path, delta in result.deltas.items():
        assert delta.rank == sum(lora.deltas[path].rank for lora in loras if path in lora.deltas)
        np.testing.assert_allclose(np.array(delta.weight_delta()), want[path], rtol=0, atol=1e-5)
    assert abs(result.kept_energy - 1.0) < 1e-9


@pytest.mark.parametrize("with_lokr", [False, True])
def test_lower_rank_keeps_numpys_svd_energy(tiny, files, with_lokr):
    loras = [read_lora(f) for f in (files if with_lokr else files[:2])]
    weights = [0.7, -1.3, 2.0][: len(loras)]
    rank = 2
    result = merge_loras(loras, weights, rank)
    want = _weighted(loras, weights, {})
    kept = total = 0.0
    for layer in result.layers:
        u, s, vt = np.linalg.svd(want[layer.path], full_matrices=False)
        assert layer.rank == rank
        np.testing.assert_allclose(layer.fraction, (s[:rank] ** 2).sum() / (s**2).sum(), rtol=1e-6)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]  # Eckart–Young: the best rank-2 ΔW
        np.testing.assert_allclose(
            np.array(result.deltas[layer.path].weight_delta()), best, rtol=0, atol=1e-5
        )
        kept, total = kept + (s[:rank] ** 2).sum(), total + (s**2).sum()
    assert result.kept_energy == pytest.approx(kept / total, rel=1e-6) and result.kept_energy < 1.0


def test_dora_input_needs_the_base_and_merges_with_it(tiny, tmp_path):
    dora = read_lora(_adapter(tiny, tmp_path / "d.safetensors",
                              [LoraTarget("layers", 0, 1, ("attention.to_v",), rank=2, alpha=2.0, kind="dora")], 4))  # fmt: skip
    assert (
        run_app(app, ["merge", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "m.safetensors")]) == 2
    )
    base = _base(tiny)
    result = merge_loras([dora], [1.0], None, base)
    want = _weighted([dora], [1.0], base)
    for path, delta in result.deltas.items():
        np.testing.assert_allclose(np.array(delta.weight_delta()), want[path], rtol=0, atol=1e-5)


def test_cli_merge_writes_a_lora_and_reports_energy(tiny, files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    argv = ["merge", str(files[0]), str(files[1]), "--weights", "1", "0.5", "--rank", "2", "-o", str(out)]
    assert run_app(app, argv) == 0
    text = capsys.readouterr().out
    assert "energy kept overall" in text and "layers.0.attention.to_q" in text
    merged = read_lora(out)
    expected = merge_loras([read_lora(files[0]), read_lora(files[1])], [1.0, 0.5], 2)
    assert set(merged.deltas) == set(expected.deltas)
    assert f"{expected.kept_energy:.6f}" in text
    assert run_app(app, ["merge", str(files[0]), "--into-base", "-o", str(tmp_path / "m")]) == 2  # no --model


def test_into_base_equals_base_plus_unfused_lora(tiny, files, tmp_path):
    folder = tmp_path / "fused"
    argv = ["merge", str(files[0]), str(files[2]), "--weights", "0.8,1.5", "--into-base", "--model", str(tiny),
            "-o", str(folder), "--dtype", "float32"]  # fmt: skip
    assert run_app(app, argv) == 0
    fused = load_transformer(folder, dtype="float32")
    unfused = load_transformer(tiny, dtype="float32")
    apply_loras(unfused, [files[0], files[2]], [0.8, 1.5])
    rng = np.random.default_rng(0)
    x = mx.array(rng.standard_normal((1, 16, 8, 8)).astype(np.float32))
    caps = [mx.array(rng.standard_normal((5, fused.config.cap_feat_dim)).astype(np.float32))]
    t = mx.array([0.4])
    assert np.abs(np.array(fused(x, t, caps)) - np.array(unfused(x, t, caps))).max() <= 1e-5

    single = tmp_path / "z_image_fused.safetensors"
    argv[-3:-2] = [str(single)]
    assert run_app(app, argv) == 0
    original = mx.load(str(single))
    assert any(".attention.qkv." in k for k in original) and "x_embedder.weight" in original
    renamed = fused.sanitize(original)  # the original naming reads back into the same weights
    weights = export_weights(fused)
    assert sorted(renamed) == sorted(weights)
    assert all(mx.array_equal(renamed[k], weights[k]) for k in weights)
    assert original_naming(weights, fused.config).keys() == original.keys()
