"""Training memory estimate and the seed's `MemoryOptimizer` API.

The estimate adds up, for a transformer config (tiny or real), what MLX holds at the step's peak:
- weights: parameter count × bytes per dtype, or packed 4/8-bit Linears (+ a bf16 scale and bias per group
  of 64) with the small precision-sensitive layers kept in the compute dtype;
- training state: the trainable parameters' own copy (LoRA: fp32 adapters), their gradients, an
  accumulation buffer when gradients are accumulated, the optimiser's state (`training.optim.
  optimizer_state_bytes`: each optimiser's own `state_bytes`) and an EMA shadow when one is kept;
- activations kept for the backward pass: per token and block whose backward runs (LoRA: the main layers
  from the first adapted one up; full: every block), in units of `dim` (`Calibration.saved_*`); with
  gradient checkpointing only each block's inputs stay (`checkpointed`), plus one block's activations
  while it is recomputed; then the working set of the block being differentiated (its gradients and MLX's
  run-ahead: the CPU backend allocates up to ten operations' outputs before they run), and the attention's
  own working memory: the score tiles of the blockwise attention (`kernels.block_rows`) alive at once, or
  one call's scratch of the compiled flash attention where that is used (the CPU with zrecipe's kernels);
- full fine-tuning peaks either there or in the optimiser update, where the new parameters and moments are
  computed while the old ones are still held (`Calibration.update`).
`process_gb` adds what the process holds beyond MLX's own count: MLX's buffer cache (freed buffers kept
for reuse, `Calibration.cache`, `cache_tokens`) and the libraries' allocations and compiled kernels; it
is what must fit (`MemoryOptimizer.fits`). The constants are fitted to peaks measured by
`benchmarks/bench_memory.py` (`CALIBRATIONS`, one per training attention); RESULTS.md "Memory model" has the validation table.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

GB = 1024**3
MB = 1024**2
SEQ_MULTIPLE = 32
QUANT_GROUP = 64
VAE_FACTOR = 8
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SCORE_BYTES = 4  # the blockwise attention's score tiles are float32 whatever the compute dtype
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
# `zrecipe memory`'s tables: these batch sizes, and the largest batch on Macs of these memory sizes (the
# seed's table was for 512 GB).
TABLE_BATCHES = (1, 2, 4, 8, 16, 32)
MAC_MEMORY_GB = (32, 64, 96, 128, 192, 512)
ADAPTER_BYTES = 4  # LoRA adapters are trained in float32 (their master copy) whatever the compute dtype


@dataclass(frozen=True)
class Calibration:
    """Fitted constants of the activation, update and process terms (see the module docstring). Widths are
    in `dim` values per token, in the compute dtype."""

    saved_lora: float  # kept per token by a block whose backward runs, LoRA (frozen Linears keep less)
    saved_full: float  # the same in full fine-tuning (every Linear's input is kept for its weight gradient)
    checkpointed: float  # kept per token by a checkpointed block
    working_lora: float  # transient per token of the block being differentiated, LoRA
    working_full: float  # the same in full fine-tuning (its Linears' weight gradients are formed there too)
    attention_tiles: float  # attention working units alive at once (`attention_work_bytes`)
    update: float  # full fine-tuning: parameter-sized copies alive during the optimiser update
    cache: float  # process memory beyond MLX's peak: freed activation buffers in MLX's cache (fraction)
    cache_tiles: float  # ... and freed attention working units in MLX's cache
    process_mb: float  # ... and the libraries' own allocations and compiled kernels


# One set of constants per training attention, each fitted by `benchmarks/bench_memory.py --calibrate` to 48
# training runs with that attention (dim 256 with 1, 2 and 3 main layers; LoRA and full; 256², 512², 768²
# (2 layers only); batch 1 and 2; checkpointing off and on), minimising the largest relative error over
# MLX's peak and the RSS growth together (RESULTS.md "Memory model"). The attention changes more than its
# own working memory: the blockwise one's many small ops also widen the run-ahead of the block being
# differentiated, so each attention has its own per-token constants too.
# What the flash numbers say (2026-12-02): a block whose backward runs keeps ~24–27 `dim`-widths per token
# (q, k, v, the attention output, norms, gates, the SwiGLU's 8/3·dim-wide tensors); the block being
# differentiated needs ~18 more with LoRA and ~43 in full fine-tuning (the weight gradients' inputs and
# outputs of every Linear, formed there); a checkpointed block keeps ~8.8 (its input, output and what
# mx.checkpoint holds to replay it); about half a flash call's scratch is alive at the peak; the full update
# holds ~2.4 parameter-sized temporaries (new parameters and moments beside the old); the process holds
# ~24% of the activations again in MLX's buffer cache, the freed scratch, and ~23 MB of its own.
# The blockwise ones (2026-12-02, before the compiled flash attention): ~21 widths kept per block, ~28 / 60
# working, ~half a score tile alive and ~2 freed ones cached.
CALIBRATIONS = {
    "flash": Calibration(
        saved_lora=24.024, saved_full=26.733, checkpointed=8.838, working_lora=18.484, working_full=43.231,
        attention_tiles=0.533, update=2.377, cache=0.244, cache_tiles=1.306, process_mb=22.994,
    ),
    "blockwise": Calibration(
        saved_lora=21.688, saved_full=21.393, checkpointed=8.535, working_lora=27.841, working_full=60.099,
        attention_tiles=0.524, update=2.445, cache=0.245, cache_tiles=2.162, process_mb=22.132,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class MemoryEstimate:
    """A training-memory estimate in GiB, by component; `total_gb` is MLX's peak, `process_gb` the
    process's (what must fit in the machine's memory)."""

    mode: str
    batch_size: int
    tokens_per_item: int
    parameters: int
    trainable_parameters: int
    weights_gb: float
    training_state_gb: float
    activations_gb: float
    total_gb: float
    process_gb: float

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


def _targets(targets: Iterable[Any] | None) -> list[tuple[str, tuple[str, ...], int, int, int | None]]:
    """(block_type, layer_types, rank, start, end) of recipe LoraTargets or (block, types, rank) tuples."""
    out = []
    for target in targets if targets is not None else [DEFAULT_LORA_TARGET]:
        if isinstance(target, tuple):
            block, types, rank = target
            out.append((block, tuple(types), rank, 0, None))
        else:
            out.append((target.block_type, tuple(target.layer_types), target.rank, target.start, target.end))
    return out


def adapter_shapes(config: Any, targets: Iterable[Any] | None = None) -> list[tuple[int, int]]:
    """Shapes of the LoRA adapters' tensors: (in, rank) and (rank, out) per adapted Linear. `targets`:
    recipe LoraTargets or (block_type, layer_types, rank) tuples over all blocks; None = the seed's default
    (layers, attention, 32)."""
    shapes = linear_shapes(config)
    out = []
    for block, types, rank, start, end in _targets(targets):
        for path, (i, o) in shapes.items():
            group, index, layer = path.split(".", 2)
            if (
                group == block
                and layer in types
                and int(index) >= start
                and (end is None or int(index) < end)
            ):
                out += [(i, rank), (rank, o)]
    return out


def lora_parameter_count(config: Any, targets: Iterable[Any] | None = None) -> int:
    """Trainable LoRA parameters: rank·(in + out) per adapted Linear (`adapter_shapes`)."""
    return sum(a * b for a, b in adapter_shapes(config, targets))


def full_parameter_shapes(config: Any) -> list[tuple[int, ...]]:
    """Shapes the optimiser sees in full fine-tuning: every block Linear's (out, in) weight, the rest as one
    vector (norms, biases, embedders: too small for the factored or 8-bit states to matter)."""
    linear, other = parameter_count(config)
    weights = [(o, i) for i, o in linear_shapes(config).values()]
    return [*weights, (linear + other - sum(o * i for o, i in weights),)]


def tokens_per_item(config: Any, width: int, height: int, caption_tokens: int) -> int:
    """Joint sequence length (image + caption runs, each padded to a multiple of 32)."""
    c = _cfg(config)
    patch = c.all_patch_size[0] * VAE_FACTOR
    img = (height // patch) * (width // patch)
    return img + (-img % SEQ_MULTIPLE) + caption_tokens + (-caption_tokens % SEQ_MULTIPLE)


def backward_block_tokens(config: Any, mode: str, n_img: int, n_cap: int, targets=None) -> list[int]:
    """Tokens per item of every block whose backward pass runs (and so keeps activations): all blocks in
    full fine-tuning; with LoRA, the blocks from the lowest adapted one up (gradients flow no further)."""
    c = _cfg(config)
    refiners = [n_img] * c.n_refiner_layers + [n_cap] * c.n_refiner_layers
    if mode == "full":
        return refiners + [n_img + n_cap] * c.n_layers
    spans = _targets(targets)
    if any(block != "layers" for block, *_ in spans):  # a refiner is adapted: everything above it runs
        return refiners + [n_img + n_cap] * c.n_layers
    first = min((start for *_, start, _ in spans), default=c.n_layers)
    return [n_img + n_cap] * max(0, c.n_layers - first)


def attention_tile_bytes(config: Any, batch: int, tokens: int) -> int:
    """Bytes of one blockwise-attention score tile for the joint sequence (kernels.block_rows)."""
    from zrecipe.models.z_image.kernels import block_rows

    c = _cfg(config)
    return batch * c.n_heads * block_rows(batch, c.n_heads, tokens, tokens) * tokens * SCORE_BYTES


def training_attention(dtype: str) -> str:
    """The attention training uses here for `dtype`: `flash` (the compiled kernel: the CPU with zrecipe's
    kernels loaded, float32) or `blockwise` (kernels.attention; on a CUDA GPU with a fused backward MLX's
    own kernel, whose memory is of the same order)."""
    from zrecipe import native

    return "flash" if dtype == "float32" and native.in_use() else "blockwise"


def attention_work_bytes(config: Any, batch: int, tokens: int, attention: str) -> int:
    """The training attention's working unit for the joint sequence, what `Calibration.attention_tiles`
    counts: one compiled flash attention backward call's scratch (`flash`; one call's exists at a time,
    csrc/flash_attention.h) or one blockwise score tile (`blockwise`, `attention_tile_bytes`)."""
    if attention == "blockwise":
        return attention_tile_bytes(config, batch, tokens)
    from zrecipe import native

    c = _cfg(config)
    return native.flash_attention_scratch_bytes(batch, c.n_heads, tokens, tokens, backward=True)


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
    optimizer: Any = None,
    ema: bool = False,
    gradient_accumulation: int = 1,
    calibration: Calibration | None = None,
    attention: str | None = None,
) -> MemoryEstimate:
    """Peak training memory for one configuration (GiB). `config`: a TransformerConfig (None = real size).

    `optimizer`: the recipe's `zrecipe.recipe.Optimizer` (None: AdamW), whose state is counted by
    `training.optim.optimizer_state_bytes`; `ema`: an EMA shadow of the trainable parameters is kept
    (`training.ema.SHADOW_BYTES_PER_PARAMETER`); `gradient_accumulation` > 1 adds an accumulation buffer.
    `attention`: `flash` or `blockwise`, the training attention whose working memory is counted (None: the
    one used here, `training_attention`); `calibration`: constants (None: that attention's `CALIBRATIONS`).
    """
    from zrecipe.recipe import Optimizer
    from zrecipe.training.ema import SHADOW_BYTES_PER_PARAMETER
    from zrecipe.training.optim import optimizer_state_bytes

    c = _cfg(config)
    size = DTYPE_BYTES[dtype]
    attention = attention or training_attention(dtype)
    k = calibration or CALIBRATIONS[attention]
    linear, other = parameter_count(c)
    if quantize:
        if mode == "full":
            raise ValueError("full fine-tuning needs unquantised weights; quantize applies to LoRA only")
        weights = linear * (quantize / 8 + 2 * size / QUANT_GROUP) + other * size
    else:
        weights = (linear + other) * size
    if mode == "lora":
        shapes, param_bytes = adapter_shapes(c, lora_targets), ADAPTER_BYTES
    elif mode == "full":
        shapes, param_bytes = full_parameter_shapes(c), size
    else:
        raise ValueError(f"mode {mode!r}: use lora or full")
    trainable = sum(math.prod(shape) for shape in shapes)
    # The adapters themselves (full: the parameters are the weights), their gradients (twice with an
    # accumulation buffer), the optimiser's state and the EMA shadow.
    state = (
        trainable * param_bytes * ((1 if mode == "lora" else 0) + (2 if gradient_accumulation > 1 else 1))
        + optimizer_state_bytes(optimizer or Optimizer(), shapes, param_bytes)
        + (trainable * SHADOW_BYTES_PER_PARAMETER if ema else 0)
    )

    n_tok = tokens_per_item(c, width, height, caption_tokens)
    n_cap = caption_tokens + (-caption_tokens % SEQ_MULTIPLE)
    blocks = backward_block_tokens(c, mode, n_tok - n_cap, n_cap, lora_targets)
    top = max(blocks, default=0)
    saved, working = (k.saved_lora, k.working_lora) if mode == "lora" else (k.saved_full, k.working_full)
    if gradient_checkpointing:  # block inputs, plus one block's activations while it is recomputed
        widths = k.checkpointed * sum(blocks) + (saved + working) * top
    else:
        widths = saved * sum(blocks) + working * top
    acts = batch_size * widths * c.dim * size
    tile = attention_work_bytes(c, batch_size, n_tok, attention) if blocks else 0
    acts += k.attention_tiles * tile
    total = weights + state + acts
    if mode == "full":  # the optimiser update: new parameters and moments beside the old ones and gradients
        total = max(total, weights + state + k.update * trainable * param_bytes)
    process = total + k.cache * acts + k.cache_tiles * tile + k.process_mb * MB
    return MemoryEstimate(
        mode=mode, batch_size=batch_size, tokens_per_item=n_tok, parameters=linear + other,
        trainable_parameters=trainable, weights_gb=weights / GB, training_state_gb=state / GB,
        activations_gb=acts / GB, total_gb=total / GB, process_gb=process / GB,
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
    """The seed's API: batch-size recommendations from the memory estimate (real Z-Image config by default).

    A batch fits when the estimated process peak (`MemoryEstimate.process_gb`) is within HEADROOM × the
    available memory.
    """

    HEADROOM = 0.85  # leave 15% for the OS and other programs

    @staticmethod
    def fits(estimate: MemoryEstimate, available_memory_gb: float) -> bool:
        """Whether `estimate` fits in `available_memory_gb` with the headroom left free."""
        return estimate.process_gb <= available_memory_gb * MemoryOptimizer.HEADROOM

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
        memory = available_memory_gb if available_memory_gb is not None else system_memory_gb()
        best = 0
        estimate = estimate_memory(config, mode, 1, quantize=quantize, **estimate_args)
        for batch in range(1, max_batch_size + 1):
            candidate = estimate_memory(config, mode, batch, quantize=quantize, **estimate_args)
            if not MemoryOptimizer.fits(candidate, memory):
                break
            best, estimate = batch, candidate
        return best, estimate

    @staticmethod
    def batch_per_memory(
        mode: str = "lora", quantize: int | None = None, config: Any = None, **estimate_args: Any
    ) -> list[tuple[float, int, int]]:
        """(memory GB, largest batch without, with gradient checkpointing) for each of MAC_MEMORY_GB (0 when
        none fits): the seed's 512 GB table recomputed, and the smaller Macs."""
        rest = {k: v for k, v in estimate_args.items() if k != "gradient_checkpointing"}
        return [
            (gb, *(MemoryOptimizer.calculate_optimal_batch_size(
                mode, gb, quantize, config, gradient_checkpointing=ckpt, **rest)[0] for ckpt in (False, True)))
            for gb in MAC_MEMORY_GB
        ]  # fmt: skip

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
        for b in TABLE_BATCHES:
            plain = estimate_memory(config, mode, b, quantize=quantize, gradient_checkpointing=False, **rest)
            ckpt = estimate_memory(config, mode, b, quantize=quantize, gradient_checkpointing=True, **rest)
            lines.append(f"  {b:5d}  {plain.process_gb:13.1f}   {ckpt.process_gb:13.1f}")
        lines.append("  memory  largest batch   with gradient checkpointing")
        for gb, plain_batch, ckpt_batch in MemoryOptimizer.batch_per_memory(mode, quantize, config, **rest):
            lines.append(f"  {gb:3.0f} GB  {plain_batch or '–':>13}   {ckpt_batch or '–':>13}")
        if batch:
            lines.append(f"Recommended batch size: {batch} (estimated peak {est.process_gb:.1f} GB).")
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

    def fits(batch: int, accum: int) -> bool:
        estimate = estimate_memory(config, mode, batch, gradient_accumulation=accum, **estimate_args)
        return MemoryOptimizer.fits(estimate, memory)

    if requested == "auto":
        batch, est = MemoryOptimizer.calculate_optimal_batch_size(
            mode, memory, config=config, gradient_accumulation=accumulation, **estimate_args
        )
        batch = max(1, batch)
        return batch, accumulation, f"batch_size auto → {batch} (estimated peak {est.process_gb:.2f} GB)"
    requested = int(requested)
    if fits(requested, accumulation):
        return requested, accumulation, None
    for micro in range(requested - 1, 0, -1):
        factor = requested // micro
        if requested % micro == 0 and fits(micro, accumulation * factor):
            return (
                micro,
                accumulation * factor,
                (
                    f"batch {requested} does not fit in {memory:.0f} GB: using micro-batches of {micro} with "
                    f"gradient accumulation {accumulation * factor} (same effective batch)"
                ),
            )
    return 1, accumulation * requested, f"batch {requested} does not fit: micro-batches of 1"
