"""Adapter layers: a frozen base Linear (or QuantizedLinear) wrapped with an adapter's update.

Every kind derives from `AdapterLayer`, which gives it `to_delta()` (the update as a delta, see
`zrecipe.lora.delta`), `from_delta(base, delta)` and `fuse()`:

- `LoRALinear`: the trained layer. y = base(x) + (alpha / r) · (x @ A) @ B with `lora_a` (in, r) and
  `lora_b` (r, out); ΔW is never materialised in training. B starts at zero, so step 0 is exactly the base
  model (mlx-examples' flux). Its parameter names are what optimiser states and checkpoints refer to.
- `MultiLoRALinear`: several LoRAs applied at once for generation: base(x) + (x @ A_cat^T) @ B_cat^T with
  every LoRA's A stacked and every strength · scale · B side by side (one low-rank matmul pair).

`TRAINABLE_KINDS` maps an adapter kind name to the layer class training swaps in for it; DoRA, LoKr and
LoHa are in `zrecipe.lora.variant_layers`.

Adapter dropout (`dropout` > 0) zeroes inputs of the adapter path (never the base path) in training only:
inside `adapter_dropout(key)`, which the train step enters with the step's PRNG key. Each layer's mask is
a pure function of that key and the layer's `dropout_index`, so a step recomputed by gradient
checkpointing draws the same masks and a resumed run the same as a straight one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import mlx.core as mx
from mlx import nn

from zrecipe.errors import RecipeError
from zrecipe.lora.delta import LoraDelta, dense_weight, fuse_linear, linear_dims, weight_dtype

# The dropout key of the step being traced (set only inside `adapter_dropout`).
_DROPOUT_KEY: list[mx.array | None] = [None]


@contextmanager
def adapter_dropout(key: mx.array) -> Iterator[None]:
    """Adapter dropout on, with masks drawn from `key` (a step's PRNG key; the 3rd key of its split, apart
    from the two the loss draws σ and noise from)."""
    previous = _DROPOUT_KEY[0]
    _DROPOUT_KEY[0] = mx.random.split(key, 3)[2]
    try:
        yield
    finally:
        _DROPOUT_KEY[0] = previous


class AdapterLayer(nn.Module):
    """Base of every adapter layer. `TRAINABLE` names the parameters the optimiser updates; `OPTIONS` the
    recipe target fields (`LoraTarget`) besides rank, alpha and dropout that `from_base` takes."""

    TRAINABLE: ClassVar[tuple[str, ...]] = ()
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    dropout: float = 0.0  # probability of zeroing an input of the adapter path (training only)
    dropout_index: int = 0  # which mask of the step's dropout key this layer draws

    def adapter_input(self, x: mx.array) -> mx.array:
        """`x` with adapter dropout applied (inverted: kept inputs scaled by 1 / (1 − p)), or `x`."""
        root = _DROPOUT_KEY[0]
        if not self.dropout or not self.training or root is None:
            return x
        keep = 1.0 - self.dropout
        key = mx.random.split(root, self.dropout_index + 1)[self.dropout_index]
        mask = mx.random.bernoulli(keep, x.shape, key=key)
        return mx.where(mask, x * (1.0 / keep), mx.zeros_like(x))

    def base_layer(self) -> nn.Module:
        """The frozen Linear / QuantizedLinear inside."""
        raise NotImplementedError

    def to_delta(self):
        """The layer's update as a delta (`zrecipe.lora.delta`)."""
        raise NotImplementedError

    @classmethod
    def from_delta(cls, base: nn.Module, delta) -> AdapterLayer:
        """A layer of this kind around `base` holding `delta`."""
        raise NotImplementedError

    @classmethod
    def _around(cls, linear: nn.Module, kind: str, rank: int, alpha: float | None, dropout: float):
        """An empty layer of this kind around `linear` with its rank, alpha (default: the rank) and
        dropout set; the subclass's `from_base` adds its own weights."""
        if rank < 1:
            raise RecipeError(f"{kind} rank must be at least 1 (got {rank}).")
        layer = cls()
        layer.linear = linear
        layer.rank, layer.alpha, layer.dropout = (
            int(rank),
            float(rank if alpha is None else alpha),
            float(dropout),
        )
        return layer

    def fuse(self, requantize: bool = False) -> nn.Module:
        """The base layer with the update added into its weights (see `fuse_linear`)."""
        base = self.base_layer()
        return fuse_linear(base, self.to_delta().weight_delta(dense_weight(base)), requantize)


class LoRALinear(AdapterLayer):
    """A frozen base Linear (or QuantizedLinear) plus a trainable low-rank update."""

    TRAINABLE = ("lora_a", "lora_b")

    @classmethod
    def from_base(
        cls, linear: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0
    ) -> LoRALinear:
        """Wrap `linear`; A ~ U(±1/sqrt(in)) as in mlx-examples, B = 0, scale = alpha / rank."""
        out_dims, in_dims = linear_dims(linear)
        lora = cls(in_dims, out_dims, rank, rank if alpha is None else alpha, dropout)
        lora.linear = linear
        return lora

    def __init__(
        self, input_dims: int, output_dims: int, rank: int = 8, alpha: float = 8.0, dropout: float = 0.0
    ):
        super().__init__()
        if rank < 1:
            raise RecipeError(f"LoRA rank must be at least 1 (got {rank}).")
        self.linear = nn.Linear(input_dims, output_dims, bias=False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        bound = 1.0 / math.sqrt(input_dims)
        self.lora_a = mx.random.uniform(low=-bound, high=bound, shape=(input_dims, rank))
        self.lora_b = mx.zeros((rank, output_dims))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        # Low-rank path in the activation dtype (bf16 compute keeps the fp32 adapter as master copy).
        z = (self.adapter_input(x) @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        return y + (self.scale * z).astype(y.dtype)

    def base_layer(self) -> nn.Module:
        return self.linear

    def to_delta(self) -> LoraDelta:
        """A (r, in) = lora_a^T, B (out, r) = lora_b^T: the adapter file's orientation."""
        return LoraDelta(self.lora_a.T, self.lora_b.T, self.scale, self.alpha)

    def delta(self) -> mx.array:
        """ΔW in the base layer's (out, in) orientation (only for fusing/export, never in training)."""
        return self.to_delta().delta()

    @classmethod
    def from_delta(cls, base: nn.Module, delta: LoraDelta) -> LoRALinear:
        layer = cls.from_base(base, rank=delta.rank, alpha=delta.file_alpha)
        layer.set_delta(delta)
        return layer

    def set_delta(self, delta: LoraDelta) -> bool:
        """Take `delta`'s factors in place (keeping the module the optimiser state refers to); False when
        its kind, rank or sizes do not fit this layer."""
        if not isinstance(delta, LoraDelta) or (delta.rank, delta.in_dims, delta.out_dims) != (
            self.rank,
            self.lora_a.shape[0],
            self.lora_b.shape[1],
        ):
            return False
        alpha = delta.file_alpha
        if float(mx.array(self.alpha, dtype=mx.float32).item()) != alpha:
            self.alpha = float(alpha)  # the file stores float32: keep the exact Python value if equal
        # Row-major copies, like fresh parameters: a transposed view would take other BLAS paths (another
        # rounding), and a resumed run must compute exactly what the straight one does.
        self.lora_a = mx.contiguous(delta.A.T.astype(mx.float32))
        self.lora_b = mx.contiguous(delta.B.T.astype(mx.float32))
        return True


class MultiLoRALinear(AdapterLayer):
    """A frozen base Linear (or QuantizedLinear) plus the stacked low-rank updates of several LoRAs."""

    def __init__(self, base: nn.Module, a_cat: mx.array, b_cat: mx.array):
        super().__init__()
        self.base = base
        self.lora_a = a_cat  # (R, in): every LoRA's A stacked
        self.lora_b = b_cat  # (out, R): every LoRA's strength·scale·B side by side
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        z = (x @ self.lora_a.T.astype(x.dtype)) @ self.lora_b.T.astype(x.dtype)
        return y + z.astype(y.dtype)

    def base_layer(self) -> nn.Module:
        return self.base

    def to_delta(self) -> LoraDelta:
        return LoraDelta(self.lora_a, self.lora_b, 1.0)

    @classmethod
    def from_delta(cls, base: nn.Module, delta) -> MultiLoRALinear:
        return cls.from_deltas(base, [delta])

    @classmethod
    def from_deltas(cls, base: nn.Module, deltas: list, dtype: mx.Dtype | None = None) -> MultiLoRALinear:
        """`base` with every delta's low-rank factors stacked (concatenated in float32, then cast to
        `dtype`, the base's compute dtype by default). An AdapterLayer `base` stacks onto its own."""
        pairs = [d.low_rank() for d in deltas]
        if isinstance(base, AdapterLayer):
            pairs = [base.to_delta().low_rank(), *pairs]
            base = base.base_layer()
        a_cat = mx.concatenate([a for a, _ in pairs], axis=0)
        b_cat = mx.concatenate([b for _, b in pairs], axis=1)
        dtype = dtype or weight_dtype(base)
        return cls(base, a_cat.astype(dtype), b_cat.astype(dtype))


# The layer training swaps in for each adapter kind (a variant adds its class here).
TRAINABLE_KINDS: dict[str, type[AdapterLayer]] = {"lora": LoRALinear}


def adapter_layers(model: nn.Module, trainable_only: bool = True) -> dict[str, AdapterLayer]:
    """{module path: adapter layer} of `model` (only the kinds that train, unless told otherwise)."""
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, AdapterLayer) and (m.TRAINABLE or not trainable_only)
    }


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of every Linear / QuantizedLinear layer an adapter can target; an adapter
    layer stands for its base at its own path."""
    shapes: dict[str, tuple[int, int]] = {}
    wrapped: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            shapes[path] = linear_dims(module.base_layer())
            wrapped.add(path)
        elif isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            shapes[path] = linear_dims(module)
    return {p: s for p, s in shapes.items() if p.rsplit(".", 1)[0] not in wrapped}


# DoRA, LoKr and LoHa layers register themselves in TRAINABLE_KINDS (last: they build on the names above).
from zrecipe.lora import variant_layers as _variant_layers  # noqa: E402, F401
