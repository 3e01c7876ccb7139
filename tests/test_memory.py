"""The memory estimate: exact parameter counts, within ±10% of MLX's measured peak on small configs, and
batch `auto` never choosing a batch that was measured not to fit."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from zrecipe.models.z_image.training import FlowMatchingObjective
from zrecipe.models.z_image.transformer import TransformerConfig, ZImageTransformer
from zrecipe.recipe import LoraTarget
from zrecipe.training import memory
from zrecipe.training.callbacks import TrainingCallback
from zrecipe.training.data import Example
from zrecipe.training.loop import train
from zrecipe.training.lora import apply_lora, trainable_parameter_count
from zrecipe.training.memory import MemoryOptimizer, estimate_memory, lora_parameter_count, parameter_count
from zrecipe.training.settings import TrainSettings

ATTN = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")


def small_config(dim: int, heads: int, layers: int, cap_feat_dim: int = 32) -> TransformerConfig:
    third = (dim // heads) // 3 // 2 * 2
    return TransformerConfig(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=dim, n_layers=layers,
        n_refiner_layers=1, n_heads=heads, n_kv_heads=heads, norm_eps=1e-5, qk_norm=True, cap_feat_dim=cap_feat_dim,
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


def measured_peak_gb(tmp_path, config, mode, side, batch, checkpointing, target) -> float:
    """MLX's peak over two training steps (the final file writes excluded) above what this process held
    before the model was built, GiB — what `estimate_memory(...).total_gb` estimates."""
    mx.clear_cache()
    held = mx.get_active_memory()
    model = ZImageTransformer(config)
    mx.eval(model.parameters())
    rng = np.random.default_rng(0)
    examples = [
        Example(
            rng.standard_normal((16, side, side)).astype(np.float32),
            rng.standard_normal((32, config.cap_feat_dim)).astype(np.float32),
            (side, side),
        )
        for _ in range(batch)
    ]
    settings = TrainSettings(
        mode=mode, batch_size=batch, max_steps=2, lora_targets=(target,), gradient_checkpointing=checkpointing,
        checkpoint_frequency=100, compute_dtype="float32",
    )  # fmt: skip
    peaks = []

    class Recorder(TrainingCallback):
        def on_step(self, state, report):
            peaks.append(mx.get_peak_memory())

    objective = FlowMatchingObjective.from_settings(settings, np.zeros((4, config.cap_feat_dim), np.float32))
    train(model, examples, objective, settings, tmp_path, callbacks=[Recorder()])
    return (max(peaks) - held) / 2**30


def estimate(config, mode, side, batch, checkpointing, target):
    return estimate_memory(
        config, mode, batch, width=side * 8, height=side * 8, caption_tokens=32, dtype="float32",
        lora_targets=[target], gradient_checkpointing=checkpointing,
    )  # fmt: skip


# The model of benchmarks/bench_memory.py (whose 24-case table in RESULTS.md is the full check): dim 256,
# 4 heads, 2 main layers; these cases take a few seconds each.
BENCH_MODEL = small_config(256, 4, 2, cap_feat_dim=64)
RANK16 = LoraTarget("layers", 0, None, ATTN, 16, 16.0)


@pytest.mark.parametrize(
    "mode, side, batch, checkpointing",
    [("lora", 32, 2, False), ("lora", 64, 1, True), ("full", 32, 1, False)],
)
def test_estimate_within_10_percent_of_measured_peak(tmp_path, mode, side, batch, checkpointing):
    measured = measured_peak_gb(tmp_path, BENCH_MODEL, mode, side, batch, checkpointing, RANK16)
    estimated = estimate(BENCH_MODEL, mode, side, batch, checkpointing, RANK16).total_gb
    assert 0.9 <= estimated / measured <= 1.1, (estimated, measured)


def test_auto_batch_never_exceeds_what_was_measured_to_fit(tmp_path, monkeypatch):
    # A budget between the measured peaks of batch 1 and 3: whatever `auto` picks must have measured
    # within it (the estimate may be cautious, never optimistic).
    config, side = small_config(128, 4, 2, cap_feat_dim=64), 32
    peaks = {
        b: measured_peak_gb(tmp_path / str(b), config, "lora", side, b, False, RANK16) for b in (1, 2, 3)
    }
    for budget in ((peaks[1] + peaks[2]) / 2, (peaks[2] + peaks[3]) / 2, peaks[3] * 1.02):
        # `fits` compares the process estimate (MLX's peak plus its cache and the interpreter) with
        # HEADROOM × the memory: size the memory so that a batch fits exactly when its MLX peak estimate is
        # within the budget.
        k = memory.CALIBRATIONS[memory.training_attention("float32")]
        available = (budget * (1 + k.cache) + k.process_mb * memory.MB / memory.GB) / MemoryOptimizer.HEADROOM
        monkeypatch.setattr(memory, "system_memory_gb", lambda m=available: m)
        batch, _, note = memory.resolve_batch_size(
            "auto", 1, config, "lora", width=side * 8, height=side * 8, caption_tokens=32, dtype="float32",
            lora_targets=[RANK16],
        )  # fmt: skip
        assert batch in peaks and peaks[batch] <= budget, (budget, batch, peaks, note)


def test_optimizer_api_and_batch_resolution(monkeypatch, capsys):
    batch, estimate = MemoryOptimizer.calculate_optimal_batch_size(
        mode="lora", available_memory_gb=512, quantize=None
    )
    assert (
        batch >= 1 and estimate.batch_size == batch and estimate.process_gb <= 512 * MemoryOptimizer.HEADROOM
    )
    more = estimate_memory(None, "lora", batch + 1)
    assert more.process_gb > 512 * MemoryOptimizer.HEADROOM  # the next batch would not fit
    q_batch, q_est = MemoryOptimizer.calculate_optimal_batch_size(
        mode="lora", available_memory_gb=512, quantize=4
    )
    assert q_est.weights_gb < estimate.weights_gb / 3 and q_batch >= batch
    assert MemoryOptimizer.calculate_optimal_batch_size(mode="full", available_memory_gb=16)[0] == 0
    text = MemoryOptimizer.print_recommendations(mode="lora", available_memory_gb=512)
    assert "Recommended batch size" in capsys.readouterr().out and text

    one = estimate_memory(None, "lora", 1).process_gb
    monkeypatch.setattr(memory, "system_memory_gb", lambda: (one * 2.5) / MemoryOptimizer.HEADROOM)
    micro, accum, note = memory.resolve_batch_size(8, 2, None, "lora")
    assert micro * (accum // 2) == 8 and micro < 8 and "same effective batch" in note
    micro, accum, note = memory.resolve_batch_size("auto", 1, None, "lora")
    assert micro >= 1 and accum == 1 and "auto" in note


@pytest.mark.parametrize("name", ["AdamW", "AdamW8bit", "Lion", "SGD", "Adafactor", "Prodigy"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_training_state_counts_the_optimizer_and_ema_from_their_own_tables(name, mode):
    from zrecipe.recipe import Optimizer
    from zrecipe.training.ema import SHADOW_BYTES_PER_PARAMETER
    from zrecipe.training.optim import optimizer_state_bytes

    config = small_config(96, 4, 2)
    spec = Optimizer(name=name)
    shapes = memory.adapter_shapes(config) if mode == "lora" else memory.full_parameter_shapes(config)
    param_bytes = memory.ADAPTER_BYTES if mode == "lora" else 2
    plain = estimate_memory(config, mode, 1, optimizer=spec)
    # The trainable tensors (their own copy for LoRA), their gradients, and the optimiser's state.
    copies = 2 if mode == "lora" else 1
    expected = plain.trainable_parameters * param_bytes * copies + optimizer_state_bytes(
        spec, shapes, param_bytes
    )
    assert plain.training_state_gb * memory.GB == pytest.approx(expected)
    with_ema = estimate_memory(config, mode, 1, optimizer=spec, ema=True)
    extra = (with_ema.training_state_gb - plain.training_state_gb) * memory.GB
    assert extra == pytest.approx(plain.trainable_parameters * SHADOW_BYTES_PER_PARAMETER)
    accumulated = estimate_memory(config, mode, 1, optimizer=spec, gradient_accumulation=4)
    extra = (accumulated.training_state_gb - plain.training_state_gb) * memory.GB
    assert extra == pytest.approx(plain.trainable_parameters * param_bytes)  # the accumulation buffer
    assert sum(math.prod(s) for s in shapes) == plain.trainable_parameters
