"""The O(N)-memory attentions: the compiled flash attention (`kernels.flash_attention`, csrc/
flash_attention.cpp) and its pure-MLX fallback (`kernels.blockwise_attention`). Values and gradients equal
the references (PyTorch's SDPA and MLX's plain softmax attention) with the masks and layouts the models
use, and their training memory is O(N)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch

from zrecipe import native
from zrecipe.models.z_image import kernels

IMPLEMENTATIONS = ["flash", "blockwise"]


def implementation(name: str):
    """attend(q, k, v, scale, mask=None, rows=None) for one implementation; the compiled one must really run
    (not fall back), so it is skipped where the compiled kernels are not built (CI builds them)."""
    if name == "flash":
        if not native.available():
            pytest.skip(f"compiled kernels not loaded: {native.status()}")
        return kernels.flash_attention
    return kernels.blockwise_attention


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def plain_attention(q, k, v, scale, mask=None):
    """Softmax attention in MLX ops only (the reference): GQA by repeating kv heads."""
    rep = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, rep, axis=1), mx.repeat(v, rep, axis=1)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return mx.softmax(scores, axis=-1) @ v


def inputs(batch, heads, kv_heads, length, dim, seed=0):
    k0, k1, k2, k3 = mx.random.split(mx.random.key(seed), 4)
    q = mx.random.normal((batch, heads, length, dim), key=k0)
    k = mx.random.normal((batch, kv_heads, length, dim), key=k1)
    v = mx.random.normal((batch, kv_heads, length, dim), key=k2)
    w = mx.random.normal((batch, heads, length, dim), key=k3)  # a random cotangent
    return q, k, v, w


def key_padding_mask(length: int, valid: list[int]) -> mx.array:
    """(B, 1, 1, L), True for each item's first valid[i] keys: the transformer's batch-padding mask."""
    return (mx.arange(length)[None] < mx.array(valid)[:, None])[:, None, None, :]


def grads(fn, q, k, v, w):
    return mx.grad(lambda *a: (fn(*a) * w).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_gradients_equal_pytorch_sdpa(name, masked):
    attend = implementation(name)
    B, H, L, D = 2, 4, 200, 16
    q, k, v, w = inputs(B, H, H, L, D)
    mask = key_padding_mask(L, [L, L - 37]) if masked else None
    scale = D**-0.5
    ours = lambda q, k, v: attend(q, k, v, scale, mask, rows=64)  # noqa: E731  4 blocks
    out, g = ours(q, k, v), grads(ours, q, k, v, w)

    tq, tk, tv = (torch.tensor(np.asarray(a), requires_grad=True) for a in (q, k, v))
    tmask = torch.tensor(np.asarray(mask)) if masked else None
    want = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, scale=scale)
    (want * torch.tensor(np.asarray(w))).sum().backward()
    assert rel(out, want.detach().numpy()) < 1e-5
    for ours_g, t in zip(g, (tq, tk, tv), strict=True):
        assert rel(ours_g, t.grad.numpy()) < 1e-4
    if masked:  # padded keys get no gradient and contribute nothing
        assert float(mx.abs(g[1][1, :, L - 37 :]).max()) == 0.0
        assert float(mx.abs(g[2][1, :, L - 37 :]).max()) == 0.0


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    "heads, kv_heads, mask_kind, rows",
    [(4, 4, None, 32), (4, 4, "padding", 48), (6, 2, "causal+padding", 32), (4, 1, None, 1000)],
)
def test_gradients_equal_plain_softmax_attention(name, heads, kv_heads, mask_kind, rows):
    attend = implementation(name)
    B, L, D = 2, 77, 8
    q, k, v, w = inputs(B, heads, kv_heads, L, D, seed=1)
    mask = None
    if mask_kind:
        mask = key_padding_mask(L, [L, L - 20])
        if mask_kind == "causal+padding":  # the text encoder's (B, 1, L, L) mask: sliced per query block
            pos = mx.arange(L)
            mask = mx.logical_and((pos[:, None] >= pos[None])[None, None], mask)
    scale = D**-0.5
    ours = lambda q, k, v: attend(q, k, v, scale, mask, rows=rows)  # noqa: E731
    ref = lambda q, k, v: plain_attention(q, k, v, scale, mask)  # noqa: E731
    assert rel(ours(q, k, v), ref(q, k, v)) < 1e-5
    for a, b in zip(grads(ours, q, k, v, w), grads(ref, q, k, v, w), strict=True):
        assert a.shape == b.shape
        assert rel(a, b) < 1e-4


def test_training_dispatch_compiles_and_uses_the_compiled_kernel_where_loaded(monkeypatch):
    calls = []
    flash = native.flash_attention
    monkeypatch.setattr(native, "flash_attention", lambda *a, **kw: calls.append(1) or flash(*a, **kw))
    q, k, v, w = inputs(1, 2, 2, 96, 8, seed=2)
    mask = key_padding_mask(96, [80])
    step = mx.compile(
        lambda q, k, v: grads(lambda *a: kernels.attention(*a, 0.3, mask, training=True), q, k, v, w)
    )
    ref = grads(lambda *a: plain_attention(*a, 0.3, mask), q, k, v, w)
    for a, b in zip(step(q, k, v), ref, strict=True):
        assert rel(a, b) < 1e-4
    assert bool(calls) == native.available()


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_the_models_layouts_and_a_broadcast_cotangent(name):
    # The transformer passes q and k as transposes of (B, N, H, D) arrays; `out.sum()` gives a broadcast
    # cotangent; the text encoder's causal mask has one row per query.
    attend = implementation(name)
    B, H, L, D = 2, 3, 150, 16
    k0, k1, k2 = mx.random.split(mx.random.key(7), 3)
    q, k, v = (mx.random.normal((B, L, H, D), key=key).transpose(0, 2, 1, 3) for key in (k0, k1, k2))
    pos = mx.arange(L)
    mask = mx.logical_and((pos[:, None] >= pos[None])[None, None], key_padding_mask(L, [L, L - 30]))
    ours = mx.grad(lambda *a: attend(*a, 0.25, mask, rows=64).sum(), argnums=(0, 1, 2))(q, k, v)
    want = mx.grad(lambda *a: plain_attention(*a, 0.25, mask).sum(), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, want, strict=True):
        assert rel(a, b) < 1e-4


def test_flash_results_do_not_depend_on_the_thread_count():
    attend = implementation("flash")
    q, k, v, w = inputs(2, 3, 3, 130, 16, seed=5)
    results = []
    before = native.compute_threads()
    try:
        for threads in (1, 3):
            native.set_compute_threads(threads)
            results.append(
                [attend(q, k, v, 0.25, rows=48), *grads(lambda *a: attend(*a, 0.25, rows=48), q, k, v, w)]
            )
    finally:
        native.set_compute_threads(before)
    for a, b in zip(*results, strict=True):
        assert rel(a, b) < 1e-6


def test_flash_rejects_what_it_cannot_compute():
    implementation("flash")
    module = native._load()[0]
    q = mx.zeros((1, 2, 8, 4))
    with pytest.raises(ValueError, match="float32"):
        module.flash_attention(q.astype(mx.float16), q, q, 0.5)
    with pytest.raises(ValueError, match="heads"):
        module.flash_attention(q, mx.zeros((1, 1, 8, 4)), mx.zeros((1, 1, 8, 4)), 0.5)
    with pytest.raises(ValueError, match="mask"):
        module.flash_attention(q, q, q, 0.5, mx.ones((1, 2, 8, 3), mx.bool_))
    with pytest.raises(ValueError, match="one key"):
        module.flash_attention(q, mx.zeros((1, 2, 0, 4)), mx.zeros((1, 2, 0, 4)), 0.5)


def test_non_float32_inputs_take_the_pure_mlx_path():
    q, k, v, w = (a.astype(mx.bfloat16) for a in inputs(1, 2, 2, 64, 16, seed=3))
    out = kernels.flash_attention(q, k, v, 0.25, rows=32)
    assert out.dtype == mx.bfloat16
    assert (
        rel(out.astype(mx.float32), kernels.blockwise_attention(q, k, v, 0.25, rows=32).astype(mx.float32))
        == 0
    )


def test_bfloat16_inputs_give_bfloat16_outputs_and_gradients():
    q, k, v, w = (a.astype(mx.bfloat16) for a in inputs(1, 2, 2, 64, 16, seed=3))
    fn = lambda q, k, v: kernels.blockwise_attention(q, k, v, 0.25, rows=32)  # noqa: E731
    assert fn(q, k, v).dtype == mx.bfloat16
    assert all(g.dtype == mx.bfloat16 for g in grads(fn, q, k, v, w))
    want = plain_attention(*(a.astype(mx.float32) for a in (q, k, v)), 0.25)
    assert rel(fn(q, k, v).astype(mx.float32), want) < 2e-2


def test_block_rows_respects_the_element_budget():
    assert kernels.block_rows(1, 4, 100, 100, budget=10**9) == 100  # everything fits: one block
    rows = kernels.block_rows(2, 12, 4224, 4224, budget=1 << 20)
    assert rows % kernels.BLOCK_ROW_MULTIPLE == 0 and rows >= kernels.BLOCK_ROW_MULTIPLE
    assert 2 * 12 * rows * 4224 <= max(1 << 20, 2 * 12 * kernels.BLOCK_ROW_MULTIPLE * 4224)


def _peak_bytes(fn, *args) -> int:
    """Peak memory of evaluating fn(*args) above what was allocated before, with MLX's run-ahead off.

    MLX's CPU backend dispatches up to 10 operations ahead of their completion, each with its output
    allocated, so an unconstrained peak varies with machine load by several block-sized temporaries. Under
    a memory limit below the working set, MLX waits for each operation to finish before dispatching the
    next (`eval_impl`), which makes the peak the size of what is actually alive: repeatable.
    """
    mx.eval(fn(*args))  # compile and warm up
    mx.clear_cache()
    limit = mx.set_memory_limit(1 << 20)
    try:
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn(*args))
        return mx.get_peak_memory() - base
    finally:
        mx.set_memory_limit(limit)


def _training_peak(attend, length: int, layers: int = 1, dim: int = 16) -> int:
    """Peak memory of a compiled forward + backward through `layers` chained attention calls."""
    q, k, v, w = inputs(1, 4, 4, length, dim, seed=4)
    mx.eval(q, k, v, w)

    def loss(q, k, v):
        x = q
        for _ in range(layers):
            x = attend(x, k, v)
        return (x * w).sum()

    return _peak_bytes(mx.compile(mx.grad(loss, argnums=(0, 1, 2))), q, k, v)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_training_memory_grows_linearly_with_sequence_length(name):
    attend = implementation(name)
    ours = lambda q, k, v: attend(q, k, v, 0.25, rows=32)  # noqa: E731
    small, large = _training_peak(ours, 256), _training_peak(ours, 1024)
    assert large / small < 6, (small, large)  # 4× the tokens: ~4× the memory (an N² path: ~16×)
    full = lambda q, k, v: plain_attention(q, k, v, 0.25)  # noqa: E731
    assert _training_peak(full, 1024) / _training_peak(full, 256) > 10  # the reference is quadratic


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_only_output_and_logsumexp_are_kept_between_forward_and_backward(name):
    # Each further attention layer adds what its backward needs (its input, output and row log-sum-exp:
    # ~2 (B, H, N, D) arrays), not a (B, H, rows, N) score tile. Two ways the blockwise version failed
    # before: under mx.compile a first-block score matmul identical in forward and backward was merged and
    # kept alive, and the last block's dk/dv contributions were scheduled late, keeping its temporaries.
    attend = implementation(name)
    n, rows = 512, 448  # a large first block, a small last one
    ours = lambda q, k, v: attend(q, k, v, 0.25, rows=rows)  # noqa: E731
    one, three = (_training_peak(ours, n, layers, dim=4) for layers in (1, 3))
    per_layer = (three - one) / 2
    last_tile = 4 * (n - rows) * n * 4  # fp32 scores of the last (smallest) block
    assert per_layer < 0.75 * last_tile, (per_layer, last_tile)
