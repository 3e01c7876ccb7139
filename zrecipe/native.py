"""Fast float32 exp, SiLU, softmax, attention and GroupNorm on the CPU: zrecipe's compiled kernels, or the pure-MLX path.

MLX's x86 CPU backend evaluates `exp` one float at a time (~25 ns per element against ~0.5 ns for a
multiply), which made softmax and SiLU a large share of a CPU training step. `zrecipe._native` (built from
csrc/ at install time) provides them as MLX primitives with vectorised kernels (AVX-512 / AVX2+FMA chosen
at run time, SSE2 or NEON otherwise) and VJPs of their own, usable under `mx.compile`, `mx.grad` and
`mx.vmap` like any MLX op. Where the module is missing, cannot be loaded, or is switched off
(`ZRECIPE_NATIVE=off`), the same functions use the pure-MLX kernels (`exp_poly` & co.); both paths meet
the same numerical contract (relative error ~1e-7 against float64), and `status()` says which is in use
(`zrecipe doctor` prints it). On Metal/CUDA they are MLX's own `exp` / `silu` / `softmax`.

Loading is refused, with the reason in `status()`, when the module was built against another mlx version
than the one running (libmlx's C++ interface is not stable across versions): reinstalling zrecipe
rebuilds it.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from types import ModuleType

import mlx.core as mx

BUILD_RECORD = Path(__file__).with_name("_native_build.json")  # written by setup.py next to the module
_OFF = ("0", "off", "false", "no")


@cache
def _load() -> tuple[ModuleType | None, str]:
    """(the loaded module or None, one line saying what happened)."""
    if os.environ.get("ZRECIPE_NATIVE", "").strip().lower() in _OFF:
        return None, "off (ZRECIPE_NATIVE=off)"
    try:
        record = json.loads(BUILD_RECORD.read_text())
    except FileNotFoundError:
        return None, "not built: this installation has no native build (reinstall zrecipe to build it)"
    except (OSError, ValueError) as error:
        return None, f"not loaded: unreadable build record {BUILD_RECORD}: {error}"
    if not record.get("built"):
        return None, f"not built: {record.get('reason', 'no reason recorded')}"
    built_for = record.get("mlx_version")
    if built_for != mx.__version__:
        return None, (
            f"not loaded: built against mlx {built_for}, running mlx {mx.__version__} "
            "(reinstall zrecipe to rebuild it)"
        )
    try:
        from zrecipe import _native
    except ImportError as error:
        return None, f"not loaded: {error}"
    try:  # mx.array must cross into the module (same nanobind ABI as mlx.core) and the kernels must run
        probe = _native.exp(mx.array([0.0, 1.0], dtype=mx.float32))
        mx.eval(probe)
        ok = abs(probe[0].item() - 1.0) < 1e-6 and abs(probe[1].item() - 2.7182817) < 1e-5
    except (TypeError, ValueError, RuntimeError) as error:
        return None, f"not loaded: self-test failed ({type(error).__name__}: {str(error).splitlines()[0]})"
    if not ok:
        return None, "not loaded: self-test gave wrong values"
    return _native, f"loaded ({_native.isa()})"


def available() -> bool:
    """Whether the compiled kernels are loaded (and so used on the CPU)."""
    return _load()[0] is not None


def status() -> str:
    """`loaded (avx2)`, `off (...)`, `not built: <why>` or `not loaded: <why>`."""
    return _load()[1]


def in_use() -> bool:
    """Whether calls made now go to the compiled kernels: loaded, and MLX computing on the CPU."""
    return _module() is not None


def _module() -> ModuleType | None:
    """The compiled module when it should handle this call: loaded, and MLX computing on the CPU."""
    module = _load()[0]
    return module if module is not None and mx.default_device() == mx.cpu else None


def exp(x: mx.array) -> mx.array:
    """e^x in float32: exactly 0 below −87, e^88 (not inf) above 88 on the CPU."""
    module = _module()
    if module is not None:
        return module.exp(x.astype(mx.float32))
    from zrecipe.models.z_image.kernels import on_cpu

    return _exp_poly(x.astype(mx.float32)) if on_cpu() else mx.exp(x.astype(mx.float32))


@mx.custom_function
def _exp_poly(x: mx.array) -> mx.array:
    # exp_poly builds 2^n with a bit cast, which MLX cannot differentiate; e^x is its own derivative.
    from zrecipe.models.z_image.kernels import exp_poly

    return exp_poly(x)


@_exp_poly.vjp
def _exp_poly_vjp(primals, cotangent, outputs):
    return (cotangent * outputs,)


def silu(x: mx.array) -> mx.array:
    """x · sigmoid(x), computed in float32, returned in x's dtype."""
    module = _module()
    if module is not None:
        return module.silu(x.astype(mx.float32)).astype(x.dtype)
    from mlx import nn

    from zrecipe.models.z_image.kernels import _silu_poly, on_cpu

    return _silu_poly(x) if on_cpu() else nn.silu(x)


def flash_attention_available(*arrays: mx.array) -> bool:
    """Whether `flash_attention` runs now: compiled kernels loaded, MLX on the CPU, float32 arrays."""
    return _module() is not None and all(a.dtype == mx.float32 for a in arrays)


def flash_attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array | None, rows: int = 0
) -> mx.array:
    """Softmax attention in one compiled primitive with O(N) memory, forward and backward (csrc/
    flash_attention.h): q (B, H, L, D), k/v (B, H, S, D) float32, equal head counts; `mask` boolean with
    four axes (True = attend) or None; `rows` query rows per tile (0: chosen from the key count). Only
    where `flash_attention_available`."""
    module = _module()
    if module is None:
        raise RuntimeError("zrecipe.native.flash_attention: the compiled kernels are not in use")
    return module.flash_attention(q, k, v, scale, mask, rows=rows)[0]


def flash_attention_scratch_bytes(batch: int, heads: int, queries: int, keys: int, backward: bool) -> int:
    """Bytes of scratch one `flash_attention` call (or, `backward`, its VJP) takes while it runs (only
    where the compiled kernels are loaded)."""
    module = _load()[0]
    if module is None:
        raise RuntimeError(
            "zrecipe.native.flash_attention_scratch_bytes: the compiled kernels are not loaded"
        )
    return module.flash_attention_scratch_bytes(batch, heads, queries, keys, backward)


def group_norm_available(x: mx.array) -> bool:
    """Whether `group_norm` runs now for x: compiled kernels loaded, MLX on the CPU, float32."""
    return _module() is not None and x.dtype == mx.float32


def group_norm(x: mx.array, weight: mx.array, bias: mx.array, groups: int, eps: float, act: bool) -> mx.array:
    """GroupNorm of (B, H, W, C) float32 feature maps with PyTorch's statistics (per item and group, over
    H, W and the group's channels), affine, then SiLU when `act`; one compiled primitive (csrc/group_norm.h),
    differentiable. Only where `group_norm_available`."""
    module = _module()
    if module is None:
        raise RuntimeError("zrecipe.native.group_norm: the compiled kernels are not in use")
    f32 = mx.float32
    return module.group_norm(x, weight.astype(f32), bias.astype(f32), int(groups), float(eps), bool(act))


# Fewer input channels than this: the unfold copies rows too short to pay for per-tile products (the VAE's
# 3-channel conv_in took 4.1 ms against MLX's 2.0), so MLX's own convolution is used.
CONV2D_MIN_CHANNELS = 16


def conv2d_available(x: mx.array, weight: mx.array) -> bool:
    """Whether `conv2d` runs now for x and these OHWI weights: compiled kernels loaded, MLX on the CPU,
    float32, a kernel larger than 1×1 (a 1×1 convolution is a plain matrix product in MLX too) and at
    least CONV2D_MIN_CHANNELS input channels."""
    return (
        _module() is not None
        and x.dtype == mx.float32
        and weight.dtype == mx.float32
        and x.ndim == 4
        and weight.ndim == 4
        and weight.shape[1] * weight.shape[2] > 1
        and x.shape[-1] >= CONV2D_MIN_CHANNELS
    )


def conv2d(
    x: mx.array, weight: mx.array, stride: int, padding: int, bias: mx.array | None = None
) -> mx.array:
    """Convolution of (B, H, W, C) float32 maps with (O, KH, KW, C) weights (MLX's layouts), zero padding
    on every side, one stride for both axes, plus `bias` (O,) when given (added in the same pass) — MLX's
    `conv2d` without unfolding the whole input (one tile of output pixels per thread at a time:
    csrc/conv2d.h), differentiable. Only where `conv2d_available`."""
    module = _module()
    if module is None:
        raise RuntimeError("zrecipe.native.conv2d: the compiled kernels are not in use")
    if bias is not None:
        bias = bias.astype(mx.float32)
    return module.conv2d(x, weight, bias, int(stride), int(padding))


def conv2d_scratch_bytes(out_pixels: int, kernel_h: int, kernel_w: int, channels: int) -> int:
    """Bytes of scratch one `conv2d` call takes (every thread's unfolded tile)."""
    module = _load()[0]
    if module is None:
        raise RuntimeError("zrecipe.native.conv2d_scratch_bytes: the compiled kernels are not loaded")
    return module.conv2d_scratch_bytes(out_pixels, kernel_h, kernel_w, channels)


def compute_threads() -> int | None:
    """Threads one `flash_attention` call uses (None where the compiled kernels are not loaded)."""
    module = _load()[0]
    return module.compute_threads() if module is not None else None


def set_compute_threads(n: int) -> None:
    """Set the threads one `flash_attention` call uses (no-op where the compiled kernels are not loaded)."""
    module = _load()[0]
    if module is not None:
        module.set_compute_threads(int(n))


def softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, in float32."""
    module = _module()
    if module is not None:
        return module.softmax(x.astype(mx.float32))
    from zrecipe.models.z_image.kernels import _softmax_poly, on_cpu

    x = x.astype(mx.float32)
    return _softmax_poly(x) if on_cpu() else mx.softmax(x, axis=-1, precise=True)
