"""The optimiser factory against PyTorch: AdamW and the learning-rate schedules step for step (zrecipe's
constant / cosine against torch's LR schedulers, the transformers-style ones against transformers' and
diffusers' `get_scheduler`), and the optimiser state through a checkpoint zip. The other optimisers:
test_optimizers.py."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from zrecipe.errors import CheckpointError, RecipeError
from zrecipe.recipe import Optimizer
from zrecipe.training.checkpoint import read_checkpoint, write_checkpoint
from zrecipe.training.optim import check_rule, flatten_state, make_optimizer, restore_state, state_metadata

torch = pytest.importorskip("torch")

SHAPES = [(7, 5), (13,), (3, 4, 2)]
STEPS = 30


def trajectory_inputs(seed: int):
    """Initial parameters and 30 steps of gradients, magnitudes spread over 1e-4 .. 10."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = [
        [(rng.standard_normal(s) * 10 ** rng.uniform(-4, 1)).astype(np.float32) for s in SHAPES]
        for _ in range(STEPS)
    ]
    return params, grads


def zrecipe_trajectory(spec: Optimizer, params, grads):
    """(parameters after each step, learning rate each step used) with zrecipe's optimiser factory."""
    optimizer = make_optimizer(spec, STEPS)
    current = {f"p{i}": mx.array(p) for i, p in enumerate(params)}
    optimizer.init(current)
    out, rates = [], []
    for step_grads in grads:
        current = optimizer.apply_gradients({f"p{i}": mx.array(g) for i, g in enumerate(step_grads)}, current)
        mx.eval(current)
        out.append([np.array(current[f"p{i}"]) for i in range(len(SHAPES))])
        rates.append(float(optimizer.learning_rate.item()))
    return out, rates


def torch_trajectory(spec: Optimizer, params, grads, scheduler=None):
    tensors = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    optimizer = torch.optim.AdamW(
        tensors, lr=spec.learning_rate, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay
    )
    schedule = scheduler(optimizer) if scheduler else None
    out, rates = [], []
    for step_grads in grads:
        for t, g in zip(tensors, step_grads, strict=True):
            t.grad = torch.tensor(g)
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if schedule is not None:
            schedule.step()
        out.append([t.detach().numpy().copy() for t in tensors])
    return out, rates


def assert_same_trajectory(ours, theirs) -> float:
    worst = 0.0
    for step, (a_step, b_step) in enumerate(zip(ours, theirs, strict=True)):
        for a, b in zip(a_step, b_step, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=f"step {step + 1}")
            worst = max(worst, float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-3))))
    return worst


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adamw_follows_torch_step_for_step(seed):
    spec = Optimizer(learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=0.05, eps=1e-8)
    params, grads = trajectory_inputs(seed)
    ours, _ = zrecipe_trajectory(spec, params, grads)
    theirs, _ = torch_trajectory(spec, params, grads)
    assert_same_trajectory(ours, theirs)


def _warmup(optimizer, w: int):
    return torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1 / (w + 1), end_factor=1.0, total_iters=w
    )


SCHEDULES = {
    # zrecipe's warm-up lr·(s+1)/(W+1), then the body; PyTorch's LinearLR / CosineAnnealingLR / SequentialLR.
    "constant+warmup": (
        dict(warmup_steps=5),
        lambda opt: _warmup(opt, 5),
    ),
    "cosine": (
        dict(schedule="cosine", min_learning_rate=1e-5),
        lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=1e-5),
    ),
    "cosine+warmup": (
        dict(schedule="cosine", warmup_steps=4, min_learning_rate=1e-5),
        lambda opt: torch.optim.lr_scheduler.SequentialLR(
            opt,
            [_warmup(opt, 4), torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 4, eta_min=1e-5)],
            milestones=[4],
        ),
    ),
}


TRANSFORMERS_CASES = [
    ("constant_with_warmup", 0, 1), ("constant_with_warmup", 6, 1), ("linear", 0, 1), ("linear", 5, 1),
    ("cosine_with_restarts", 0, 1), ("cosine_with_restarts", 4, 3), ("cosine_with_restarts", 7, 4),
]  # fmt: skip


@pytest.mark.parametrize(("name", "warmup", "cycles"), TRANSFORMERS_CASES)
def test_transformers_schedules_follow_get_scheduler(name, warmup, cycles):
    """Step for step against transformers.get_scheduler and diffusers.optimization.get_scheduler (the
    learning rate each optimiser step uses, and the AdamW weights it gives)."""
    import diffusers.optimization
    import transformers

    options = dict(schedule=name, warmup_steps=warmup, **({"num_cycles": cycles} if cycles > 1 else {}))
    spec = Optimizer(learning_rate=2e-3, weight_decay=0.01, **options)
    params, grads = trajectory_inputs(11)
    ours, our_rates = zrecipe_trajectory(spec, params, grads)

    def hf(opt):
        return transformers.get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=STEPS,
                                          scheduler_specific_kwargs={"num_cycles": cycles} if cycles > 1 else None)  # fmt: skip

    def diffusers_schedule(opt):
        return diffusers.optimization.get_scheduler(
            name, opt, num_warmup_steps=warmup, num_training_steps=STEPS, num_cycles=cycles
        )

    for scheduler in (hf, diffusers_schedule):
        theirs, their_rates = torch_trajectory(spec, params, grads, scheduler)
        np.testing.assert_allclose(our_rates, their_rates, rtol=1e-6, atol=1e-12)  # measured ≤ 2.9e-7
        assert assert_same_trajectory(ours, theirs) < 1e-6
    if warmup:
        assert our_rates[0] == 0.0  # transformers' warm-up starts at 0 (zrecipe's constant at lr/(W+1))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedules_follow_torch_lr_schedulers(name):
    options, scheduler = SCHEDULES[name]
    spec = Optimizer(learning_rate=2e-3, weight_decay=0.01, **options)
    params, grads = trajectory_inputs(7)
    ours, our_rates = zrecipe_trajectory(spec, params, grads)
    theirs, their_rates = torch_trajectory(spec, params, grads, scheduler)
    np.testing.assert_allclose(our_rates, their_rates, rtol=1e-6, atol=0)
    assert assert_same_trajectory(ours, theirs) < 1e-6


def test_adamw_keeps_the_parameter_dtype():
    optimizer = make_optimizer(Optimizer(), 10)
    params = {"w": mx.ones((4, 3), dtype=mx.bfloat16)}
    optimizer.init(params)
    params = optimizer.apply_gradients({"w": mx.full((4, 3), 0.5, dtype=mx.bfloat16)}, params)
    assert params["w"].dtype == mx.bfloat16 and optimizer.state["w"]["m"].dtype == mx.bfloat16


def test_state_round_trips_through_a_checkpoint_bit_exactly(tmp_path):
    spec = Optimizer(learning_rate=1e-3, schedule="cosine", warmup_steps=2)
    params, grads = trajectory_inputs(3)
    live = make_optimizer(spec, STEPS)
    current = {f"p{i}": mx.array(p) for i, p in enumerate(params)}
    live.init(current)
    for step_grads in grads[:5]:
        current = live.apply_gradients({f"p{i}": mx.array(g) for i, g in enumerate(step_grads)}, current)
    mx.eval(current, live.state)
    saved = flatten_state(live)
    zip_path = write_checkpoint(tmp_path, 5, ({"x": mx.zeros((1,))}, {}), saved, {}, [], {}, {},
                                optimizer_metadata=state_metadata(spec))  # fmt: skip
    checkpoint = read_checkpoint(zip_path)
    check_rule(checkpoint.optimizer_metadata, spec, "optimizer.safetensors")
    fresh = make_optimizer(spec, STEPS)
    fresh.init({k: mx.zeros_like(v) for k, v in current.items()})
    restore_state(fresh, checkpoint.optimizer, str(zip_path))
    restored = flatten_state(fresh)
    assert sorted(restored) == sorted(saved)
    for key, value in saved.items():
        assert (
            restored[key].dtype == value.dtype
            and np.array(restored[key]).tobytes() == np.array(value).tobytes()
        )
    # ... and the next steps are the same bytes.
    a, b = dict(current), dict(current)
    for step_grads in grads[5:8]:
        g = {f"p{i}": mx.array(x) for i, x in enumerate(step_grads)}
        a, b = live.apply_gradients(g, a), fresh.apply_gradients(g, b)
    mx.eval(a, b)
    assert all(np.array(a[k]).tobytes() == np.array(b[k]).tobytes() for k in a)


def test_state_of_another_update_rule_is_refused():
    spec = Optimizer()
    with pytest.raises(CheckpointError, match=r"ckpt.zip: optimizer.safetensors: .*older zrecipe.*bias"):
        check_rule({"format": "zrecipe-optimizer"}, spec, "ckpt.zip: optimizer.safetensors")
    with pytest.raises(CheckpointError, match="'lion-1'"):
        check_rule({"format": "zrecipe-optimizer", "rule": "lion-1"}, spec, "x")
    with pytest.raises(
        RecipeError, match="optimizer.name: 'Lamb' is not supported; use one of: adafactor, adamw"
    ):
        make_optimizer(Optimizer(name="Lamb"), 10)
