"""Training memory estimate and the seed's `MemoryOptimizer` API.

The estimate adds up, for a transformer config (tiny or real):
- weights: parameter count × bytes per dtype, or packed 4/8-bit Linears (+ a bf16 scale and bias per group
  of 64) with the small precision-sensitive layers kept in the compute dtype;
- training state: LoRA (fp32 A/B + gradients + AdamW m, v) or full (gradients, an accumulation buffer
  and AdamW m, v, all in the parameter dtype);
- activations kept for the backward pass, per token and block (`ACT_WIDTHS_*`, counted from the block's
  saved tensors and calibrated against `mx.get_peak_memory()`), plus the attention matrices MLX's
  attention backward rebuilds for one block at a time (a few heads × N² buffers, transient: the fused
  forward saves only q, k, v); with gradient checkpointing only the block inputs stay alive, plus one
  block's full activations during its recomputation.
Validated against measured peaks on tiny and small configs in tests/test_memory.py and benchmarks/RESULTS.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

GB = 1024**3
SEQ_MULTIPLE = 32
QUANT_GROUP = 64
VAE_FACTOR = 8
# The published Z-Image transformer config (diffusers defaults), used only when no model folder is given.
Z_IMAGE_CONFIG = {
    "all_patch_size": (2,), "all_f_patch_size": (1,), "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-5, "qk_norm": True,
    "cap_feat_dim": 2560, "rope_theta": 256.0, "t_scale": 1000.0, "axes_dims": (32, 48, 48),
    "axes_lens": (1024, 512, 512),
}  # fmt: skip
DEFAULT_LORA_TARGET = (
    "layers",
    ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0"),
    32,
)
# Activation widths per token and block kept for the backward pass, in units of `dim` and of the FFN
# hidden width (see module docstring). Calibrated once on a small config; validated on others.
ACT_DIM_WIDTHS = 20.0
ACT_HIDDEN_WIDTHS = 4.0
ATTN_TRANSIENT = 4.0  # (heads, N, N) buffers alive at once in one block's attention backward
FIXED_OVERHEAD_GB = 0.0


@dataclass(frozen=True)
class MemoryEstimate:
    """A training-memory estimate in GiB, by component."""

    mode: str
    batch_size: int
    tokens_per_item: int
    parameters: int
    trainable_parameters: int
    weights_gb: float
    training_state_gb: float
    activations_gb: float
    total_gb: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cfg(config: Any) -> Any:
    if config is None:
        from zrecipe.models.z_image.transformer import TransformerConfig

        return TransformerConfig(**Z_IMAGE_CONFIG)
    return config


def _hidden(dim: int) -> int:
    return int(dim / 3 * 8)


def linear_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear layer by module path, with its bias flag folded into `parameter_count`."""
    c = _cfg(config)
    dim, hidden, ada = c.dim, _hidden(c.dim), min(c.dim, 256)
    shapes: dict[str, tuple[int, int]] = {}
    groups = (("noise_refiner", c.n_refiner_layers, True), ("context_refiner", c.n_refiner_layers, False),
              ("layers", c.n_layers, True))  # fmt: skip
    for group, count, modulated in groups:
        for i in range(count):
            p = f"{group}.{i}."
            for name in ("to_q", "to_k", "to_v"):
                shapes[p + f"attention.{name}"] = (dim, dim)
            shapes[p + "attention.to_out.0"] = (dim, dim)
            shapes[p + "feed_forward.w1"] = (dim, hidden)
            shapes[p + "feed_forward.w2"] = (hidden, dim)
            shapes[p + "feed_forward.w3"] = (dim, hidden)
            if modulated:
                shapes[p + "adaLN_modulation.0"] = (ada, 4 * dim)
    return shapes


def parameter_count(config: Any) -> tuple[int, int]:
    """(parameters in block Linears, all other parameters) of the transformer built from `config`."""
    c = _cfg(config)
    dim, ada, head = c.dim, min(c.dim, 256), c.dim // c.n_heads
    shapes = linear_shapes(c)
    linear = sum(i * o for i, o in shapes.values()) + sum(o for p, (i, o) in shapes.items() if "adaLN" in p)
    blocks = 2 * c.n_refiner_layers + c.n_layers
    other = blocks * (4 * dim + (2 * head if c.qk_norm else 0))  # sandwich RMSNorms + q/k norms
    for p, f in zip(c.all_patch_size, c.all_f_patch_size, strict=True):
        width = p * p * f * c.in_channels
        other += width * dim + dim  # x embedder
        other += dim * width + width + ada * dim + dim  # final layer linear + its adaLN
    other += 256 * 1024 + 1024 + 1024 * ada + ada  # timestep MLP
    other += c.cap_feat_dim + c.cap_feat_dim * dim + dim  # caption RMSNorm + Linear
    other += 2 * dim  # pad tokens
    return linear, other


def lora_parameter_count(config: Any, targets: Iterable[Any] | None = None) -> int:
    """Trainable LoRA parameters: rank·(in + out) per adapted Linear. `targets`: recipe LoraTargets or
    (block_type, layer_types, rank) tuples over all blocks; None = the seed's default (layers, attention, 32)."""
    shapes = linear_shapes(config)
    total = 0
    for target in targets if targets is not None else [DEFAULT_LORA_TARGET]:
        if isinstance(target, tuple):
            block, types, rank = target
            start, end = 0, None
        else:
            block, types, rank, start, end = (target.block_type, target.layer_types, target.rank,
                                              target.start, target.end)  # fmt: skip
        for path, (i, o) in shapes.items():
            group, index, layer = path.split(".", 2)
            if (
                group == block
                and layer in types
                and int(index) >= start
                and (end is None or int(index) < end)
            ):
                total += rank * (i + o)
    return total


def tokens_per_item(config: Any, width: int, height: int, caption_tokens: int) -> int:
    """Joint sequence length (image + caption runs, each padded to a multiple of 32)."""
    c = _cfg(config)
    patch = c.all_patch_size[0] * VAE_FACTOR
    img = (height // patch) * (width // patch)
    return img + (-img % SEQ_MULTIPLE) + caption_tokens + (-caption_tokens % SEQ_MULTIPLE)


def estimate_memory(
    config: Any = None,
    mode: str = "lora",
    batch_size: int = 1,
    width: int = 1024,
    height: int = 1024,
    caption_tokens: int = 128,
    dtype: str = "bfloat16",
    quantize: int | None = None,
    lora_targets: Iterable[Any] | None = None,
    gradient_checkpointing: bool = False,
) -> MemoryEstimate:
    """Peak training memory for one configuration (GiB). `config`: a TransformerConfig (None = real size)."""
    c = _cfg(config)
    size = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    linear, other = parameter_count(c)
    if quantize:
        if mode == "full":
            raise ValueError("full fine-tuning needs unquantised weights; quantize applies to LoRA only")
        weights = linear * (quantize / 8 + 2 * size / QUANT_GROUP) + other * size
    else:
        weights = (linear + other) * size
    if mode == "lora":
        trainable = lora_parameter_count(c, lora_targets)
        state = trainable * 4 * 4  # fp32 adapter copy's gradient, its accumulation, AdamW m and v
    else:
        trainable = linear + other
        state = trainable * size * 4  # gradient, accumulation buffer, AdamW m and v in the param dtype
    n_tok = tokens_per_item(c, width, height, caption_tokens)
    cap_tok = caption_tokens + (-caption_tokens % SEQ_MULTIPLE)
    img_tok = n_tok - cap_tok
    per_token = (ACT_DIM_WIDTHS * c.dim + ACT_HIDDEN_WIDTHS * _hidden(c.dim)) * size
    # Tokens through each block kind: joint sequence (layers), image run (noise refiner), caption run.
    block_tokens = c.n_layers * n_tok + c.n_refiner_layers * (img_tok + cap_tok)
    # The attention backward recomputes the (heads, N, N) matrices of one block at a time (transient).
    attention = ATTN_TRANSIENT * c.n_heads * n_tok**2 * size
    if gradient_checkpointing:
        # Only block inputs stay alive; one block's activations are rebuilt during its backward pass.
        acts = block_tokens * c.dim * size + n_tok * per_token + attention
    else:
        acts = block_tokens * per_token + attention
    acts *= batch_size
    total = weights + state + acts + FIXED_OVERHEAD_GB * GB
    return MemoryEstimate(
        mode=mode, batch_size=batch_size, tokens_per_item=n_tok, parameters=linear + other,
        trainable_parameters=trainable, weights_gb=weights / GB, training_state_gb=state / GB,
        activations_gb=acts / GB, total_gb=total / GB,
    )  # fmt: skip


def system_memory_gb() -> float:
    """Memory the training process can use: Metal's recommended working set, else physical RAM."""
    import mlx.core as mx

    try:
        if mx.metal.is_available():
            return mx.metal.device_info()["max_recommended_working_set_size"] / GB
    except (AttributeError, KeyError, RuntimeError):  # no Metal / older MLX: fall back to physical RAM
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB


class MemoryOptimizer:
    """The seed's API: batch-size recommendations from the memory estimate (real Z-Image config by default)."""

    HEADROOM = 0.85  # leave 15% for the OS, MLX's allocator cache and fragmentation

    @staticmethod
    def calculate_optimal_batch_size(
        mode: str = "lora",
        available_memory_gb: float | None = None,
        quantize: int | None = None,
        config: Any = None,
        max_batch_size: int = 64,
        **estimate_args: Any,
    ) -> tuple[int, MemoryEstimate]:
        """The largest batch (≤ max_batch_size) whose estimate fits in HEADROOM × available memory, and its
        estimate; batch 0 when even batch 1 does not fit (then the estimate is batch 1's)."""
        budget = (
            available_memory_gb if available_memory_gb is not None else system_memory_gb()
        ) * MemoryOptimizer.HEADROOM
        best = 0
        estimate = estimate_memory(config, mode, 1, quantize=quantize, **estimate_args)
        for batch in range(1, max_batch_size + 1):
            candidate = estimate_memory(config, mode, batch, quantize=quantize, **estimate_args)
            if candidate.total_gb > budget:
                break
            best, estimate = batch, candidate
        return best, estimate

    @staticmethod
    def print_recommendations(
        mode: str = "lora",
        available_memory_gb: float | None = None,
        quantize: int | None = None,
        config: Any = None,
        **estimate_args: Any,
    ) -> str:
        """Print (and return) the recommended batch size and a per-batch memory table."""
        memory = available_memory_gb if available_memory_gb is not None else system_memory_gb()
        batch, est = MemoryOptimizer.calculate_optimal_batch_size(
            mode, memory, quantize, config, **estimate_args
        )
        lines = [f"Memory plan for {mode} training with {memory:.0f} GB available"
                 + (f", {quantize}-bit base weights" if quantize else "") + ":"]  # fmt: skip
        lines.append(f"  weights {est.weights_gb:.1f} GB, training state {est.training_state_gb:.1f} GB, "
                     f"trainable parameters {est.trainable_parameters:,}")  # fmt: skip
        lines.append("  batch  estimate (GB)   with gradient checkpointing (GB)")
        rest = {k: v for k, v in estimate_args.items() if k != "gradient_checkpointing"}
        for b in (1, 2, 4, 8, 16, 32):
            plain = estimate_memory(config, mode, b, quantize=quantize, gradient_checkpointing=False, **rest)
            ckpt = estimate_memory(config, mode, b, quantize=quantize, gradient_checkpointing=True, **rest)
            lines.append(f"  {b:5d}  {plain.total_gb:13.1f}   {ckpt.total_gb:13.1f}")
        if batch:
            lines.append(f"Recommended batch size: {batch} (estimated peak {est.total_gb:.1f} GB).")
        else:
            lines.append(
                "Even batch size 1 does not fit: enable gradient checkpointing, quantize the base "
                "weights (LoRA) or lower the resolution."
            )
        text = "\n".join(lines)
        print(text)
        return text


def resolve_batch_size(
    requested: int | str, accumulation: int, config: Any, mode: str, **estimate_args: Any
) -> tuple[int, int, str | None]:
    """(micro batch, gradient accumulation, note). `auto` picks the largest batch that fits. A requested
    batch that will not fit is split into micro-batches with more accumulation (same effective batch)."""
    memory = system_memory_gb()
    if requested == "auto":
        batch, est = MemoryOptimizer.calculate_optimal_batch_size(
            mode, memory, config=config, **estimate_args
        )
        batch = max(1, batch)
        return batch, accumulation, f"batch_size auto → {batch} (estimated peak {est.total_gb:.2f} GB)"
    requested = int(requested)
    if (
        estimate_memory(config, mode, requested, **estimate_args).total_gb
        <= memory * MemoryOptimizer.HEADROOM
    ):
        return requested, accumulation, None
    for micro in range(requested - 1, 0, -1):
        fits = (
            estimate_memory(config, mode, micro, **estimate_args).total_gb
            <= memory * MemoryOptimizer.HEADROOM
        )
        if requested % micro == 0 and fits:
            factor = requested // micro
            return (
                micro,
                accumulation * factor,
                (
                    f"batch {requested} does not fit in {memory:.0f} GB: using micro-batches of {micro} with "
                    f"gradient accumulation {accumulation * factor} (same effective batch)"
                ),
            )
    return 1, accumulation * requested, f"batch {requested} does not fit: micro-batches of 1"
