"""Building blocks of diffusers' `AutoencoderKL` (Encoder / Decoder and their parts) in MLX.

Attribute names equal the diffusers module names so that parameter paths equal the checkpoint keys
(`encoder.down_blocks.1.resnets.0.conv_shortcut`, `decoder.mid_block.attentions.0.to_out.0`, ...).
Everything is channels-last (NHWC) inside; conv weights are OHWI (see `vae.sanitize`).
Reference: diffusers 0.42 `models/autoencoders/vae.py`, `resnet.py`, `unets/unet_2d_blocks.py`,
`downsampling.py`, `upsampling.py`, `attention_processor.py` (AttnProcessor2_0).
"""

from __future__ import annotations

import mlx.core as mx
from mlx import nn

from zrecipe import native
from zrecipe.models.z_image.kernels import attention, silu


def _group_norm_math(x, weight, bias, groups: int, eps: float, act: bool):
    # PyTorch semantics: statistics per (item, group) over H, W and the group's channels, in float32.
    b, h, w, c = x.shape
    g = x.astype(mx.float32).reshape(b, h * w, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = mx.square(g - mean).mean(axis=(1, 3), keepdims=True)
    y = ((g - mean) * mx.rsqrt(var + eps)).reshape(b, h, w, c) * weight + bias
    return (silu(y) if act else y).astype(x.dtype)


# One compiled pass for normalise + affine (+ SiLU) instead of ~8 eager passes over the feature map.
_group_norm = mx.compile(_group_norm_math)


class GroupNorm(nn.GroupNorm):
    """PyTorch-compatible GroupNorm whose statistics are always computed in float32.

    A group holds up to ~10⁸ values at 1024 px; upcasting makes the mean/variance independent of how a
    backend accumulates bf16 reductions (MLX's CPU reductions already accumulate in fp32: there the
    result is bit-identical). The fp32 result is cast back to the input dtype.
    """

    def __init__(self, num_groups: int, dims: int, eps: float):
        super().__init__(num_groups, dims, eps=eps, affine=True, pytorch_compatible=True)

    def __call__(self, x: mx.array, act: bool = False) -> mx.array:
        """GroupNorm of x (B,H,W,C); with `act`, SiLU of the result (fused). On the CPU with zrecipe's
        compiled kernels, float32: one native pass (`native.group_norm`, float64 statistics)."""
        if native.group_norm_available(x):
            return native.group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act)
        return _group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` (same parameters, same results) that, on the CPU with zrecipe's compiled kernels, never
    unfolds the whole input: MLX's CPU convolution copies every pixel KH·KW times first (1.5 GB for a
    512² map of 128 channels) and is slow at few channels; `native.conv2d` unfolds a tile at a time."""

    def __call__(self, x: mx.array) -> mx.array:
        sy, sx = self.stride
        py, px = self.padding
        if (self.dilation in (1, (1, 1)) and self.groups == 1 and sy == sx and py == px
                and native.conv2d_available(x, self.weight)):  # fmt: skip
            return native.conv2d(x, self.weight, sy, py, self["bias"] if "bias" in self else None)
        return super().__call__(x)


class ResnetBlock2D(nn.Module):
    """diffusers `ResnetBlock2D` without time embedding: norm-SiLU-conv twice plus a (1×1 conv) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        # diffusers adds the 1×1 shortcut only when the channel count changes.
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, kernel_size=1)

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(self.norm1(x, act=True))
        h = self.conv2(self.norm2(h, act=True))
        if "conv_shortcut" in self:
            x = self.conv_shortcut(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3×3 conv after an asymmetric zero pad of one pixel at the bottom and right (diffusers' padding=0)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def __call__(self, x: mx.array) -> mx.array:
        x = mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)])
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour ×2 upsampling followed by a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        x = mx.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return self.conv(x)


class Attention(nn.Module):
    """The VAE mid-block self-attention: one head over all pixels, GroupNorm first, residual added."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels, eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        # `to_out.1` is a Dropout in diffusers and has no parameters, so a one-element list keeps `to_out.0`.
        self.to_out = [nn.Linear(channels, channels)]

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        out = attention(q, k, v, scale=c**-0.5)
        out = self.to_out[0](out).reshape(b, h, w, c)
        return x + out


class MidBlock(nn.Module):
    """diffusers `UNetMidBlock2D` with one layer: resnet, (attention), resnet."""

    def __init__(self, channels: int, groups: int, eps: float, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(channels, channels, groups, eps) for _ in range(2)]
        # Without attention diffusers keeps `attentions = [None]`, which holds no parameters.
        self.attentions = [Attention(channels, groups, eps)] if add_attention else []

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`layers` resnets, then an optional downsampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, add_downsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers)
        ]
        if add_downsample:
            self.downsamplers = [Downsample2D(out_ch)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for down in self.get("downsamplers", []):
            x = down(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`layers` resnets, then an optional upsampler."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, eps: float, add_upsample: bool):
        super().__init__()
        self.resnets = [
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, eps) for i in range(layers)
        ]
        if add_upsample:
            self.upsamplers = [Upsample2D(out_ch)]

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        for up in self.get("upsamplers", []):
            x = up(x)
        return x


class Encoder(nn.Module):
    """Image (B,H,W,in) → moments (B,H/f,W/f,2·latent) where f = 2^(levels−1)."""

    def __init__(self, cfg) -> None:
        super().__init__()
        ch, groups, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        self.conv_in = Conv2d(cfg.in_channels, ch[0], kernel_size=3, padding=1)
        self.down_blocks = [
            DownEncoderBlock2D(
                ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups, eps, add_downsample=i < len(ch) - 1
            )
            for i in range(len(ch))
        ]
        self.mid_block = MidBlock(ch[-1], groups, eps, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, ch[-1], eps)
        self.conv_out = Conv2d(ch[-1], 2 * cfg.latent_channels, kernel_size=3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(self.conv_norm_out(x, act=True))


class Decoder(nn.Module):
    """Latents (B,h,w,latent) → image (B,h·f,w·f,out); one more resnet per level than the encoder."""

    def __init__(self, cfg) -> None:
        super().__init__()
        ch, groups, eps = cfg.block_out_channels, cfg.norm_num_groups, cfg.norm_eps
        rev = list(reversed(ch))
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], kernel_size=3, padding=1)
        self.mid_block = MidBlock(rev[0], groups, eps, cfg.mid_block_add_attention)
        self.up_blocks = [
            UpDecoderBlock2D(
                rev[max(i - 1, 0)],
                rev[i],
                cfg.layers_per_block + 1,
                groups,
                eps,
                add_upsample=i < len(ch) - 1,
            )
            for i in range(len(ch))
        ]
        self.conv_norm_out = GroupNorm(groups, ch[0], eps)
        self.conv_out = Conv2d(ch[0], cfg.out_channels, kernel_size=3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x, act=True))
