"""Sampler schedule, CFG arithmetic and the Euler loop (against diffusers' scheduler where installed)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.errors import ModelError
from zrecipe.models.z_image.sampler import (
    SchedulerConfig,
    denoise,
    guided_prediction,
    model_times,
    read_scheduler_config,
    schedule,
    sigmas,
)


def test_sigmas_shape_ends_and_shift_formula():
    s = sigmas(4, 3.0)
    assert s.dtype == np.float32 and s.shape == (5,)
    assert s[0] == 1.0 and s[-1] == 0.0
    base = np.array([1.0, 0.75, 0.5, 0.25])
    np.testing.assert_allclose(s[:-1], 3 * base / (1 + 2 * base), rtol=1e-6)
    assert np.all(np.diff(s) < 0)
    np.testing.assert_allclose(sigmas(3, 1.0)[:-1], [1.0, 2 / 3, 1 / 3], rtol=1e-7)


@pytest.mark.parametrize(
    "config, steps, hw",
    [
        ({"shift": 3.0}, 8, (64, 64)),
        ({"shift": 6.0}, 50, (128, 128)),
        ({"use_dynamic_shifting": True, "shift": 1.0}, 10, (32, 48)),
        ({"use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.7}, 7, (128, 64)),
        ({"shift": 2.0, "shift_terminal": 0.1}, 6, (16, 16)),
    ],
)
def test_schedule_matches_diffusers_scheduler_and_pipeline(config, steps, hw):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

    sched = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    cfg = SchedulerConfig.from_dict(dict(sched.config))
    seq = (hw[0] // 2) * (hw[1] // 2)
    mu = calculate_shift(
        seq,
        sched.config.base_image_seq_len,
        sched.config.max_image_seq_len,
        sched.config.base_shift,
        sched.config.max_shift,
    )
    sched.set_timesteps(steps, sigmas=get_default_z_image_sigmas(steps), mu=mu)
    ours = schedule(steps, cfg, hw)
    np.testing.assert_array_equal(ours, sched.sigmas.numpy())
    ref_times = ((1000 - sched.timesteps) / 1000).numpy()
    np.testing.assert_array_equal(model_times(ours), ref_times)
    assert torch.is_tensor(sched.timesteps)


def test_read_scheduler_config(tmp_path):
    (tmp_path / "scheduler").mkdir()
    path = tmp_path / "scheduler" / "scheduler_config.json"
    path.write_text(
        json.dumps(
            {
                "_class_name": "FlowMatchEulerDiscreteScheduler",
                "shift": 6.0,
                "use_dynamic_shifting": False,
                "num_train_timesteps": 1000,
            }
        )
    )
    assert read_scheduler_config(tmp_path).shift == 6.0
    path.write_text(json.dumps({"use_karras_sigmas": True}))
    with pytest.raises(ModelError, match="use_karras_sigmas"):
        read_scheduler_config(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        read_scheduler_config(tmp_path / "nope")


def test_guided_prediction_and_norm_clip():
    pos = mx.array(np.full((2, 1, 2, 2), 1.0, np.float32))
    neg = mx.array(np.zeros((2, 1, 2, 2), np.float32))
    pred = guided_prediction(pos, neg, 2.0, 0.0)
    np.testing.assert_allclose(np.array(pred), 3.0)
    clipped = np.array(guided_prediction(pos, neg, 2.0, 1.0))
    np.testing.assert_allclose(np.linalg.norm(clipped[0]), np.linalg.norm(np.array(pos[0])), rtol=1e-6)
    # Below the limit nothing changes.
    np.testing.assert_allclose(np.array(guided_prediction(pos, neg, 2.0, 5.0)), 3.0)


class _Linear:
    """A stand-in transformer: out = a·x + c_i·t per item (c_i from the caption), recording its calls."""

    def __init__(self):
        self.calls = []

    def parameters(self):
        return {"w": mx.zeros((1,))}

    def __call__(self, x, t, caps):
        self.calls.append((x.shape[0], np.array(t).tolist()))
        c = mx.array([float(np.array(cap).sum()) for cap in caps]).reshape(-1, 1, 1, 1)
        return 0.5 * x + c * t.reshape(-1, 1, 1, 1)


def _reference_loop(x, pos_c, neg_c, g, steps, shift, trunc):
    sig = sigmas(steps, shift)
    times = model_times(sig)
    for i in range(steps):
        gi = 0.0 if (g > 0 and trunc <= 1 and times[i] > trunc) else g
        pos = 0.5 * x + pos_c * times[i]
        out = pos + gi * (pos - (0.5 * x + neg_c * times[i])) if gi > 0 else pos
        x = x + (sig[i + 1] - sig[i]) * (-out)
    return x


@pytest.mark.parametrize("g, trunc", [(0.0, 1.0), (3.0, 1.0), (3.0, 0.5)])
def test_denoise_euler_cfg_and_truncation(g, trunc, monkeypatch):
    monkeypatch.setenv("ZRECIPE_CPU_LANES", "1")  # one batched call per step (the GPU path)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((1, 2, 4, 4)).astype(np.float32)
    model = _Linear()
    pos, neg = [mx.ones((3, 2))], [mx.zeros((2, 2))]
    out = denoise(model, mx.array(x0), pos, neg, g, 5, 2.0, cfg_truncation=trunc)
    ref = _reference_loop(x0.astype(np.float64), 6.0, 0.0, g, 5, 2.0, trunc)
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=1e-5)
    batched = [n for n, _ in model.calls]
    if g == 0:
        assert batched == [1] * 5
    elif trunc == 1.0:
        assert batched == [2] * 5  # pos and neg in ONE call each step
    else:
        assert 1 in batched and 2 in batched  # guidance dropped once 1 − σ passes the threshold


def test_denoise_on_two_cpu_lanes_splits_each_call_and_gives_the_same_latents(monkeypatch):
    rng = np.random.default_rng(1)
    x0 = mx.array(rng.standard_normal((2, 2, 4, 4)).astype(np.float32))
    pos, neg = [mx.ones((3, 2)), mx.ones((5, 2))], [mx.zeros((2, 2)), mx.zeros((4, 2))]
    results, calls = {}, {}
    for lanes in ("1", "2"):
        monkeypatch.setenv("ZRECIPE_CPU_LANES", lanes)
        model = _Linear()
        results[lanes] = np.array(denoise(model, x0, pos, neg, 3.0, 4, 2.0))
        calls[lanes] = [n for n, _ in model.calls]
    assert calls["1"] == [4] * 4  # pos and neg of both items in one call per step
    assert calls["2"] == [2] * 8  # two half-batches per step, one per CPU stream
    np.testing.assert_allclose(results["2"], results["1"], rtol=1e-6, atol=1e-6)


def test_denoise_requires_negatives_for_cfg():
    with pytest.raises(ValueError, match="negative"):
        denoise(_Linear(), mx.zeros((1, 2, 2, 2)), [mx.ones((1, 2))], None, 2.0, 2, 1.0)
