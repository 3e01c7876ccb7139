"""Building blocks of the Z-Image DiT, named exactly like diffusers' `ZImageTransformer2DModel` modules.

Module attribute names are the checkpoint key names (`attention.to_q`, `feed_forward.w1`,
`adaLN_modulation.0`, ...) so weights load without renames and LoRA targets read like the checkpoint.
Every Linear layer is a plain `nn.Linear` so LoRA wrappers / quantisation can replace it by path.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from mlx import nn

from zrecipe.models.z_image.kernels import attention, swiglu

# Fixed by the diffusers reference (not config keys): the timestep sinusoid width, its MLP's hidden width and
# the cap on the adaLN conditioning width (`min(dim, 256)`).
FREQ_EMBED_DIM = 256
T_EMBED_HIDDEN = 1024
ADALN_EMBED_DIM = 256
QK_NORM_EPS = 1e-5  # diffusers builds the q/k RMSNorms with eps 1e-5 regardless of `norm_eps`
FINAL_NORM_EPS = 1e-6


class TimestepEmbedder(nn.Module):
    """Sinusoid of the (already scaled) time, cos first then sin, through Linear·SiLU·Linear."""

    def __init__(self, out_size: int, mid_size: int = T_EMBED_HIDDEN):
        super().__init__()
        self.mlp = [nn.Linear(FREQ_EMBED_DIM, mid_size), nn.SiLU(), nn.Linear(mid_size, out_size)]

    @staticmethod
    def sinusoid(t: mx.array, dim: int = FREQ_EMBED_DIM, max_period: float = 10000.0) -> mx.array:
        half = dim // 2
        # Same op order as the reference (float32 exp of -log(P)·i/half) so the frequencies agree bit for bit.
        freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
        args = t.astype(mx.float32)[:, None] * freqs[None]
        emb = mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)
        if dim % 2:
            emb = mx.concatenate([emb, mx.zeros_like(emb[:, :1])], axis=-1)
        return emb

    def __call__(self, t: mx.array, dtype) -> mx.array:
        h = self.sinusoid(t).astype(dtype)
        for layer in self.mlp:
            h = layer(h)
        return h


class RopeTables:
    """Per-axis cos/sin tables of the 3-axis RoPE (not a Module: they are constants, not parameters).

    Angles are computed in float64 and rounded to float32 before cos/sin, like the reference, so positions
    up to ~1000 agree to float32 precision. `mx.fast.rope` cannot be used: its positions are `offset + index`
    along one axis, while Z-Image gives each token an arbitrary (caption/frame, row, column) triple.
    """

    def __init__(self, theta: float, axes_dims: tuple[int, ...], axes_lens: tuple[int, ...]):
        self.axes_dims, self.axes_lens = tuple(axes_dims), tuple(axes_lens)
        self.cos, self.sin = [], []
        for d, n in zip(axes_dims, axes_lens, strict=True):
            freqs = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
            angles = np.outer(np.arange(n, dtype=np.float64), freqs).astype(np.float32)
            self.cos.append(mx.array(np.cos(angles)))
            self.sin.append(mx.array(np.sin(angles)))

    def __call__(self, pos: mx.array) -> tuple[mx.array, mx.array]:
        """pos (B, N, n_axes) int32 → cos, sin of shape (B, N, 1, head_dim/2) (the 1 broadcasts over heads)."""
        cos = mx.concatenate([mx.take(c, pos[..., a], axis=0) for a, c in enumerate(self.cos)], axis=-1)
        sin = mx.concatenate([mx.take(s, pos[..., a], axis=0) for a, s in enumerate(self.sin)], axis=-1)
        return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) — the reference's complex multiply — in float32."""
    shape, dtype = x.shape, x.dtype
    pairs = x.astype(mx.float32).reshape(*shape[:-1], -1, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = mx.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(shape).astype(dtype)


@mx.compile
def _norm_rope(x, weight, cos, sin):
    """Per-head RMSNorm, RoPE and the (B,N,H,D) → (B,H,N,D) transpose in one compiled chain."""
    return apply_rope(mx.fast.rms_norm(x, weight, QK_NORM_EPS), cos, sin).transpose(0, 2, 1, 3)


@mx.compile
def _rope_t(x, cos, sin):
    return apply_rope(x, cos, sin).transpose(0, 2, 1, 3)


@mx.compile
def _norm_scale(x, weight, eps, scale):
    """rms_norm(x) · (1 + scale): the adaLN-modulated input of attention / FFN."""
    return mx.fast.rms_norm(x, weight, eps) * (1.0 + scale)


@mx.compile
def _gated_add(x, gate, y, weight, eps):
    """x + tanh(gate) · rms_norm(y): the gated sandwich-norm residual."""
    return x + mx.tanh(gate) * mx.fast.rms_norm(y, weight, eps)


@mx.compile
def _norm_add(x, y, weight, eps):
    return x + mx.fast.rms_norm(y, weight, eps)


class Attention(nn.Module):
    """Self-attention with per-head q/k RMSNorm and RoPE; K/V use all `n_heads` (like diffusers)."""

    def __init__(self, dim: int, n_heads: int, qk_norm: bool):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = [nn.Linear(dim, dim, bias=False)]
        if qk_norm:
            self.norm_q = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS)
            self.norm_k = nn.RMSNorm(self.head_dim, eps=QK_NORM_EPS)
        self.qk_norm = qk_norm

    def __call__(self, x: mx.array, mask: mx.array | None, rope: tuple[mx.array, mx.array]) -> mx.array:
        B, N, _ = x.shape
        q = self.to_q(x).reshape(B, N, self.n_heads, self.head_dim)
        k = self.to_k(x).reshape(B, N, self.n_heads, self.head_dim)
        v = self.to_v(x).reshape(B, N, self.n_heads, self.head_dim)
        if self.qk_norm:
            q, k = _norm_rope(q, self.norm_q.weight, *rope), _norm_rope(k, self.norm_k.weight, *rope)
        else:
            q, k = _rope_t(q, *rope), _rope_t(k, *rope)
        # `training` (nn.Module's flag, on unless `.eval()`): attention whose memory stays O(N) under
        # differentiation (kernels.attention); the transformer is the one network zrecipe trains.
        out = attention(q, k, v.transpose(0, 2, 1, 3), self.head_dim**-0.5, mask, training=self.training)
        return self.to_out[0](out.transpose(0, 2, 1, 3).reshape(B, N, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), hidden width `int(dim / 3 * 8)` (the reference's float arithmetic)."""

    def __init__(self, dim: int):
        super().__init__()
        hidden = int(dim / 3 * 8)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class TransformerBlock(nn.Module):
    """Sandwich-normed attention + FFN; with `modulation`, adaLN scales (1+s) and tanh gates, no shift."""

    def __init__(self, dim: int, n_heads: int, norm_eps: float, qk_norm: bool, modulation: bool = True):
        super().__init__()
        self.attention = Attention(dim, n_heads, qk_norm)
        self.feed_forward = FeedForward(dim)
        self.attention_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps)
        self.attention_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = [nn.Linear(min(dim, ADALN_EMBED_DIM), 4 * dim)]

    def __call__(self, x, mask, rope, adaln: mx.array | None = None) -> mx.array:
        eps = self.attention_norm1.eps
        if not self.modulation:
            x = _norm_add(
                x, self.attention(self.attention_norm1(x), mask, rope), self.attention_norm2.weight, eps
            )
            return _norm_add(x, self.feed_forward(self.ffn_norm1(x)), self.ffn_norm2.weight, eps)
        scale_msa, gate_msa, scale_mlp, gate_mlp = mx.split(
            self.adaLN_modulation[0](adaln)[:, None], 4, axis=-1
        )
        attn = self.attention(_norm_scale(x, self.attention_norm1.weight, eps, scale_msa), mask, rope)
        x = _gated_add(x, gate_msa, attn, self.attention_norm2.weight, eps)
        ffn = self.feed_forward(_norm_scale(x, self.ffn_norm1.weight, eps, scale_mlp))
        return _gated_add(x, gate_mlp, ffn, self.ffn_norm2.weight, eps)


class FinalLayer(nn.Module):
    """LayerNorm (no affine) scaled by 1 + Linear(SiLU(c)), then Linear to the patch width."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = [nn.SiLU(), nn.Linear(min(dim, ADALN_EMBED_DIM), dim)]

    def __call__(self, x: mx.array, c: mx.array) -> mx.array:
        scale = 1.0 + self.adaLN_modulation[1](nn.silu(c))
        x = mx.fast.layer_norm(x, None, None, FINAL_NORM_EPS) * scale[:, None]
        return self.linear(x)
