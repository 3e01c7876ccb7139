"""The Z-Image flow-matching Euler sampler with classifier-free guidance, shared by generation and samples.

Mirrors diffusers' `ZImagePipeline` + `FlowMatchEulerDiscreteScheduler` exactly (fp32 schedule arithmetic,
the same model time, the same CFG normalisation and truncation rules), so that the same initial noise and
prompt embeddings give the same latents:

- sigmas `linspace(1, 1/N, N)`, shifted `s·σ/(1+(s−1)σ)` (or the dynamic `exp(μ)/(exp(μ)+(1/σ−1))` with
  μ from the image sequence length when the scheduler config asks for it), then a final 0;
- model time `t = (1000 − 1000σ)/1000` (= 1 − σ), model output negated into the velocity `v`;
- Euler `x += (σ_next − σ)·v`, always in fp32;
- CFG (Z-Image convention, active when g > 0): `pos + g·(pos − neg)`, positive and negative batched in one
  transformer call; normalisation clips ‖pred‖ to k·‖pos‖ per item; truncation drops guidance on steps whose
  normalised time `1 − σ` exceeds the threshold.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from zrecipe.backend import blas_threads, cpu_lanes, lane_blas_threads, lane_bounds, lane_streams
from zrecipe.errors import ModelError
from zrecipe.models.z_image.kernels import inference

# The schedulers' training horizon; ZImagePipeline hard-codes 1000 in its time conversion too.
_NUM_TRAIN_TIMESTEPS = 1000


@dataclass(frozen=True)
class SchedulerConfig:
    """The parts of `scheduler/scheduler_config.json` that change the sampling schedule."""

    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    num_train_timesteps: int = _NUM_TRAIN_TIMESTEPS

    @classmethod
    def from_dict(cls, data: dict, where: str = "scheduler_config.json") -> SchedulerConfig:
        """Build from a scheduler config dict; unknown keys are tolerated, unsupported schedules refused."""
        for flag in (
            "use_karras_sigmas",
            "use_exponential_sigmas",
            "use_beta_sigmas",
            "invert_sigmas",
            "stochastic_sampling",
        ):
            if data.get(flag):
                raise ModelError(f"{where}: `{flag}: true` is not supported by zrecipe's Z-Image sampler.")
        kind = data.get("time_shift_type", "exponential")
        if kind not in ("exponential", "linear"):
            raise ModelError(f"{where}: time_shift_type must be 'exponential' or 'linear', got {kind!r}.")

        def num(key, default):
            value = data.get(key)
            return default if value is None else value

        return cls(
            shift=float(num("shift", 1.0)),
            use_dynamic_shifting=bool(data.get("use_dynamic_shifting", False)),
            base_shift=float(num("base_shift", 0.5)),
            max_shift=float(num("max_shift", 1.15)),
            base_image_seq_len=int(num("base_image_seq_len", 256)),
            max_image_seq_len=int(num("max_image_seq_len", 4096)),
            time_shift_type=kind,
            shift_terminal=None if not data.get("shift_terminal") else float(data["shift_terminal"]),
            num_train_timesteps=int(num("num_train_timesteps", _NUM_TRAIN_TIMESTEPS)),
        )

    def mu(self, image_seq_len: int) -> float:
        """The dynamic-shift μ for an image of `image_seq_len` patch tokens (diffusers' `calculate_shift`)."""
        m = (self.max_shift - self.base_shift) / (self.max_image_seq_len - self.base_image_seq_len)
        b = self.base_shift - m * self.base_image_seq_len
        return image_seq_len * m + b


def read_scheduler_config(model_path: str | Path) -> SchedulerConfig:
    """Read `scheduler/scheduler_config.json` of a model folder (defaults when the folder has none)."""
    path = Path(model_path) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        raise ModelError(f"{path}: scheduler config not found; is this a diffusers-layout Z-Image folder?")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"{path}: invalid JSON ({exc}).") from exc
    return SchedulerConfig.from_dict(data, where=str(path))


def read_scheduler_shift(model_path: str | Path) -> float:
    """The static `shift` of a model folder's scheduler config."""
    return read_scheduler_config(model_path).shift


def _torch_linspace(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded exactly as torch's CPU kernel (which ZImagePipeline's default sigmas use):
    a float32 step, values from both ends towards the middle."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(max(n - 1, 1)))
    idx = np.arange(n, dtype=np.float64)
    values = np.where(idx < n // 2, np.float64(s) + step * idx, np.float64(e) - step * (n - 1 - idx))
    return values.astype(np.float32)


def sigmas(
    steps: int,
    shift: float,
    use_dynamic_shifting: bool = False,
    mu: float | None = None,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
) -> np.ndarray:
    """The N+1 noise levels of an N-step schedule (float32, from 1 down to a final 0).

    Computed in float32 like diffusers so that the model sees bit-identical times.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = _torch_linspace(1.0, 1.0 / steps, steps)
    if use_dynamic_shifting:
        if mu is None:
            raise ValueError("mu is required when use_dynamic_shifting is set")
        head = math.exp(mu) if time_shift_type == "exponential" else mu
        shifted = (np.float32(head) / (np.float32(head) + (np.float32(1) / base - np.float32(1)))).astype(
            np.float32
        )
    else:
        shifted = (shift * base / (1 + (shift - 1) * base)).astype(np.float32)
    if shift_terminal:
        one_minus = 1 - shifted
        shifted = (1 - one_minus / (one_minus[-1] / (1 - shift_terminal))).astype(np.float32)
    return np.concatenate([shifted, np.zeros(1, np.float32)])


def schedule(steps: int, shift: float | SchedulerConfig, latent_hw: tuple[int, int]) -> np.ndarray:
    """Sigmas for `steps` steps; a `SchedulerConfig` with dynamic shifting derives μ from the latent size."""
    if not isinstance(shift, SchedulerConfig):
        return sigmas(steps, float(shift))
    seq_len = (latent_hw[0] // 2) * (latent_hw[1] // 2)  # patch tokens, as the pipeline counts them
    return sigmas(
        steps,
        shift.shift,
        shift.use_dynamic_shifting,
        shift.mu(seq_len),
        shift.time_shift_type,
        shift.shift_terminal,
    )


def model_times(sigma_values: np.ndarray, num_train_timesteps: int = _NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Model time 1 − σ for each step, with the pipeline's float32 rounding ((1000 − 1000σ)/1000)."""
    ts = sigma_values[:-1].astype(np.float32) * np.float32(num_train_timesteps)
    return (np.float32(1000) - ts) / np.float32(1000)


def _model_dtype(transformer) -> mx.Dtype:
    from mlx.utils import tree_flatten

    for _, value in tree_flatten(transformer.parameters()):
        if mx.issubdtype(value.dtype, mx.floating):
            return value.dtype
    return mx.float32


def guided_prediction(pos: mx.array, neg: mx.array, guidance: float, normalization: float) -> mx.array:
    """CFG in the Z-Image convention on fp32 outputs, with the optional per-item norm clip."""
    pred = pos + guidance * (pos - neg)
    if normalization > 0:
        axes = tuple(range(1, pos.ndim))
        pos_norm = mx.sqrt(mx.sum(pos * pos, axis=axes, keepdims=True))
        pred_norm = mx.sqrt(mx.sum(pred * pred, axis=axes, keepdims=True))
        limit = pos_norm * normalization
        pred = mx.where(pred_norm > limit, pred * (limit / pred_norm), pred)
    return pred


def _predict(transformer, x: mx.array, t: mx.array, caps: list, lanes: int) -> mx.array:
    """transformer(x, t, caps), with the batch split over `lanes` CPU streams when lanes > 1.

    The transformer masks batch padding, so each item's output does not depend on the items beside it;
    splitting changes only the matmul shapes (the last bits), not the result."""
    lanes = min(lanes, x.shape[0])
    if lanes == 1:
        return transformer(x, t, caps)
    outs = []
    for stream, (a, b) in zip(lane_streams(lanes), lane_bounds(x.shape[0], lanes), strict=True):
        with mx.stream(stream):
            outs.append(transformer(x[a:b], t[a:b], caps[a:b]))
    return mx.concatenate(outs)


def denoise(
    transformer,
    latents: mx.array,
    pos_embeds: list,
    neg_embeds: list | None,
    guidance: float,
    steps: int,
    shift: float | SchedulerConfig,
    cfg_normalization: bool | float = False,
    cfg_truncation: float | None = 1.0,
    callback: Callable[[int, int, mx.array], None] | None = None,
) -> mx.array:
    """Run the N-step Euler sampler from `latents` (B,16,H,W) noise; returns the final fp32 latents.

    `pos_embeds` / `neg_embeds` are lists of B caption embeddings (L_i, D). CFG runs when `guidance > 0`
    (negatives required then); `cfg_normalization` True means k = 1, a float is k itself. `callback(i,
    steps, latents)` is called after each step (progress bars, previews).
    """
    batch = latents.shape[0]
    if len(pos_embeds) != batch:
        raise ValueError(f"{len(pos_embeds)} prompt embeddings for a batch of {batch} latents")
    cfg = guidance > 0
    if cfg and (neg_embeds is None or len(neg_embeds) != batch):
        raise ValueError("guidance > 0 needs one negative prompt embedding per latent")
    norm_k = float(cfg_normalization) if cfg_normalization else 0.0
    sig = schedule(steps, shift, latents.shape[2:4])
    times = model_times(sig)
    # Truncation compares the normalised time (1 − σ) with the threshold, as ZImagePipeline does.
    truncate = cfg and cfg_truncation is not None and float(cfg_truncation) <= 1
    dtype = _model_dtype(transformer)
    x = latents.astype(mx.float32)
    # On the CPU, split each call's batch over two streams (elementwise work is one thread per stream), with
    # the BLAS threads shared out between them for the whole loop (each step evaluates inside it).
    lanes = cpu_lanes(batch * (2 if cfg else 1))
    with blas_threads(lane_blas_threads(lanes)), inference(transformer):
        for i in range(steps):
            g = 0.0 if truncate and float(times[i]) > float(cfg_truncation) else float(guidance)
            t = mx.array(np.full((batch,), times[i], np.float32))
            xin = x.astype(dtype)
            if cfg and g > 0:
                out = _predict(
                    transformer, mx.concatenate([xin, xin]), mx.concatenate([t, t]),
                    list(pos_embeds) + list(neg_embeds), lanes,
                ).astype(mx.float32)  # fmt: skip
                pred = guided_prediction(out[:batch], out[batch:], g, norm_k)
            else:
                pred = _predict(transformer, xin, t, list(pos_embeds), lanes).astype(mx.float32)
            dt = float(np.float32(sig[i + 1]) - np.float32(sig[i]))
            x = x + mx.array(dt, mx.float32) * (-pred)
            mx.eval(x)
            if callback is not None:
                callback(i, steps, x)
    return x
