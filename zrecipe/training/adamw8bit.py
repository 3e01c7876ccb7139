"""AdamW with 8-bit moments: bitsandbytes' `AdamW8bit` (block-wise dynamic quantisation) in MLX.

The first and second moments of every tensor with at least `min_8bit_size` elements are stored as one
uint8 code per element plus one float32 absmax per block of 256 elements: 2 + 8/256 bytes per parameter
instead of 8 (fp32 m and v). A step dequantises both moments, applies bitsandbytes' fp32 Adam update
(decoupled weight decay, bias-corrected) and quantises them again; smaller tensors keep fp32 moments and
the same update, as bitsandbytes does.

The codes are the *dynamic* data type of Dettmers' 8-bit optimisers (arXiv:1511.04561, 2110.02861): per
decade 10^(i−6), i = 0..6, a linear grid of midpoints in [0.1, 1] whose resolution doubles with i; the
first moment uses the signed map (both signs), the second the unsigned one (twice the resolution).
Quantising picks the nearest code of x / absmax (bitsandbytes' reference backend: a bucketize on the
midpoints between codes), found here with an 8-step binary search over the 255 midpoints.
"""

from __future__ import annotations

import math
from functools import cache

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

BLOCK_SIZE = 256  # bitsandbytes' block size for optimiser states
MIN_8BIT_SIZE = 4096  # bitsandbytes' default: smaller tensors keep fp32 moments


def dynamic_map(signed: bool) -> np.ndarray:
    """The 256 sorted float32 codes of the dynamic data type (max 7 exponent bits, 8 bits in all)."""
    values = [0.0, 1.0]
    for i in range(7):
        intervals = 2**i if signed else 2 ** (i + 1)
        edges = _linspace32(0.1, 1.0, intervals + 1)
        midpoints = (edges[:-1] + edges[1:]) / np.float32(2)
        level = (10.0 ** (i - 6) * midpoints).astype(np.float32)
        values += level.tolist() + ((-level).tolist() if signed else [])
    codes = np.sort(np.array(values, dtype=np.float32))
    assert codes.size == 256
    return codes


def _linspace32(start: float, end: float, count: int) -> np.ndarray:
    """float32 points from `start` to `end` as PyTorch's CPU `linspace` places them (the first half counted
    from the start, the rest from the end, each one rounding of a fused multiply-add), so that the codes
    are bitsandbytes' to the last bit."""
    lo, hi = np.float32(start), np.float32(end)
    step = np.float64((hi - lo) / np.float32(count - 1))
    i = np.arange(count)
    up = (np.float64(lo) + step * i).astype(np.float32)
    down = (np.float64(hi) - step * (count - 1 - i)).astype(np.float32)
    return np.where(i < count // 2, up, down)


@cache
def _tables(signed: bool) -> tuple[mx.array, mx.array]:
    """(codes, midpoints between neighbouring codes) as MLX arrays."""
    codes = dynamic_map(signed)
    return mx.array(codes), mx.array((codes[:-1] + codes[1:]) / np.float32(2))


def quantize_blockwise(x: mx.array, signed: bool) -> tuple[mx.array, mx.array]:
    """(uint8 codes shaped like `x`, float32 absmax per block of 256 flattened elements)."""
    _, bounds = _tables(signed)
    flat = x.reshape(-1).astype(mx.float32)
    n = flat.size
    blocks = -(-n // BLOCK_SIZE)
    rows = mx.pad(flat, (0, blocks * BLOCK_SIZE - n)).reshape(blocks, BLOCK_SIZE)
    absmax = mx.max(mx.abs(rows), axis=1)
    safe = mx.where(absmax > 0, absmax, 1.0)[:, None]  # an all-zero block scales to zeros
    scaled = rows * (1.0 / safe)
    if n % BLOCK_SIZE:  # bitsandbytes divides the last, partial block instead of multiplying
        last = mx.arange(blocks)[:, None] == blocks - 1
        scaled = mx.where(last, rows / safe, scaled)
    scaled = mx.clip(scaled, -1.0, 1.0)
    # index = how many midpoints lie below the value: the nearest code (ties go to the lower one)
    index = mx.zeros(scaled.shape, dtype=mx.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        candidate = index + step
        below = mx.take(bounds, mx.minimum(candidate, 255) - 1) < scaled
        index = mx.where((candidate <= 255) & below, candidate, index)
    codes = index.astype(mx.uint8).reshape(-1)[:n].reshape(x.shape)
    return codes, absmax


def dequantize_blockwise(codes: mx.array, absmax: mx.array, signed: bool) -> mx.array:
    """float32 values code[q] · absmax of each element's block."""
    table, _ = _tables(signed)
    n = codes.size
    blocks = absmax.shape[0]
    values = mx.take(table, codes.reshape(-1).astype(mx.int32))
    values = mx.pad(values, (0, blocks * BLOCK_SIZE - n)).reshape(blocks, BLOCK_SIZE) * absmax[:, None]
    return values.reshape(-1)[:n].reshape(codes.shape)


def quantized(size: int, min_8bit_size: int) -> bool:
    """Whether a tensor of `size` elements keeps 8-bit moments."""
    return size >= min_8bit_size


def state_bytes(size: int, min_8bit_size: int) -> int:
    """Bytes of the moments of one tensor of `size` elements."""
    if quantized(size, min_8bit_size):
        return 2 * (size + 4 * -(-size // BLOCK_SIZE))
    return 2 * 4 * size


class AdamW8bit(optim.Optimizer):
    """bitsandbytes' `AdamW8bit` update on block-quantised moments (see the module docstring):

        m ← β1·m + (1−β1)·g;  v ← β2·v + (1−β2)·g²;  p ← p·(1 − lr·λ)
        p ← p − lr/(1−β1^t) · m / (√v / √(1−β2^t) + ε)

    computed in float32 and written back in the parameter's dtype. State per tensor: `m_q`, `v_q` (uint8)
    and `m_absmax`, `v_absmax` (float32 per block), or fp32 `m`, `v` below `min_8bit_size` elements."""

    def __init__(
        self, learning_rate, betas: list[float], eps: float, weight_decay: float, min_8bit_size: int
    ):
        super().__init__()
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas, self.eps, self.weight_decay = list(betas), float(eps), float(weight_decay)
        self.min_8bit_size = int(min_8bit_size)
        self._log_betas = [math.log(b) if b > 0 else -math.inf for b in betas]

    def init_single(self, parameter: mx.array, state: dict) -> None:
        if quantized(parameter.size, self.min_8bit_size):
            blocks = -(-parameter.size // BLOCK_SIZE)
            for name in ("m", "v"):
                state[f"{name}_q"] = mx.zeros(parameter.shape, dtype=mx.uint8)
                state[f"{name}_absmax"] = mx.zeros((blocks,), dtype=mx.float32)
        else:
            state["m"] = mx.zeros(parameter.shape, dtype=mx.float32)
            state["v"] = mx.zeros(parameter.shape, dtype=mx.float32)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        lr = self.learning_rate.astype(mx.float32)
        b1, b2 = self.betas
        t = self.step.astype(mx.float32)
        correction1 = -mx.expm1(t * self._log_betas[0])  # 1 − β^t without float32 cancellation
        correction2 = mx.sqrt(-mx.expm1(t * self._log_betas[1]))
        g = gradient.astype(mx.float32)
        p = parameter.astype(mx.float32)
        eight_bit = "m_q" in state
        if eight_bit:
            m = dequantize_blockwise(state["m_q"], state["m_absmax"], signed=True)
            v = dequantize_blockwise(state["v_q"], state["v_absmax"], signed=False)
        else:
            m, v = state["m"], state["v"]
        m = m * b1 + g * (1 - b1)
        v = v * b2 + (g * g) * (1 - b2)
        if self.weight_decay > 0:
            p = p * (1 - lr * self.weight_decay)
        if eight_bit:
            p = p + (-lr / correction1) * (m / (mx.sqrt(v) / correction2 + self.eps))
            state["m_q"], state["m_absmax"] = quantize_blockwise(m, signed=True)
            state["v_q"], state["v_absmax"] = quantize_blockwise(v, signed=False)
        else:  # bitsandbytes' 32-bit kernel for small tensors: the same update, ε scaled instead
            p = p + (-lr * correction2 / correction1) * (m / (mx.sqrt(v) + self.eps * correction2))
            state["m"], state["v"] = m, v
        return p.astype(parameter.dtype)
