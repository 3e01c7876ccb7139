"""zrecipe.native: the compiled exp / SiLU / softmax primitives and their pure-MLX fallback.

Every numerical test runs on each path this machine has: the compiled module with each instruction set
the CPU supports ("native-avx512", "native-avx2", "native-sse2", ...), and the fallback ("mlx") — the same
contract for both. References are float64 numpy. With ZRECIPE_NATIVE=off (or no compiled module) only the
fallback runs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe import native

ROOT = Path(__file__).resolve().parents[1]
MODULE = native._load()[0]
PATHS = ["mlx"] + [f"native-{isa}" for isa in (MODULE.supported_isas() if MODULE else [])]
needs_module = pytest.mark.skipif(MODULE is None, reason=f"native kernels {native.status()}")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Route zrecipe.native through one path for the test."""
    if request.param == "mlx":
        monkeypatch.setattr(native, "_module", lambda: None)
    else:
        previous = MODULE.isa()
        MODULE.set_isa(request.param.removeprefix("native-"))
        request.addfinalizer(lambda: MODULE.set_isa(previous))
    return request.param


def f64(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32)).astype(np.float64)


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# -- forward accuracy --------------------------------------------------------------------------------


def test_exp_relative_error_against_float64(path):
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [np.linspace(-87, 88, 2_000_001, dtype=np.float32), rng.uniform(-87, 88, 500_000).astype(np.float32)]
    )
    y = native.exp(mx.array(x))
    assert y.dtype == mx.float32
    exact = np.exp(x.astype(np.float64))
    # Measured over every float32 in [-87, 88] (benchmarks/bench_native.py --exhaustive): 7.9e-8 with FMA
    # (AVX2, AVX-512), 1.0e-7 without (SSE2, the pure-MLX exp_poly).
    assert np.max(np.abs(f64(y) - exact) / exact) < 1.5e-7


def test_exp_edges(path):
    x = mx.array([-87.0001, -88.0, -1e4, -np.inf, 88.0, 88.5, 1e4, np.inf, np.nan, 0.0, -0.0])
    y = np.array(native.exp(x))
    assert (y[:4] == 0).all(), "exactly 0 below -87 (no denormals)"
    top = np.float32(np.exp(np.float64(88.0)))
    assert np.allclose(y[4:8], top, rtol=1e-6) and np.isfinite(y[4:8]).all(), "clamped at 88, never inf"
    assert np.isnan(y[8])
    assert (y[9:] == 1.0).all()


def test_silu_against_float64(path):
    x = np.concatenate([np.linspace(-90, 90, 200_001), [-1e4, 1e4, 0.0]]).astype(np.float32)
    y = native.silu(mx.array(x))
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        exact = xd / (1 + np.exp(-xd))
    err = np.abs(f64(y) - exact)
    assert np.all(err <= 1e-6 * np.abs(exact) + 1e-30)


def test_silu_keeps_the_input_dtype(path):
    x = mx.array(np.linspace(-6, 6, 101, dtype=np.float32)).astype(mx.bfloat16)
    y = native.silu(x)
    assert y.dtype == mx.bfloat16
    ref = nn.silu(x.astype(mx.float32)).astype(mx.bfloat16)
    assert mx.array_equal(y, ref)


def test_softmax_against_float64(path):
    rng = np.random.default_rng(1)
    for shape in [(3, 5, 320), (2, 77), (4, 1), (1, 3, 1000)]:  # 77 and 1000: not multiples of any width
        x = (rng.standard_normal(shape) * 8).astype(np.float32)
        y = native.softmax(mx.array(x))
        assert y.dtype == mx.float32 and y.shape == shape
        exact = softmax64(x.astype(np.float64))
        err = np.abs(f64(y) - exact)
        # MLX's own float32 softmax (precise=True) measures up to 1.4e-6 / 6.3e-6 on these inputs.
        assert err.max() < 2e-6 and (err / exact).max() < 1e-5


def test_softmax_masked_entries_are_exactly_zero(path):
    x = np.zeros((2, 4, 37), np.float32)
    x[:, :, 20:] = np.finfo(np.float32).min  # the attention mask's fill value
    x[1, :, 3] = -np.inf
    y = np.array(native.softmax(mx.array(x)))
    assert (y[:, :, 20:] == 0).all() and (y[1, :, 3] == 0).all()
    assert np.allclose(y[0, :, :20], 1 / 20, rtol=1e-6)
    assert np.allclose(y[1, :, :20].sum(-1), 1.0, rtol=1e-6)


def test_strided_and_broadcast_inputs(path):
    rng = np.random.default_rng(2)
    base = mx.array(rng.standard_normal((6, 8, 40)).astype(np.float32))
    for x in [base.transpose(2, 0, 1), base[:, ::2, 3:33], mx.broadcast_to(base[:1], (5, 8, 40))]:
        xd = f64(x)
        assert np.allclose(f64(native.exp(x)), np.exp(xd), rtol=2e-7, atol=0)
        assert np.allclose(f64(native.silu(x)), xd / (1 + np.exp(-xd)), rtol=1e-6, atol=1e-7)
        assert np.max(np.abs(f64(native.softmax(x)) - softmax64(xd))) < 2e-6


def test_empty_arrays(path):
    assert native.softmax(mx.zeros((0, 5))).shape == (0, 5)
    assert native.exp(mx.zeros((3, 0))).shape == (3, 0)


# -- gradients ---------------------------------------------------------------------------------------


def test_softmax_vjp_against_float64(path):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 6, 50)) * 4).astype(np.float32)
    w = rng.standard_normal((4, 6, 50)).astype(np.float32)
    grad = mx.grad(lambda a: (native.softmax(a) * mx.array(w)).sum())(mx.array(x))
    p = softmax64(x.astype(np.float64))
    exact = p * (w - (w * p).sum(-1, keepdims=True))
    assert np.max(np.abs(f64(grad) - exact)) < 1e-6


def test_silu_and_exp_vjp_against_float64(path):
    x = np.linspace(-20, 20, 4001, dtype=np.float32)
    xd = x.astype(np.float64)
    s = 1 / (1 + np.exp(-xd))
    grad = mx.grad(lambda a: native.silu(a).sum())(mx.array(x))
    assert np.allclose(f64(grad), s * (1 + xd * (1 - s)), rtol=1e-6, atol=1e-7)
    grad = mx.grad(lambda a: (native.exp(a) * 0.5).sum())(mx.array(x))
    assert np.allclose(f64(grad), 0.5 * np.exp(xd), rtol=2e-7, atol=0)


class _Tiny(nn.Module):
    """Linear → SiLU → Linear → softmax attention-like weighting: each op of zrecipe.native once."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 24)

    def __call__(self, x, exp, silu, softmax):
        h = self.b(silu(self.a(x)))
        return softmax(h) * exp(h * 0.1)


def test_compiled_value_and_grad_matches_mlx(path):
    mx.random.seed(0)
    model = _Tiny()
    mx.eval(model.parameters())
    x = mx.random.normal((3, 10, 16))

    def loss(model, x, ops):
        return (model(x, *ops) ** 2).mean()

    reference_ops = (mx.exp, nn.silu, lambda h: mx.softmax(h, axis=-1, precise=True))
    ref_loss, ref_grads = nn.value_and_grad(model, lambda m, x: loss(m, x, reference_ops))(model, x)
    ours_ops = (native.exp, native.silu, native.softmax)
    value_and_grad = nn.value_and_grad(model, lambda m, x: loss(m, x, ours_ops))
    step = mx.compile(lambda x: value_and_grad(model, x), inputs=model.state, outputs=model.state)
    for _ in range(2):  # the second call runs the cached compiled graph
        our_loss, our_grads = step(x)
    assert abs(our_loss.item() - ref_loss.item()) <= 1e-6 * abs(ref_loss.item())
    if path == "mlx":
        return  # exp_poly's bit cast (`view`) cannot infer shapes, so the fallback cannot compile shapeless
    shapeless = mx.compile(lambda h: native.softmax(h) * native.silu(h) + native.exp(h), shapeless=True)
    for shape in [(3, 5), (2, 7, 9)]:  # a second shape reuses the graph through output_shapes
        h = mx.random.normal(shape)
        ref = mx.softmax(h, axis=-1, precise=True) * nn.silu(h) + mx.exp(h)
        assert mx.allclose(shapeless(h), ref, rtol=1e-6, atol=1e-6)
    flat_ref, flat_ours = dict(tree_flatten(ref_grads)), dict(tree_flatten(our_grads))
    assert flat_ref.keys() == flat_ours.keys()
    for key, g in flat_ref.items():
        scale = mx.abs(g).max().item()
        assert mx.abs(flat_ours[key] - g).max().item() <= 1e-5 * scale, key


@needs_module
def test_second_derivatives_and_jvp_match_mlx(path):
    if path == "mlx":
        pytest.skip("the fallback's custom_function has no second derivative")
    rng = np.random.default_rng(4)
    x = mx.array((rng.standard_normal((3, 17)) * 3).astype(np.float32))
    w = mx.array(rng.standard_normal((3, 17)).astype(np.float32))
    pairs = [
        (native.silu, nn.silu),
        (native.softmax, lambda a: mx.softmax(a, axis=-1, precise=True)),
        (native.exp, mx.exp),
    ]
    for ours, theirs in pairs:

        def second(f):
            return mx.grad(lambda a: (mx.grad(lambda b: (f(b) * w).sum())(a) * w).sum())(x)

        assert mx.allclose(second(ours), second(theirs), rtol=1e-4, atol=1e-5)
        (jo,), (jt,) = mx.jvp(ours, [x], [w])[1], mx.jvp(theirs, [x], [w])[1]
        assert mx.allclose(jo, jt, rtol=1e-5, atol=1e-6)


@needs_module
def test_vmap_over_a_leading_and_the_last_axis(path):
    x = mx.random.normal((5, 7, 9))
    for axis in (0, 2):
        ours = mx.vmap(native.softmax, in_axes=axis)(x)
        ref = mx.softmax(mx.moveaxis(x, axis, 0), axis=-1, precise=True)
        assert mx.allclose(ours, ref, atol=2e-7)
    g = mx.random.normal((7, 9))
    silu_vjp = mx.vmap(lambda a: mx.vjp(native.silu, [a], [g])[1][0])(x)
    assert mx.allclose(silu_vjp, mx.vmap(lambda a: mx.vjp(nn.silu, [a], [g])[1][0])(x), rtol=1e-5, atol=1e-6)


# -- the compiled module itself -------------------------------------------------------------------------


@needs_module
def test_thread_count_does_not_change_results():
    x = mx.random.normal((4, 6, 300, 300)) * 5  # over the per-thread grain, so several threads run
    previous = MODULE.threads()
    try:
        MODULE.set_threads(1)
        maps, ones, zeros = x.reshape(4, 300, 300, 6), mx.ones((6,)), mx.zeros((6,))
        one = [
            MODULE.exp(x),
            MODULE.silu(x),
            MODULE.softmax(x),
            MODULE.group_norm(maps, ones, zeros, 3, 1e-6, True),
        ]
        mx.eval(one)
        MODULE.set_threads(4)
        four = [
            MODULE.exp(x),
            MODULE.silu(x),
            MODULE.softmax(x),
            MODULE.group_norm(maps, ones, zeros, 3, 1e-6, True),
        ]
        mx.eval(four)
    finally:
        MODULE.set_threads(previous)
    assert all(mx.array_equal(a, b) for a, b in zip(one, four, strict=True))


def group_norm64(x, weight, bias, groups, eps, act):
    """PyTorch's GroupNorm (+ SiLU) of NHWC x in float64 (the reference)."""
    b, h, w, c = x.shape
    g = x.reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = ((g - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * weight + bias
    return y / (1 + np.exp(-y)) if act else y


@pytest.mark.parametrize("act", [False, True])
@pytest.mark.parametrize("shape, groups", [((2, 17, 13, 64), 32), ((1, 9, 70, 20), 4), ((3, 40, 40, 8), 8)])
def test_group_norm_against_float64(path, shape, groups, act):
    # (1, 9, 70, 20): channel counts off the vector width; 40² > one reduction chunk of pixels.
    if path == "mlx":
        pytest.skip("the pure-MLX GroupNorm is the VAE's compiled chain (tests/test_vae*.py)")
    k0, k1, k2 = mx.random.split(mx.random.key(3), 3)
    x = mx.random.normal(shape, key=k0) * 4 + 2
    weight, bias = mx.random.normal((shape[3],), key=k1), mx.random.normal((shape[3],), key=k2)
    got = f64(native.group_norm(x, weight, bias, groups, 1e-6, act))
    want = group_norm64(f64(x), f64(weight), f64(bias), groups, 1e-6, act)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-6


@needs_module
def test_group_norm_gradients_and_layouts():
    from zrecipe.models.z_image.vae_blocks import _group_norm_math

    x = mx.random.normal((2, 12, 10, 32), key=mx.random.key(4)).transpose(0, 2, 1, 3)  # a transposed view
    weight, bias, cot = mx.random.normal((32,)), mx.random.normal((32,)), mx.random.normal((2, 10, 12, 32))
    ours = mx.grad(lambda *a: (native.group_norm(*a, 8, 1e-5, True) * cot).sum(), argnums=(0, 1, 2))
    ref = mx.grad(lambda *a: (_group_norm_math(*a, 8, 1e-5, True) * cot).sum(), argnums=(0, 1, 2))
    assert np.allclose(f64(native.group_norm(x, weight, bias, 8, 1e-5, True)),
                       f64(_group_norm_math(x, weight, bias, 8, 1e-5, True)), atol=1e-5)  # fmt: skip
    for a, b in zip(ours(x, weight, bias), ref(x, weight, bias), strict=True):
        assert np.abs(f64(a) - f64(b)).max() / np.abs(f64(b)).max() < 1e-5


@needs_module
def test_group_norm_rejects_what_it_cannot_compute():
    x = mx.zeros((1, 4, 4, 6))
    with pytest.raises(ValueError, match="groups"):
        MODULE.group_norm(x, mx.ones((6,)), mx.zeros((6,)), 4, 1e-5, False)
    with pytest.raises(ValueError, match="one value per channel"):
        MODULE.group_norm(x, mx.ones((5,)), mx.zeros((6,)), 3, 1e-5, False)
    with pytest.raises(ValueError, match="float32"):
        MODULE.group_norm(x.astype(mx.float16), mx.ones((6,)), mx.zeros((6,)), 3, 1e-5, False)


def conv2d64(x, w, stride, padding):
    """NHWC x, OHWI w, zero padding on every side, in float64 (the reference)."""
    b, h, wd, c = x.shape
    o, kh, kw, _ = w.shape
    xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (wd + 2 * padding - kw) // stride + 1
    out = np.zeros((b, ho, wo, o))
    for i in range(kh):
        for j in range(kw):
            taps = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            out += taps @ w[:, i, j, :].T
    return out


CONV_CASES = [  # (x shape, (out channels, kernel), stride, padding)
    ((2, 17, 13, 16), (7, 3), 1, 1),  # channels off the vector width, odd sizes
    ((1, 33, 33, 32), (32, 3), 2, 0),  # the VAE's downsampling (after its own pad)
    ((3, 9, 11, 20), (6, 5), 1, 2),
    ((1, 8, 8, 16), (4, 3), 1, 3),  # padding wider than the kernel's reach: rows of zeros
    ((1, 70, 70, 16), (8, 3), 1, 1),  # several tiles of output pixels
    ((2, 6, 6, 16), (5, 1), 2, 1),
]


@needs_module
@pytest.mark.parametrize("shape, kernel, stride, padding", CONV_CASES)
def test_conv2d_against_float64_and_mlx(shape, kernel, stride, padding):
    k0, k1 = mx.random.split(mx.random.key(5))
    x = mx.random.normal(shape, key=k0)
    w = mx.random.normal((kernel[0], kernel[1], kernel[1], shape[3]), key=k1) * 0.2
    bias = mx.random.normal((kernel[0],), key=mx.random.key(13))
    for b in (None, bias):
        got = native.conv2d(x, w, stride, padding, b)
        mlx_own = mx.conv2d(x, w, stride=stride, padding=padding) + (0 if b is None else b)
        want = conv2d64(f64(x), f64(w), stride, padding) + (0 if b is None else f64(b))
        assert got.shape == mlx_own.shape == want.shape
        assert np.abs(f64(got) - want).max() / np.abs(want).max() < 1e-6
        assert np.abs(f64(got) - f64(mlx_own)).max() / np.abs(want).max() < 1e-6


@needs_module
def test_conv2d_gradients_layouts_and_threads():
    x = mx.random.normal((2, 12, 10, 16), key=mx.random.key(6)).transpose(0, 2, 1, 3)  # a transposed view
    w = mx.random.normal((8, 3, 3, 16), key=mx.random.key(7)) * 0.2
    cot = mx.random.normal((2, 5, 6, 8), key=mx.random.key(8))
    bias = mx.random.normal((8,), key=mx.random.key(14))
    ours = mx.grad(lambda a, b, c: (native.conv2d(a, b, 2, 1, c) * cot).sum(), argnums=(0, 1, 2))(x, w, bias)
    ref = mx.grad(
        lambda a, b, c: ((mx.conv2d(a, b, stride=2, padding=1) + c) * cot).sum(), argnums=(0, 1, 2)
    )(x, w, bias)
    for a, b in zip(ours, ref, strict=True):
        assert np.abs(f64(a) - f64(b)).max() / np.abs(f64(b)).max() < 1e-6
    big = mx.random.normal((2, 80, 80, 16), key=mx.random.key(9))
    previous = MODULE.compute_threads()
    try:
        MODULE.set_compute_threads(1)
        one = native.conv2d(big, w, 1, 1)
        mx.eval(one)
        MODULE.set_compute_threads(4)
        four = native.conv2d(big, w, 1, 1)
        mx.eval(four)
    finally:
        MODULE.set_compute_threads(previous)
    assert mx.array_equal(one, four)


@needs_module
def test_conv2d_never_holds_the_unfolded_input():
    """Peak memory: the input, the output and the tiles' scratch; MLX's own conv2d holds 9x the input."""
    x = mx.random.normal((1, 192, 192, 64), key=mx.random.key(10))
    w = mx.random.normal((64, 3, 3, 64), key=mx.random.key(11))
    mx.eval(x, w)
    peaks = {}
    for name, conv in [
        ("native", lambda: native.conv2d(x, w, 1, 1)),
        ("mlx", lambda: mx.conv2d(x, w, padding=1)),
    ]:
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(conv())
        peaks[name] = mx.get_peak_memory() - base
    output = x.nbytes  # same shape
    scratch = native.conv2d_scratch_bytes(192 * 192, 3, 3, 64)
    assert peaks["native"] <= output + scratch + (1 << 20), peaks
    assert peaks["mlx"] > 8 * x.nbytes  # what the native path avoids (if MLX stops unfolding, drop this)


def test_vae_conv_module_equals_mlx_conv_module(path):
    """vae_blocks.Conv2d: nn.Conv2d's parameters and results on either path, and MLX's own below
    CONV2D_MIN_CHANNELS channels or for a 1x1 kernel."""
    from zrecipe.models.z_image.vae_blocks import Conv2d

    for c_in, kernel, stride, padding in [(16, 3, 1, 1), (32, 3, 2, 0), (3, 3, 1, 1), (16, 1, 1, 0)]:
        ours, theirs = Conv2d(c_in, 8, kernel, stride, padding), nn.Conv2d(c_in, 8, kernel, stride, padding)
        theirs.update(ours.parameters())
        x = mx.random.normal((2, 11, 11, c_in), key=mx.random.key(12))
        assert native.conv2d_available(x, ours.weight) == (
            path != "mlx" and c_in >= native.CONV2D_MIN_CHANNELS and kernel > 1
        )
        a, b = f64(ours(x)), f64(theirs(x))
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-6
        assert sorted(k for k, _ in tree_flatten(ours.parameters())) == ["bias", "weight"]


@needs_module
def test_module_rejects_what_it_cannot_compute():
    with pytest.raises(ValueError, match="float32"):
        MODULE.exp(mx.zeros((3,), mx.float16))
    with pytest.raises(ValueError, match="at least one axis"):
        MODULE.softmax(mx.array(1.0))
    with pytest.raises(ValueError, match="not supported"):
        MODULE.set_isa("no-such-isa")


@needs_module
def test_module_records_the_mlx_it_was_built_against():
    record = json.loads(native.BUILD_RECORD.read_text())
    assert record["built"] and record["mlx_version"] == mx.__version__
    assert MODULE.build_mlx_version == MODULE.runtime_mlx_version() == mx.__version__
    assert native.status() == f"loaded ({MODULE.isa()})"


def test_in_use_on_the_cpu_exactly_when_loaded():
    assert mx.default_device() == mx.cpu
    assert native.in_use() == native.available()


@pytest.mark.skipif(not os.environ.get("CI"), reason="only CI is sure to have a compiler and CMake")
def test_ci_builds_the_native_kernels():
    if sys.platform.startswith("linux") and platform.machine() in ("x86_64", "aarch64"):
        assert native.available(), native.status()


# -- fallback and refusal -------------------------------------------------------------------------------


def _status_with_record(monkeypatch, tmp_path, record, name="_native_build.json") -> tuple[bool, str]:
    path = tmp_path / name
    if record is not None:
        path.write_text(record if isinstance(record, str) else json.dumps(record))
    monkeypatch.setattr(native, "BUILD_RECORD", path)
    monkeypatch.delenv("ZRECIPE_NATIVE", raising=False)
    module, status = native._load.__wrapped__()
    return module is not None, status


def test_refuses_a_module_built_for_another_mlx(monkeypatch, tmp_path):
    loaded, status = _status_with_record(monkeypatch, tmp_path, {"built": True, "mlx_version": "0.0.1"})
    assert not loaded
    assert (
        status
        == f"not loaded: built against mlx 0.0.1, running mlx {mx.__version__} (reinstall zrecipe to rebuild it)"
    )


def test_reports_why_it_was_not_built(monkeypatch, tmp_path):
    reason = "no C++ compiler found at install time (install g++ or clang++, then reinstall zrecipe)"
    assert _status_with_record(monkeypatch, tmp_path, {"built": False, "reason": reason}) == (
        False,
        f"not built: {reason}",
    )
    loaded, status = _status_with_record(monkeypatch, tmp_path, None, name="missing.json")
    assert not loaded and status.startswith("not built: this installation has no native build")
    loaded, status = _status_with_record(monkeypatch, tmp_path, "{not json", name="bad.json")
    assert not loaded and status.startswith("not loaded: unreadable build record")


def test_off_switch_and_doctor_line():
    code = "from zrecipe import native; print(native.available(), native.status())"
    env = {**os.environ, "ZRECIPE_NATIVE": "off"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.stdout.strip() == "False off (ZRECIPE_NATIVE=off)", run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "zrecipe.cli.main", "doctor"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "native kernels: off (ZRECIPE_NATIVE=off)" in run.stdout.splitlines()


# -- the build ------------------------------------------------------------------------------------------


@pytest.fixture
def native_backend():
    """csrc/native_backend.py, the build backend (csrc/ is not a package; it needs setuptools)."""
    pytest.importorskip("setuptools")
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        import native_backend
    finally:
        sys.path.remove(str(ROOT / "csrc"))
    return native_backend


def test_backend_adds_build_requirements_only_where_it_compiles(monkeypatch, native_backend):
    monkeypatch.setenv("ZRECIPE_NATIVE_BUILD", "0")
    assert native_backend.native_requirements() == []
    monkeypatch.delenv("ZRECIPE_NATIVE_BUILD")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in native_backend.skip_reason()
    assert native_backend.native_requirements() == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the module is built on Linux only")
def test_backend_pins_the_mlx_of_the_target_environment(monkeypatch, native_backend):
    if native_backend.compiler() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.delenv("ZRECIPE_NATIVE_BUILD", raising=False)
    assert native_backend.target_mlx_version() == mx.__version__  # this interpreter's environment
    requirements = native_backend.native_requirements()
    assert requirements[:2] == [f"mlx[cpu]=={mx.__version__}", native_backend.NANOBIND]


def test_install_without_a_compiler_records_why_and_succeeds(tmp_path, native_backend):
    """setup.py's build step with no C++ compiler: no module, a build record with the reason, exit 0."""
    env = {**os.environ, "CXX": "/nonexistent/c++"}
    build_lib, build_temp = tmp_path / "lib", tmp_path / "temp"
    run = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", f"--build-lib={build_lib}", f"--build-temp={build_temp}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "WARNING: zrecipe: native CPU kernels not built: no C++ compiler found" in run.stderr
    assert not list((build_lib / "zrecipe").glob("_native*.so"))
    record = json.loads((build_lib / "zrecipe" / "_native_build.json").read_text())
    assert record["built"] is False and record["reason"].startswith("no C++ compiler found at install time")
