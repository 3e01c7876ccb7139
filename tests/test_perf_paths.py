"""The CPU fast paths (polynomial exp, SiLU, softmax attention, fused norm chains) equal the plain MLX math,
forward and backward."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from zrecipe.models.z_image import kernels
from zrecipe.models.z_image import transformer_blocks as tb
from zrecipe.models.z_image.vae_blocks import GroupNorm


def rel(a: mx.array, b: mx.array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_exp_poly_matches_exp_elementwise():
    x = mx.linspace(-80.0, 80.0, 100_001)
    got, want = np.asarray(kernels.exp_poly(x), np.float64), np.exp(np.asarray(x, np.float64))
    assert np.max(np.abs(got - want) / want) < 2e-6
    extreme = kernels.exp_poly(mx.array([-1e30, -200.0, 200.0, 1e30]))
    assert np.all(np.isfinite(np.asarray(extreme)))  # clamped: no inf or NaN reaches a softmax


def test_exp_poly_underflows_to_exact_zero_not_to_denormal_sized_values():
    # Masked scores (the lowest float) must give probabilities of exactly 0: e^-87-sized values became
    # denormals after the softmax division and made masked attention 7x slower on x86.
    got = np.asarray(
        kernels.exp_poly(mx.array([float(np.finfo(np.float32).min), -1e4, -88.0, -86.0])), np.float64
    )
    assert got[0] == got[1] == got[2] == 0.0
    assert abs(got[3] / np.exp(-86.0) - 1) < 2e-6
    scores = mx.array([[0.0, -1.0, float(np.finfo(np.float32).min)]])
    probs = np.asarray(kernels._softmax_poly(scores))
    assert probs[0, 2] == 0.0 and abs(probs.sum() - 1) < 1e-6


def test_silu_and_its_gradient_match_nn_silu():
    x = mx.random.normal((4, 333), key=mx.random.key(0)) * 6
    assert rel(kernels.silu(x), nn.silu(x)) < 1e-6
    g = mx.random.normal(x.shape, key=mx.random.key(1))
    ours = mx.grad(lambda v: (kernels.silu(v) * g).sum())(x)
    want = mx.grad(lambda v: (nn.silu(v) * g).sum())(x)
    assert rel(ours, want) < 1e-5
    assert rel(kernels.swiglu(x, g), nn.silu(x) * g) < 1e-6


def test_silu_keeps_bfloat16():
    x = mx.random.normal((8, 16), key=mx.random.key(2)).astype(mx.bfloat16)
    assert kernels.silu(x).dtype == mx.bfloat16


@pytest.mark.parametrize(
    "heads, kv_heads, masked", [(4, 4, False), (4, 4, True), (6, 2, True), (4, 1, False)]
)
def test_attention_matches_fused_sdpa_forward_and_backward(heads, kv_heads, masked):
    k0, k1, k2, k3 = mx.random.split(mx.random.key(3), 4)
    B, L, D = 2, 37, 16
    q = mx.random.normal((B, heads, L, D), key=k0)
    k = mx.random.normal((B, kv_heads, L, D), key=k1)
    v = mx.random.normal((B, kv_heads, L, D), key=k2)
    mask = None
    if masked:  # causal and a batch item whose last 10 keys are padding
        pos = mx.arange(L)
        keep = mx.array([[1] * L, [1] * (L - 10) + [0] * 10]).astype(mx.bool_)
        mask = mx.logical_and((pos[:, None] >= pos[None])[None, None], keep[:, None, None, :])
    scale = D**-0.5
    ours = kernels.attention(q, k, v, scale, mask)
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    assert ours.shape == want.shape
    assert rel(ours, want) < 1e-5
    w = mx.random.normal(want.shape, key=k3)
    g_ours = mx.grad(lambda *a: (kernels.attention(*a, scale, mask) * w).sum(), argnums=(0, 1, 2))(q, k, v)
    g_want = mx.grad(
        lambda *a: (mx.fast.scaled_dot_product_attention(*a, scale=scale, mask=mask) * w).sum(),
        argnums=(0, 1, 2),
    )(q, k, v)
    for a, b in zip(g_ours, g_want, strict=True):
        assert rel(a, b) < 1e-4


def test_fused_norm_chains_equal_the_unfused_math():
    k0, k1, k2, k3 = mx.random.split(mx.random.key(4), 4)
    x, y = mx.random.normal((2, 5, 24), key=k0), mx.random.normal((2, 5, 24), key=k1)
    w = 1 + 0.1 * mx.random.normal((24,), key=k2)
    s = mx.random.normal((2, 1, 24), key=k3)
    norm = nn.RMSNorm(24, eps=1e-5)
    norm.weight = w
    assert rel(tb._norm_scale(x, w, 1e-5, s), norm(x) * (1 + s)) < 1e-6
    assert rel(tb._gated_add(x, s, y, w, 1e-5), x + mx.tanh(s) * norm(y)) < 1e-6
    assert rel(tb._norm_add(x, y, w, 1e-5), x + norm(y)) < 1e-6


def test_fused_group_norm_equals_pytorch_compatible_group_norm_then_silu():
    x = mx.random.normal((2, 6, 10, 32), key=mx.random.key(5)) * 3 + 1
    ours = GroupNorm(8, 32, eps=1e-6)
    ours.weight = 1 + 0.1 * mx.random.normal((32,), key=mx.random.key(6))
    ours.bias = 0.1 * mx.random.normal((32,), key=mx.random.key(7))
    plain = nn.GroupNorm(8, 32, eps=1e-6, pytorch_compatible=True)
    plain.weight, plain.bias = ours.weight, ours.bias
    assert rel(ours(x), plain(x)) < 1e-5
    assert rel(ours(x, act=True), nn.silu(plain(x))) < 1e-5


def test_transformer_block_gradients_flow_through_the_fast_paths():
    block = tb.TransformerBlock(32, 2, 1e-5, qk_norm=True)
    rope = tb.RopeTables(256.0, (8, 4, 4), (64, 16, 16))
    pos = mx.zeros((1, 8, 3), dtype=mx.int32)
    x, adaln = (
        mx.random.normal((1, 8, 32), key=mx.random.key(8)),
        mx.random.normal((1, 32), key=mx.random.key(9)),
    )
    loss, grads = nn.value_and_grad(block, lambda m: (m(x, None, rope(pos), adaln) ** 2).mean())(block)
    flat = dict(tree_flatten(grads))
    assert np.isfinite(loss.item())
    assert all(np.isfinite(np.asarray(g)).all() for g in flat.values())
    assert float(mx.abs(flat["feed_forward.w1.weight"]).sum()) > 0  # the SiLU vjp is wired in
