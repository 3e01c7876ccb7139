"""Every optimiser against its PyTorch reference, step for step on the same gradients; their state through
a checkpoint zip (bit-exact), the rule check, and the state bytes the memory model counts.

References: torch.optim.SGD, lion_pytorch.Lion, transformers.optimization.Adafactor, prodigyopt.Prodigy,
bitsandbytes.optim.AdamW8bit (its CPU update with bitsandbytes' reference quantiser) and, for the 8-bit
moments' cost, torch.optim.AdamW in fp32.
"""

from __future__ import annotations

import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError
from zrecipe.recipe import Optimizer
from zrecipe.recipe.schema import OPTIMIZER_DEFAULTS
from zrecipe.training.checkpoint import read_checkpoint, write_checkpoint
from zrecipe.training.optim import (
    OPTIMIZERS,
    check_rule,
    flatten_state,
    make_optimizer,
    optimizer_kind,
    optimizer_state_bytes,
    restore_state,
    state_metadata,
)

torch = pytest.importorskip("torch")

# Matrices (factored by Adafactor; two of them large enough for 8-bit moments), a vector, a 3-d tensor
# and one that starts at zero (LoRA's B: Prodigy keeps no copy of it).
SHAPES = [(64, 96), (7, 5), (13,), (3, 4, 2), (80, 72)]
ZERO = 4  # index of the all-zero initial tensor
STEPS = 20


def spec(name: str, **options) -> Optimizer:
    """The recipe's optimizer block for `name` with its own defaults (as the recipe loader builds it)."""
    return Optimizer(**{"name": name, **OPTIMIZER_DEFAULTS[name], **options})


def trajectory_inputs(seed: int, steps: int = STEPS, drift: bool = False):
    """Initial parameters and `steps` steps of gradients, magnitudes spread over 1e-4 .. 10; with `drift`
    a fixed direction plus noise instead (a loss that keeps pointing one way: Prodigy's step size grows)."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    params[ZERO][:] = 0
    if drift:
        mean = [rng.standard_normal(s) for s in SHAPES]
        grads = [
            [(m + 0.5 * rng.standard_normal(m.shape)).astype(np.float32) for m in mean] for _ in range(steps)
        ]
        return params, grads
    grads = [
        [(rng.standard_normal(s) * 10 ** rng.uniform(-4, 1)).astype(np.float32) for s in SHAPES]
        for _ in range(steps)
    ]
    return params, grads


def ours(opt: Optimizer, params, grads, total: int = STEPS):
    """(parameters after each step, learning rate each step used) with zrecipe's optimiser factory."""
    optimizer = make_optimizer(opt, total)
    current = {f"p{i}": mx.array(p) for i, p in enumerate(params)}
    optimizer.init(current)
    out, rates = [], []
    for step_grads in grads:
        current = optimizer.apply_gradients({f"p{i}": mx.array(g) for i, g in enumerate(step_grads)}, current)
        mx.eval(current, optimizer.state)
        out.append([np.array(current[f"p{i}"]) for i in range(len(SHAPES))])
        lr = optimizer.learning_rate
        rates.append(float(lr.item() if hasattr(lr, "item") else lr))
    return out, rates


def theirs(build, params, grads, scheduler=None):
    """The same with a torch optimiser `build(tensors)` (and an optional LambdaLR-style `scheduler`)."""
    tensors = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    optimizer = build(tensors)
    schedule = scheduler(optimizer) if scheduler else None
    out = []
    for step_grads in grads:
        for t, g in zip(tensors, step_grads, strict=True):
            t.grad = torch.tensor(g)
        optimizer.step()
        if schedule is not None:
            schedule.step()
        out.append([t.detach().numpy().copy() for t in tensors])
    return out


def max_error(a_run, b_run, params) -> tuple[float, float]:
    """(max |a − b|, max |a − b| / (|b| + travel)) over every step and tensor, where `travel` is how far
    that tensor's reference moves from its start in the run (a relative error that does not blow up for
    entries near 0, nor hide the rounding of entries near 1 that barely move)."""
    absolute = relative = 0.0
    for i, start in enumerate(params):
        travel = max(float(np.abs(b_step[i] - start).max()) for b_step in b_run)
        for a_step, b_step in zip(a_run, b_run, strict=True):
            diff = np.abs(a_step[i].astype(np.float64) - b_step[i])
            absolute = max(absolute, float(diff.max()))
            relative = max(relative, float((diff / (np.abs(b_step[i]) + travel)).max()))
    return absolute, relative


# --- SGD, Lion, Adafactor, Prodigy ------------------------------------------------------------------------

REFERENCES = {
    "sgd": (
        spec("SGD", learning_rate=3e-3, momentum=0.9, weight_decay=0.01),
        lambda t: torch.optim.SGD(t, lr=3e-3, momentum=0.9, weight_decay=0.01),
    ),
    "sgd-nesterov": (
        spec("SGD", learning_rate=3e-3, momentum=0.8, nesterov=True),
        lambda t: torch.optim.SGD(t, lr=3e-3, momentum=0.8, nesterov=True),
    ),
    "sgd-plain": (spec("SGD", learning_rate=1e-2, momentum=0.0), lambda t: torch.optim.SGD(t, lr=1e-2)),
}


@pytest.mark.parametrize("case", sorted(REFERENCES))
def test_sgd_follows_torch_step_for_step(case):
    opt, build = REFERENCES[case]
    params, grads = trajectory_inputs(0)
    absolute, relative = max_error(ours(opt, params, grads)[0], theirs(build, params, grads), params)
    assert relative < 1e-6, (absolute, relative)  # measured ≤ 1.5e-7


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_lion_follows_lion_pytorch_step_for_step(weight_decay):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    opt = spec("Lion", learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay)
    params, grads = trajectory_inputs(1)
    reference = theirs(
        lambda t: lion_pytorch.Lion(t, lr=1e-3, betas=(0.9, 0.99), weight_decay=weight_decay), params, grads
    )
    absolute, relative = max_error(ours(opt, params, grads)[0], reference, params)
    assert absolute == 0.0, (absolute, relative)  # the same operations: identical bytes


ADAFACTOR = {
    # (our options, transformers' options): an explicit learning rate, its first moment, weight decay,
    # parameter scaling; and the relative step it computes itself (with and without warm-up).
    "lr": (dict(learning_rate=1e-2), dict(lr=1e-2, relative_step=False, scale_parameter=False)),
    "lr-beta1-decay-scale": (
        dict(learning_rate=1e-2, beta1=0.9, weight_decay=0.05, scale_parameter=True, clip_threshold=0.5),
        dict(
            lr=1e-2,
            beta1=0.9,
            weight_decay=0.05,
            relative_step=False,
            scale_parameter=True,
            clip_threshold=0.5,
        ),
    ),  # fmt: skip
    "relative": (
        dict(relative_step=True, scale_parameter=True),
        dict(lr=None, relative_step=True, scale_parameter=True),
    ),
    "relative-warmup": (
        dict(relative_step=True, warmup_init=True, decay_rate=-0.6),
        dict(lr=None, relative_step=True, warmup_init=True, scale_parameter=False, decay_rate=-0.6),
    ),
}


@pytest.mark.parametrize("case", sorted(ADAFACTOR))
def test_adafactor_follows_transformers_step_for_step(case):
    from transformers.optimization import Adafactor

    options, reference_options = ADAFACTOR[case]
    opt = spec("Adafactor", **options)
    params, grads = trajectory_inputs(2)
    mine, rates = ours(opt, params, grads)
    reference = theirs(lambda t: Adafactor(t, **reference_options), params, grads)
    absolute, relative = max_error(mine, reference, params)
    assert relative < 2e-6, (absolute, relative)  # measured ≤ 7.5e-7
    if opt.relative_step:  # the reported rate is the relative step the update used
        t = np.arange(1, STEPS + 1)
        expected = np.minimum(1e-6 * t if opt.warmup_init else 1e-2, 1 / np.sqrt(t))
        np.testing.assert_allclose(rates, expected, rtol=1e-6)


PRODIGY = {
    "defaults": (dict(), dict()),
    "decay-bias-safeguard": (
        dict(weight_decay=0.01, use_bias_correction=True, safeguard_warmup=True, d_coef=0.5),
        dict(weight_decay=0.01, use_bias_correction=True, safeguard_warmup=True, d_coef=0.5),
    ),
    "growth-beta3-no-momentum": (
        dict(growth_rate=1.02, beta3=0.95, betas=(0.0, 0.99), learning_rate=0.5),
        dict(growth_rate=1.02, beta3=0.95, betas=(0.0, 0.99), lr=0.5),
    ),
}


@pytest.mark.parametrize("drift", [False, True], ids=["noise", "drift"])
@pytest.mark.parametrize("case", sorted(PRODIGY))
def test_prodigy_follows_prodigyopt_for_20_steps(case, drift):
    """The issue's bound, ≤ 1e-5 over 20 steps, as a relative error (measured ≤ 6e-6; with drift the
    weights travel ~50, where float32 itself has steps of 4e-6: the absolute error there is 5e-5)."""
    prodigyopt = pytest.importorskip("prodigyopt")
    options, reference_options = PRODIGY[case]
    opt = spec("Prodigy", **options)
    params, grads = trajectory_inputs(3, drift=drift)
    mine, _ = ours(opt, params, grads)
    reference = theirs(lambda t: prodigyopt.Prodigy(t, **reference_options), params, grads)
    absolute, relative = max_error(mine, reference, params)
    assert relative <= 1e-5, (absolute, relative)


def test_prodigy_estimate_grows_and_a_zero_learning_rate_step_changes_nothing():
    prodigyopt = pytest.importorskip("prodigyopt")
    # transformers' constant_with_warmup starts at lr 0: prodigyopt then takes no step at all (no
    # estimate, no moments, no bias-correction count); so must we.
    opt = spec("Prodigy", schedule="constant_with_warmup", warmup_steps=3, use_bias_correction=True)
    params, grads = trajectory_inputs(4, steps=12, drift=True)
    mine, rates = ours(opt, params, grads, total=12)
    assert rates[0] == 0.0
    assert all(np.array_equal(a, b) for a, b in zip(mine[0], params, strict=True))

    def lam(s):  # the same warm-up as a LambdaLR
        return s / 3 if s < 3 else 1.0

    reference = theirs(
        lambda t: prodigyopt.Prodigy(t, use_bias_correction=True),
        params,
        grads,
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lam),
    )
    assert max_error(mine, reference, params)[1] <= 1e-5
    optimizer = make_optimizer(opt, 12)
    current = {f"p{i}": mx.array(p) for i, p in enumerate(params)}
    optimizer.init(current)
    for step_grads in grads:
        current = optimizer.apply_gradients({f"p{i}": mx.array(g) for i, g in enumerate(step_grads)}, current)
    assert optimizer.state["prodigy"]["d"].item() > 10 * opt.d0  # the step size was found, not given
    assert optimizer.state["prodigy"]["k"].item() == 11  # the lr-0 step took no update


# --- AdamW8bit --------------------------------------------------------------------------------------------


@pytest.fixture
def bnb_reference_quantiser():
    """bitsandbytes with its reference (pure PyTorch, nearest-code) quantiser on the CPU too.

    Its CPU build quantises with an approximate search that maps values below ~2e-5·absmax to a code
    2e-5 away (and overwrites code[0]), which its CUDA kernel and its reference backend do not; this
    fixture routes the CPU dispatch to the reference kernel for the duration of a test."""
    bnb = pytest.importorskip("bitsandbytes")
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    library = torch.library.Library("bitsandbytes", "IMPL")
    library.impl(
        "quantize_blockwise", lambda A, code, blocksize: op.redispatch(keys, A, code, blocksize), "CPU"
    )
    yield bnb
    library._destroy()


def test_8bit_codes_are_bitsandbytes_dynamic_map_and_quantiser(bnb_reference_quantiser):
    import bitsandbytes.functional as F

    from zrecipe.training.adamw8bit import dequantize_blockwise, dynamic_map, quantize_blockwise

    rng = np.random.default_rng(5)
    for signed in (True, False):
        code = F.create_dynamic_map(signed=signed)
        assert np.array_equal(dynamic_map(signed), code.numpy())
        for n in (256 * 40, 256 * 40 + 77):  # whole blocks, and a last partial block
            x = (rng.standard_normal(n) * 10 ** rng.uniform(-8, 1, n)).astype(np.float32)
            x = x if signed else x * x
            x[:256] = 0  # an all-zero block
            q_ref, quant_state = F.quantize_blockwise(torch.tensor(x), code=code, blocksize=256)
            absmax_ref = quant_state.absmax
            q, absmax = quantize_blockwise(mx.array(x), signed)
            assert q.dtype == mx.uint8 and q.shape == x.shape and absmax.shape == (math.ceil(n / 256),)
            assert np.array_equal(np.array(q), q_ref.numpy())
            assert np.array_equal(np.array(absmax), absmax_ref.numpy())
            back = dequantize_blockwise(q, absmax, signed)
            reference = F.dequantize_blockwise(q_ref, absmax=absmax_ref, code=code, blocksize=256)
            assert np.array_equal(np.array(back), reference.numpy())
            # the round trip is the nearest code (× the block's absmax), checked by brute force
            scale = np.repeat(np.array(absmax), 256)[:n, None]
            nearest = np.abs(code.numpy()[None, :] * scale - x[:, None]).min(axis=1)
            np.testing.assert_allclose(np.abs(np.array(back) - x), nearest, rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("drift", [False, True], ids=["noise", "drift"])
def test_adamw8bit_follows_bitsandbytes_step_for_step(bnb_reference_quantiser, drift):
    """The same codes, scales and weights as bitsandbytes' AdamW8bit, up to float32 rounding (measured
    relative error 1.4e-7), except where a moment lands within one rounding of a midpoint between two
    codes: bitsandbytes' CPU kernel updates the moments with a fused multiply-add, which rounds once
    where MLX rounds twice, so a code can differ by one for a step (measured with drift: one weight of
    15,000 off by 6e-4 relative, all others within 1e-6)."""
    opt = spec("AdamW8bit", learning_rate=1e-3, betas=(0.9, 0.99), weight_decay=0.05)
    params, grads = trajectory_inputs(6, drift=drift)
    mine, _ = ours(opt, params, grads)
    reference = theirs(
        lambda t: bnb_reference_quantiser.optim.AdamW8bit(t, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.05),
        params,
        grads,
    )
    absolute, relative = max_error(mine, reference, params)
    assert relative < (2e-3 if drift else 1e-6), (absolute, relative)
    off = sum(
        int((np.abs(a - b) > 1e-6 * (np.abs(b) + np.abs(b - p).max())).sum())
        for a, b, p in zip(mine[-1], reference[-1], params, strict=True)
    )
    assert off <= 3, off


@pytest.mark.parametrize("drift", [False, True], ids=["noise", "drift"])
def test_adamw8bit_stays_close_to_fp32_adamw(drift):
    """The cost of 8-bit moments over 20 steps, as a fraction of how far fp32 AdamW moved the weights:
    on average ≤ 3% (measured 1.2-2.3% over seeds), and with drifting gradients ≤ 8% for every weight
    (measured ≤ 6.1%). Not bounded per weight on the noise inputs: there, as in bitsandbytes, a second
    moment below ~1.6e-7 of its block's largest quantises to 0 and that weight steps by m/ε."""
    opt = spec("AdamW8bit", learning_rate=1e-3, weight_decay=0.01)
    params, grads = trajectory_inputs(7, drift=drift)
    mine, _ = ours(opt, params, grads)
    reference = theirs(lambda t: torch.optim.AdamW(t, lr=1e-3, weight_decay=0.01), params, grads)
    for i, shape in enumerate(SHAPES):
        moved = np.abs(reference[-1][i] - params[i])
        deviation = np.abs(mine[-1][i] - reference[-1][i])
        if math.prod(shape) < 4096:  # fp32 moments below min_8bit_size: only rounding
            assert deviation.max() <= 1e-5 * moved.max(), shape
            continue
        assert deviation.mean() <= 0.03 * moved.mean(), shape
        if drift:
            assert deviation.max() <= 0.08 * moved.max(), shape


def test_adamw8bit_keeps_uint8_moments_with_block_scales():
    opt = spec("AdamW8bit", min_8bit_size=4096)
    optimizer = make_optimizer(opt, 10)
    optimizer.init({"big": mx.zeros((64, 96)), "small": mx.zeros((7, 5))})
    big, small = optimizer.state["big"], optimizer.state["small"]
    assert {k: (v.dtype, v.shape) for k, v in big.items()} == {
        "m_q": (mx.uint8, (64, 96)), "m_absmax": (mx.float32, (24,)),
        "v_q": (mx.uint8, (64, 96)), "v_absmax": (mx.float32, (24,)),
    }  # fmt: skip
    assert {k: v.dtype for k, v in small.items()} == {"m": mx.float32, "v": mx.float32}


# --- every optimiser: state through a checkpoint, the rule, the memory model ------------------------------

ALL = {
    "AdamW": spec("AdamW", learning_rate=1e-3),
    "AdamW8bit": spec("AdamW8bit", learning_rate=1e-3),
    "Lion": spec("Lion", learning_rate=1e-4),
    "SGD": spec("SGD", learning_rate=1e-2),
    "Adafactor": spec("Adafactor", relative_step=True, beta1=0.9),
    "Prodigy": spec("Prodigy"),
}


def test_every_recipe_optimizer_has_an_entry():
    from zrecipe.recipe.schema import OPTIMIZERS as NAMES

    assert sorted(n.lower() for n in NAMES) == sorted(OPTIMIZERS) == sorted(n.lower() for n in ALL)
    assert len({kind.rule for kind in OPTIMIZERS.values()}) == len(OPTIMIZERS)


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_resumes_bit_exactly_through_a_checkpoint(tmp_path, name):
    """N/2 steps, checkpoint, a fresh optimiser restored from the zip, N/2 steps == N straight steps."""
    opt = replace(ALL[name], schedule="cosine", warmup_steps=2) if not ALL[name].relative_step else ALL[name]
    params, grads = trajectory_inputs(8, steps=10)
    straight, _ = ours(opt, params, grads, total=10)
    live = make_optimizer(opt, 10)
    current = {f"p{i}": mx.array(p) for i, p in enumerate(params)}
    live.init(current)
    for step_grads in grads[:5]:
        current = live.apply_gradients({f"p{i}": mx.array(g) for i, g in enumerate(step_grads)}, current)
    mx.eval(current, live.state)
    saved = flatten_state(live)
    zip_path = write_checkpoint(tmp_path, 5, ({"x": mx.zeros((1,))}, {}), saved, {}, [], {}, {},
                                optimizer_metadata=state_metadata(opt))  # fmt: skip
    checkpoint = read_checkpoint(zip_path)
    check_rule(checkpoint.optimizer_metadata, opt, "optimizer.safetensors")
    fresh = make_optimizer(opt, 10)
    fresh.init({f"p{i}": mx.array(p) for i, p in enumerate(params)})  # as train() does: fresh weights
    restore_state(fresh, checkpoint.optimizer, str(zip_path))
    restored = flatten_state(fresh)
    assert sorted(restored) == sorted(saved)
    for key, value in saved.items():
        assert restored[key].dtype == value.dtype
        assert np.array(restored[key]).tobytes() == np.array(value).tobytes(), key
    resumed = dict(current)
    for step_grads in grads[5:]:
        resumed = fresh.apply_gradients({f"p{i}": mx.array(g) for i, g in enumerate(step_grads)}, resumed)
    mx.eval(resumed)
    for i in range(len(SHAPES)):
        assert np.array(resumed[f"p{i}"]).tobytes() == straight[-1][i].tobytes()


@pytest.mark.parametrize("name", sorted(ALL))
def test_a_checkpoint_of_another_optimizer_is_refused(name):
    other = next(n for n in ALL if n != name)
    metadata = state_metadata(ALL[other])
    with pytest.raises(CheckpointError, match=f"uses {optimizer_kind(ALL[name]).rule!r}"):
        check_rule(metadata, ALL[name], "ckpt.zip: optimizer.safetensors")


@pytest.mark.parametrize("name", sorted(ALL))
def test_state_bytes_are_what_the_optimizer_allocates(name):
    """OptimizerKind.state_bytes (what the memory model counts) against the arrays the optimiser keeps,
    for fp32 and bf16 parameters (bf16 states follow the parameter dtype, except 8-bit's fp32 ones)."""
    rng = np.random.default_rng(9)
    for dtype in (mx.float32, mx.bfloat16):
        shapes = [s for s in SHAPES if s != SHAPES[ZERO]]  # all non-zero: Prodigy keeps every copy
        params = {f"p{i}": mx.array(rng.standard_normal(s), dtype=dtype) for i, s in enumerate(shapes)}
        optimizer = make_optimizer(ALL[name], 10)
        optimizer.init(params)
        kept = sum(
            v.nbytes for k, v in tree_flatten(optimizer.state) if k.split(".")[0] in params
        )  # per-parameter state (the step counter, learning rate, Prodigy's scalars aside)
        assert kept == optimizer_state_bytes(ALL[name], shapes, dtype.size), dtype


@pytest.mark.parametrize("name", sorted(ALL))
def test_training_resumes_bit_exactly_with_every_optimizer(tmp_path, name):
    """The loop's N straight steps == N/2, resume from the zip, N/2 (a small model family; 8-bit moments
    on its 15-weight matrix)."""
    from test_training_loop import Regression, model, regression_examples, regression_settings

    from zrecipe.training.loop import train

    opt = replace(ALL[name], min_8bit_size=8) if name == "AdamW8bit" else ALL[name]
    settings = regression_settings(6, optimizer=opt)
    straight = train(model(), regression_examples(), Regression(), settings, tmp_path / "a", callbacks=[])
    half = tmp_path / "a" / "checkpoints" / "0000003_checkpoint.zip"
    resumed = train(model(), regression_examples(), Regression(), settings, tmp_path / "b", resume_from=half,
                    callbacks=[])  # fmt: skip
    a, b = read_checkpoint(straight.checkpoint), read_checkpoint(resumed.checkpoint)
    for key in ("weight",):
        assert np.array(a.adapter[key]).tobytes() == np.array(b.adapter[key]).tobytes()
    assert sorted(a.optimizer) == sorted(b.optimizer)
    assert all(np.array(v).tobytes() == np.array(b.optimizer[k]).tobytes() for k, v in a.optimizer.items())
    assert a.optimizer_metadata["rule"] == optimizer_kind(opt).rule
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
