"""The memory estimate: exact parameter counts, and within ±25% of MLX's measured peak on small configs."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from zrecipe.models.z_image.training import FlowMatchingObjective
from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer
from zrecipe.recipe import LoraTarget
from zrecipe.training import memory
from zrecipe.training.data import Example
from zrecipe.training.loop import train
from zrecipe.training.lora import apply_lora, trainable_parameter_count
from zrecipe.training.memory import MemoryOptimizer, estimate_memory, lora_parameter_count, parameter_count
from zrecipe.training.settings import TrainSettings

ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


def small_config(dim: int, heads: int, layers: int) -> TransformerConfig:
    third = (dim // heads) // 3 // 2 * 2
    return TransformerConfig(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=layers,
        n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
        rope_theta=256.0, t_scale=1000.0, axes_dims=(dim // heads - 2 * third, third, third),
        axes_lens=(512, 256, 256),
    )  # fmt: skip


@pytest.mark.parametrize("config", [small_config(96, 4, 2), TransformerConfig(**memory.Z_IMAGE_CONFIG)])
def test_parameter_count_is_exact(config):
    model = ZImageTransformer(config)  # lazy: nothing is materialised, even at the real size
    assert sum(parameter_count(config)) == sum(v.size for _, v in tree_flatten(model.parameters()))
    targets = [
        LoraTarget("layers", 1, None, ATTN, 8, 8.0),
        LoraTarget("noise_refiner", 0, 1, ("feed_forward.w2",), 4, 4.0),
    ]
    apply_lora(model, targets)
    assert lora_parameter_count(config, targets) == trainable_parameter_count(model)


def test_real_size_lora_count_matches_the_seed_default():
    # 30 layers × 4 attention projections × rank 32 × (3840 + 3840)
    assert estimate_memory(None, "lora", 1).trainable_parameters == 30 * 4 * 32 * 7680


@pytest.mark.parametrize(
    "dim, heads, layers, side, batch, mode, checkpointing",
    [(64, 4, 2, 64, 1, "lora", False), (128, 4, 3, 32, 2, "full", False), (256, 8, 2, 32, 1, "lora", True)],
)
def test_estimate_within_25_percent_of_measured_peak(
    tmp_path, dim, heads, layers, side, batch, mode, checkpointing
):
    assert mx.get_peak_memory() >= 0  # available on every backend, the CPU one included
    config = small_config(dim, heads, layers)
    model = ZImageTransformer(config)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    examples = [
        Example(
            rng.standard_normal((16, side, side)).astype(np.float32),
            rng.standard_normal((32, 32)).astype(np.float32),
            (side, side),
        )
        for _ in range(batch)
    ]
    target = LoraTarget("layers", 0, None, ATTN, 8, 8.0)
    settings = TrainSettings(
        mode=mode, batch_size=batch, max_steps=2, lora_targets=(target,), gradient_checkpointing=checkpointing,
        checkpoint_frequency=100,
    )  # fmt: skip
    mx.clear_cache()
    objective = FlowMatchingObjective.from_settings(settings, np.zeros((4, 32), np.float32))
    result = train(model, examples, objective, settings, tmp_path, callbacks=[])
    estimate = estimate_memory(
        config, mode, batch, width=side * 8, height=side * 8, caption_tokens=32, dtype="float32",
        lora_targets=[target], gradient_checkpointing=checkpointing,
    )  # fmt: skip
    measured_gb = result.peak_memory_bytes / 2**30
    assert 0.75 <= estimate.total_gb / measured_gb <= 1.25, (estimate.total_gb, measured_gb)


def test_optimizer_api_and_batch_resolution(monkeypatch, capsys):
    batch, estimate = MemoryOptimizer.calculate_optimal_batch_size(
        mode="lora", available_memory_gb=512, quantize=None
    )
    assert batch >= 1 and estimate.batch_size == batch and estimate.total_gb <= 512 * MemoryOptimizer.HEADROOM
    more = estimate_memory(None, "lora", batch + 1)
    assert more.total_gb > 512 * MemoryOptimizer.HEADROOM  # the next batch would not fit
    q_batch, q_est = MemoryOptimizer.calculate_optimal_batch_size(
        mode="lora", available_memory_gb=512, quantize=4
    )
    assert q_est.weights_gb < estimate.weights_gb / 3 and q_batch >= batch
    assert MemoryOptimizer.calculate_optimal_batch_size(mode="full", available_memory_gb=16)[0] == 0
    text = MemoryOptimizer.print_recommendations(mode="lora", available_memory_gb=512)
    assert "Recommended batch size" in capsys.readouterr().out and text

    one = estimate_memory(None, "lora", 1).total_gb
    monkeypatch.setattr(memory, "system_memory_gb", lambda: (one * 2.5) / MemoryOptimizer.HEADROOM)
    micro, accum, note = memory.resolve_batch_size(8, 2, None, "lora")
    assert micro * (accum // 2) == 8 and micro < 8 and "same effective batch" in note
    micro, accum, note = memory.resolve_batch_size("auto", 1, None, "lora")
    assert micro >= 1 and accum == 1 and "auto" in note
