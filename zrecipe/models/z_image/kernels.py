"""Numerical kernels shared by the Z-Image networks: CPU-fast exp / SiLU / softmax and attention.

MLX's x86 CPU kernels evaluate exp one element at a time (measured: ~20 ns per element against ~0.4 ns
for a multiply), which made softmax and SiLU over a third of a DiT forward. On the CPU backend exp is
therefore computed as 2^n · p(r) from multiply/add/floor/shift only — ops the compiled kernels vectorise —
(max relative error ~1e-7, far inside the 1e-4 parity tolerance). GPUs keep the native kernels
(`mx.fast.scaled_dot_product_attention`, `nn.silu`, `mx.exp`). Elementwise chains are wrapped in
`mx.compile` so each is one fused pass over memory; inside the training step's own `mx.compile` they inline.
Where zrecipe's compiled kernels are loaded (`zrecipe.native`: vectorised exp / SiLU / softmax primitives),
the CPU paths use them instead of the polynomial (same results within float32 rounding; one pass instead
of the polynomial's chain of fused kernels); the polynomial stays as the fallback.

Attention (`attention`) has four implementations, chosen per call (see its docstring):
- `mx.fast.scaled_dot_product_attention`, on a GPU wherever it is fused — for training only where MLX has a
  fused backward too (CUDA/cuDNN), since its fallback backward keeps the (heads, N, N) probabilities;
- the compiled flash attention (`zrecipe.native.flash_attention`, csrc/flash_attention.h), on the CPU where
  the compiled kernels are loaded: one primitive per call, forward and backward, O(N) memory;
- the full-matrix softmax with the CPU softmax, for CPU inference on small problems without the compiled
  kernels;
- `blockwise_attention`, the pure-MLX fallback of the flash attention (no compiled kernels, or a GPU
  without a fused backward): query blocks against all keys, a custom VJP that recomputes each block's
  scores from the saved output and per-row log-sum-exp (FlashAttention's recipe), so training memory is
  O(N): at 1024² one (heads, N, N) fp32 matrix of the 12-head bench model is 0.86 GB per image and block.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager

import mlx.core as mx
from mlx import nn

from zrecipe import native

_LOG2E = 1.4426950408889634
_LN2_HI, _LN2_LO = 0.693145751953125, 1.428606765330187e-06  # ln 2 split so that n·LN2_HI is exact
_EXP_COEFFS = tuple(1.0 / math.factorial(i) for i in range(8))  # e^r for |r| ≤ ln2/2: error < 1e-8

# Blockwise attention holds one block's (B, H, rows, keys) scores and a few same-sized temporaries at a
# time; the block height is the largest multiple of BLOCK_ROW_MULTIPLE whose score tile has at most
# BLOCK_ELEMENTS elements (at least BLOCK_ROW_MULTIPLE rows). Chosen by measurement on the CPU
# (benchmarks/bench_attention.py, RESULTS.md "Attention memory"): larger tiles were not faster.
BLOCK_ELEMENTS = 1 << 20
BLOCK_ROW_MULTIPLE = 32
# CPU inference keeps the one-matrix softmax while the whole (B, H, L, S) score matrix is at most this
# many elements (it is a little faster than blocks there, and never trained).
FULL_MATRIX_ELEMENTS = 1 << 24


def on_cpu() -> bool:
    """Whether MLX computes on the CPU (where the polynomial exp and manual attention pay off)."""
    return mx.default_device() == mx.cpu


def exp_poly(x: mx.array) -> mx.array:
    """exp(x) in float32 from vectorisable ops only: exactly 0 below −87, clamped at 88 (no inf).

    x = n·ln2 + r with |r| ≤ ln2/2 (Cody–Waite reduction), e^r by its degree-7 Taylor polynomial in
    Estrin's form (a shallow graph: MLX fuses at most 11 dependent ops into one kernel, and every kernel
    boundary is a tensor-sized temporary), 2^n by writing n + 127 into the exponent bits; max relative error
    8.4e-8 over [−87, 88] (float32 rounding). Below −87 the result is 0, as float32 exp underflows there
    anyway: a tiny non-zero value (masked attention scores gave e^−87 ≈ 1.6e-38) turns into denormals after
    the softmax division, and x86 arithmetic on denormals is ~100× slower (measured: a masked text-encoder
    attention took 7× as long as an unmasked one).
    """
    x = x.astype(mx.float32)
    xc = mx.clip(x, -87.0, 88.0)
    n = mx.floor(xc * _LOG2E + 0.5)
    r = (xc - n * _LN2_HI) - n * _LN2_LO
    c, r2 = _EXP_COEFFS, r * r
    # The 1 is added last: the sum of the small terms (≤ 0.42) is rounded once before it, which keeps the
    # error at 8e-8 (adding (1 + r) to the rest rounds twice at full magnitude: 1.7e-7).
    p = c[0] + (r + (r2 * (c[2] + c[3] * r) + (r2 * r2) * ((c[4] + c[5] * r) + r2 * (c[6] + c[7] * r))))
    return mx.where(x < -87.0, 0.0, p * mx.left_shift(n.astype(mx.int32) + 127, 23).view(mx.float32))


def _first(a):
    # custom_function passes a lone primal / output / cotangent as the array itself, several as a tuple.
    return a[0] if isinstance(a, (list, tuple)) else a


@mx.custom_function
def _silu_poly(x: mx.array) -> mx.array:
    xf = x.astype(mx.float32)
    return (xf / (1.0 + exp_poly(-xf))).astype(x.dtype)


@_silu_poly.vjp
def _silu_poly_vjp(primals, cotangent, outputs):
    x0 = _first(primals)
    x = x0.astype(mx.float32)
    s = 1.0 / (1.0 + exp_poly(-x))
    return ((_first(cotangent).astype(mx.float32) * s * (1.0 + x * (1.0 - s))).astype(x0.dtype),)


@mx.custom_function
def _softmax_poly(s: mx.array) -> mx.array:
    e = exp_poly(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@_softmax_poly.vjp
def _softmax_poly_vjp(primals, cotangent, outputs):
    p, g = _first(outputs), _first(cotangent).astype(mx.float32)
    return (p * (g - (g * p).sum(axis=-1, keepdims=True)),)


# SiLU and softmax (float32, last axis) dispatch in zrecipe.native: its compiled kernels on the CPU where
# loaded, the polynomial-exp versions above otherwise, MLX's own on a GPU; each with its exact gradient.
silu = native.silu
softmax = native.softmax


_swiglu = mx.compile(lambda a, b: silu(a) * b)


def swiglu(a: mx.array, b: mx.array) -> mx.array:
    """silu(a) · b as one fused pass."""
    return _swiglu(a, b)


# -- full-matrix attention (CPU inference) ---------------------------------------------------------------


def _attention_math(q, k, v, scale, mask):
    B, H, L, D = q.shape
    rep = H // k.shape[1]
    if rep > 1:  # GQA: query heads j·rep … j·rep+rep−1 share kv head j (transformers' repeat_kv order)
        q, k, v = q.reshape(B, k.shape[1], rep, L, D), k[:, :, None], v[:, :, None]
        if mask is not None:
            mask = (
                mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(B, k.shape[1], rep, *mask.shape[2:])
            )
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    out = softmax(scores).astype(v.dtype) @ v
    return out.reshape(B, H, L, D)


_attention_nomask = mx.compile(lambda q, k, v, scale: _attention_math(q, k, v, scale, None))
_attention_masked = mx.compile(_attention_math)


def full_matrix_attention(q, k, v, scale: float, mask: mx.array | None = None) -> mx.array:
    """Softmax attention as one (B, H, L, S) score matrix with the CPU softmax (`softmax`; inference)."""
    if mask is None:
        return _attention_nomask(q, k, v, scale)
    return _attention_masked(q, k, v, scale, mask)


# -- blockwise attention (training, long sequences) ------------------------------------------------------


def block_rows(batch: int, heads: int, queries: int, keys: int, budget: int | None = None) -> int:
    """Query rows per block: a multiple of BLOCK_ROW_MULTIPLE whose (batch, heads, rows, keys) score tile
    has at most `budget` (default BLOCK_ELEMENTS) elements; all `queries` when they fit in one tile."""
    budget = BLOCK_ELEMENTS if budget is None else budget
    rows = budget // max(1, batch * heads * keys) // BLOCK_ROW_MULTIPLE * BLOCK_ROW_MULTIPLE
    return min(queries, max(BLOCK_ROW_MULTIPLE, rows))


def _masked_scores(q, k, scale, mask):
    s = ((q * scale) @ k.swapaxes(-1, -2)).astype(mx.float32)
    return s if mask is None else mx.where(mask, s, mx.finfo(mx.float32).min)


def _forward_block(q, k, v, mask, scale, exp):
    """One query block against all keys → (output, per-row log-sum-exp)."""
    s = _masked_scores(q, k, scale, mask)
    m = s.max(axis=-1, keepdims=True)
    e = exp(s - m)
    total = e.sum(axis=-1, keepdims=True)
    # Normalise the (rows, D) output rather than the (rows, keys) probabilities: fewer multiplies.
    out = ((e.astype(v.dtype) @ v).astype(mx.float32) / total).astype(v.dtype)
    return out, (m + mx.log(total))[..., 0]


def _backward_block(q, k, v, mask, o, lse, d_o, scale, exp):
    """Gradients of one query block: dq for its rows, its contributions to dk and dv."""
    s = _masked_scores(q, k, scale, mask)
    p = exp(s - lse[..., None])  # the forward's probabilities, recomputed (0 where masked)
    d_v = p.astype(d_o.dtype).swapaxes(-1, -2) @ d_o
    d_p = (d_o @ v.swapaxes(-1, -2)).astype(mx.float32)
    row = (d_o.astype(mx.float32) * o.astype(mx.float32)).sum(axis=-1, keepdims=True)  # Σ_j p·dp = dO·O
    d_s = (p * (d_p - row)).astype(q.dtype)
    d_q = (d_s @ k) * scale
    d_k = (d_s.swapaxes(-1, -2) @ q) * scale
    return d_q, d_k, d_v


def _row_slice(x: mx.array, start: int, stop: int, axis: int = 2) -> mx.array:
    """Rows [start, stop) of axis 2 (broadcast axes of size 1 are kept whole)."""
    if x.shape[axis] == 1:
        return x
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


def _exp_kernel() -> str:
    """Which exp the blockwise attention uses now: `native`, `poly` (CPU fallback) or `mlx` (GPU)."""
    if native.in_use():
        return "native"
    return "poly" if on_cpu() else "mlx"


_EXPS = {"native": native.exp, "poly": exp_poly, "mlx": lambda x: mx.exp(x)}


@functools.cache
def _blockwise_function(scale: float, rows: int, masked: bool, kernel: str):
    """The custom-VJP blockwise attention for one (scale, block height, mask presence, exp kernel).

    Blocks are chained with `mx.depends` (block i+1 starts after block i's results exist): without it MLX's
    scheduler may compute every block's scores before reducing any, which is the O(N²) memory this avoids.
    """
    exp = _EXPS[kernel]  # no gradient rule needed: the VJP below differentiates by hand
    fwd = mx.compile(functools.partial(_forward_block, scale=scale, exp=exp))
    bwd = mx.compile(functools.partial(_backward_block, scale=scale, exp=exp))

    def bounds(length: int) -> list[tuple[int, int]]:
        return [(r, min(r + rows, length)) for r in range(0, length, rows)]

    @mx.custom_function
    def attend(q, k, v, mask):
        outs, lses, done = [], [], []
        for start, stop in bounds(q.shape[2]):
            q_i = _row_slice(q, start, stop)
            if done:
                q_i = mx.depends(q_i, done)
            o_i, lse_i = fwd(q_i, k, v, _row_slice(mask, start, stop) if masked else None)
            outs.append(o_i)
            lses.append(lse_i)
            done = [o_i, lse_i]
        out, lse = (
            (outs[0], lses[0]) if len(outs) == 1 else (mx.concatenate(outs, 2), mx.concatenate(lses, 2))
        )
        return mx.depends(out, [lse]), lse  # lse too is finished with the blocks, not left for the backward

    @attend.vjp
    def attend_vjp(primals, cotangents, outputs):
        q, k, v, mask = primals
        o, lse = outputs
        d_out = cotangents[0]
        # Every block, the first too, depends on earlier results: under mx.compile an identical first-block
        # score matmul would be merged with the forward's (common subexpressions), which would keep that
        # (B, H, rows, S) tile alive from the forward to the backward.
        d_q, d_k, d_v, done = [], None, None, [d_out]
        for start, stop in bounds(q.shape[2]):
            q_i = mx.depends(_row_slice(q, start, stop), done)
            dq_i, dk_i, dv_i = bwd(
                q_i, k, v, _row_slice(mask, start, stop) if masked else None,
                _row_slice(o, start, stop), _row_slice(lse, start, stop), _row_slice(d_out, start, stop),
            )  # fmt: skip
            d_q.append(dq_i)
            d_k = dk_i if d_k is None else d_k + dk_i
            d_v = dv_i if d_v is None else d_v + dv_i
            done = [dq_i, d_k, d_v]
        d_q = d_q[0] if len(d_q) == 1 else mx.concatenate(d_q, axis=2)
        # The layer below needs d_q at once, while d_k / d_v of the last block could be left for later by
        # MLX's scheduler, holding that block's (rows, S) temporaries: tie them to d_q.
        d_k, d_v = d_k.astype(k.dtype), d_v.astype(v.dtype)
        return mx.depends(d_q, [d_k, d_v]), d_k, d_v, mx.zeros_like(mask)

    return attend


def _equal_heads(q, k, v, mask):
    """k, v and the mask with one head per query head (GQA's kv heads repeated: a (B, H, S, D) copy, not an
    N² one); the mask with four axes."""
    H = q.shape[1]
    if k.shape[1] != H:
        k, v = mx.repeat(k, H // k.shape[1], axis=1), mx.repeat(v, H // k.shape[1], axis=1)
    if mask is not None:
        while mask.ndim < 4:
            mask = mask[None]
        if mask.shape[1] not in (1, H):  # per-kv-head masks of a GQA call: one per query head
            mask = mx.repeat(mask, H // mask.shape[1], axis=1)
    return k, v, mask


def blockwise_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None, rows: int | None = None
) -> mx.array:
    """Softmax attention computed in query blocks, with O(N) training memory (see the module docstring).

    Same contract as `attention`. The forward keeps only the output and each row's log-sum-exp; the VJP
    recomputes a block's scores to get its probabilities back. `rows`: block height (default `block_rows`).
    """
    k, v, mask = _equal_heads(q, k, v, mask)
    B, H, L, _ = q.shape
    rows = rows or block_rows(B, H, L, k.shape[2])
    masked = mask is not None
    if not masked:
        mask = mx.zeros((1,), mx.bool_)  # custom functions take arrays only; unused
    return _blockwise_function(float(scale), int(rows), masked, _exp_kernel())(q, k, v, mask)[0]


def flash_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None = None, rows: int | None = None
) -> mx.array:
    """The compiled flash attention (`zrecipe.native.flash_attention`; same contract as `attention`), where
    `native.flash_attention_available`; otherwise `blockwise_attention`, its pure-MLX equivalent. `rows`:
    query rows per tile (default: chosen by each implementation)."""
    if not native.flash_attention_available(q, k, v):
        return blockwise_attention(q, k, v, scale, mask, rows)
    k, v, mask = _equal_heads(q, k, v, mask)
    return native.flash_attention(q, k, v, float(scale), mask, rows or 0)


def fused_backward_available(q: mx.array, k: mx.array) -> bool:
    """Whether MLX's fused `scaled_dot_product_attention` also has a fused (O(N)) backward for these
    arrays: only on CUDA (cuDNN), for float16/bfloat16, head width a multiple of 8 up to 128, and a query
    length that is a multiple of 128 (MLX 0.32, `ScaledDotProductAttentionVJP::use_fallback`). On Metal
    and the CPU its backward is the unfused one, which keeps (B, H, L, S) probabilities per call."""
    return (
        mx.cuda.is_available()
        and not on_cpu()
        and q.dtype in (mx.float16, mx.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 128
        and q.shape[2] % 128 == 0
    )


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    mask: mx.array | None = None,
    *,
    training: bool = False,
) -> mx.array:
    """Softmax attention; q (B,H,L,D), k/v (B,Hkv,S,D) with H a multiple of Hkv, boolean mask (True =
    attend) broadcastable to (B,H,L,S). Same contract as `mx.fast.scaled_dot_product_attention`.

    `training`: the result will be differentiated, so memory must stay O(N). Dispatch:
    - GPU: MLX's fused kernel, except in training where its backward would not be fused (see
      `fused_backward_available`): then `blockwise_attention`;
    - CPU with the compiled kernels and float32 arrays: `flash_attention` (measured faster than the
      full-matrix softmax at every size from 300 to 4,224 tokens, benchmarks/RESULTS.md);
    - CPU otherwise: `blockwise_attention` in training and for large problems; the full-matrix softmax
      for small inference.
    """
    if not on_cpu():
        if not training or fused_backward_available(q, k):
            return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return blockwise_attention(q, k, v, scale, mask)
    if mask is not None:
        while mask.ndim < 4:
            mask = mask[None]
    B, H, L, _ = q.shape
    if native.flash_attention_available(q, k, v) or training or B * H * L * k.shape[2] > FULL_MATRIX_ELEMENTS:
        return flash_attention(q, k, v, scale, mask)
    return full_matrix_attention(q, k, v, scale, mask)


@contextmanager
def inference(module: nn.Module):
    """Run `module` with `training` off (attention takes its inference path: on a GPU MLX's fused kernel,
    which keeps no probabilities since nothing is differentiated), restoring its mode afterwards. Anything
    that is not an nn.Module (a stand-in callable) is used as it is."""
    if not isinstance(module, nn.Module):
        yield module
        return
    training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(training)
