"""The trainable layers of DoRA, LoKr and LoHa around a frozen Linear / QuantizedLinear.

Each initialises its update to exactly zero (step 0 is the base model), keeps its parameters in float32
(the master copy; the adapter path computes in the activation dtype), and converts to / from its delta
(`zrecipe.lora.variants`) for files, checkpoints and fusing.

- `DoRALinear` (PEFT `use_dora=True`): y = base(x) + (g − 1) ⊙ base₀(x_d) + g ⊙ s·(x_d A) B with
  g = m / sg(‖W + s·BᵀAᵀ‖_row), base₀ the base without bias, x_d the dropped-out input and sg the stop
  gradient PEFT (and the DoRA paper, §4.3) use. The row norms are computed without forming ΔW:
  ‖W_i‖² (cached once) + 2s·⟨W_i, ΔW_i/s⟩ (from W A, the base layer applied to Aᵀ, so a quantised base
  is never dequantised per step) + s²·ΔW_i Gram form. m starts at ‖W‖, B at 0: g = 1 exactly.
- `LoKrLinear` (LyCORIS LoKr, `use_tucker` off): ΔW = s·kron(W1, W2) applied without forming it:
  x reshaped to (in_m, in_n), y = W1 · X · W2ᵀ. Factor shapes from `LokrShape` (`factor`,
  `decompose_both`, `full_matrix` as LyCORIS); W1 ~ kaiming-uniform, W2's up factor (or full W2) = 0.
- `LoHaLinear` (LyCORIS LoHa): ΔW = s·(w1_a w1_b) ⊙ (w2_a w2_b), applied through its exact rank-r²
  factors when that is cheaper, else as the dense ΔW. w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0.
"""

from __future__ import annotations

import math

import mlx.core as mx
from mlx import nn

from zrecipe.errors import RecipeError
from zrecipe.lora.delta import LoraDelta, dense_weight, linear_dims, weight_dtype
from zrecipe.lora.layers import TRAINABLE_KINDS, AdapterLayer, LoRALinear
from zrecipe.lora.variants import DecomposedDelta, LohaDelta, LokrDelta, LokrShape


def _kaiming_uniform(shape: tuple[int, int]) -> mx.array:
    """torch's kaiming_uniform_(a=√5) on a (rows, cols) matrix: U(±1/√cols)."""
    bound = 1.0 / math.sqrt(shape[1])
    return mx.random.uniform(low=-bound, high=bound, shape=shape)


def _same_alpha(layer, alpha: float) -> None:
    # The file stores alpha as float32: keep the layer's exact Python value when they agree.
    if float(mx.array(layer.alpha, dtype=mx.float32).item()) != alpha:
        layer.alpha = float(alpha)


class DoRALinear(LoRALinear):
    """LoRA's factors plus a trainable magnitude per output row (see the module docstring)."""

    TRAINABLE = ("lora_a", "lora_b", "magnitude")

    @classmethod
    def from_base(
        cls, linear: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0
    ) -> DoRALinear:
        layer = super().from_base(linear, rank, alpha, dropout)
        weight = dense_weight(linear).astype(mx.float32)
        layer._base_norm2 = mx.sum(weight * weight, axis=1)  # ‖W_i‖², frozen (not a parameter)
        layer.magnitude = mx.sqrt(layer._base_norm2)
        return layer

    def _weight_norm(self) -> mx.array:
        """‖W + s·ΔW₀‖ per output row, in float32, without materialising ΔW₀ = lora_bᵀ lora_aᵀ."""
        a, b = self.lora_a, self.lora_b  # (in, r), (r, out)
        wa = self._base_product(a.T)  # (r, out) = (W a)ᵀ
        gram = a.T @ a  # (r, r)
        cross = mx.sum(wa * b, axis=0)
        own = mx.sum((gram @ b) * b, axis=0)
        return mx.sqrt(self._base_norm2 + 2.0 * self.scale * cross + (self.scale * self.scale) * own)

    def _base_product(self, rows: mx.array) -> mx.array:
        """rows @ Wᵀ through the base layer itself (a quantised one stays quantised), in float32."""
        out = self.linear(rows.astype(weight_dtype(self.linear)))
        if "bias" in self.linear:
            out = out - self.linear.bias
        return out.astype(mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        xd = self.adapter_input(x)
        plain = y - self.linear.bias if "bias" in self.linear else y
        if xd is not x:  # PEFT: with dropout the DoRA term sees the dropped input, base included
            plain = self.linear(xd) - (self.linear.bias if "bias" in self.linear else 0)
        g = self.magnitude / mx.stop_gradient(self._weight_norm())
        z = (xd @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        extra = (g - 1.0).astype(x.dtype) * plain + (g * self.scale).astype(x.dtype) * z
        return y + extra.astype(y.dtype)

    def to_delta(self) -> DecomposedDelta:
        return DecomposedDelta(super().to_delta(), self.magnitude)

    def delta(self) -> mx.array:
        return self.to_delta().weight_delta(dense_weight(self.linear))

    @classmethod
    def from_delta(cls, base: nn.Module, delta: DecomposedDelta) -> DoRALinear:
        if not _is_dora(delta):
            raise RecipeError(f"a {delta.KIND} adapter is not a DoRA over a LoRA")
        layer = cls.from_base(base, rank=delta.rank, alpha=delta.file_alpha)
        layer.set_delta(delta)
        return layer

    def set_delta(self, delta) -> bool:
        if not _is_dora(delta) or delta.magnitude.shape != self.magnitude.shape:
            return False
        if not super().set_delta(delta.inner):
            return False
        self.magnitude = delta.magnitude.astype(mx.float32)
        return True


def _is_dora(delta) -> bool:
    return isinstance(delta, DecomposedDelta) and isinstance(delta.inner, LoraDelta) and delta.per_row


class LoKrLinear(AdapterLayer):
    """A frozen base plus a trainable Kronecker-product update (see the module docstring)."""

    OPTIONS = ("factor", "decompose_both", "full_matrix")
    _FACTORS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")

    @classmethod
    def from_base(
        cls, linear: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
        factor: int = -1, decompose_both: bool = False, full_matrix: bool = False,
    ) -> LoKrLinear:  # fmt: skip
        layer = cls._around(linear, "LoKr", rank, alpha, dropout)  # checks the rank first
        out_dims, in_dims = linear_dims(linear)
        shape = LokrShape.of(out_dims, in_dims, rank, factor, decompose_both, full_matrix)
        (out_l, in_m), (out_k, in_n) = shape.w1, shape.w2
        if shape.w1_pair:
            layer.lokr_w1_a = _kaiming_uniform((out_l, rank))
            layer.lokr_w1_b = _kaiming_uniform((rank, in_m))
        else:
            layer.lokr_w1 = _kaiming_uniform((out_l, in_m))
        if shape.w2_pair:
            layer.lokr_w2_a = _kaiming_uniform((out_k, rank))
            layer.lokr_w2_b = mx.zeros((rank, in_n))
        else:
            layer.lokr_w2 = mx.zeros((out_k, in_n))
        return layer

    @property
    def TRAINABLE(self) -> tuple[str, ...]:  # noqa: N802 (the AdapterLayer name)
        return tuple(n for n in self._FACTORS if n in self)

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 when both factors are full matrices (LyCORIS)."""
        return 1.0 if "lokr_w1" in self and "lokr_w2" in self else self.alpha / self.rank

    def _factor(self, name: str, dtype) -> mx.array:
        if name in self:
            return self[name].astype(dtype)
        return self[f"{name}_a"].astype(dtype) @ self[f"{name}_b"].astype(dtype)

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        w1 = self._factor("lokr_w1", x.dtype)  # (out_l, in_m)
        grid = self.adapter_input(x).reshape(*x.shape[:-1], w1.shape[1], -1)  # (..., in_m, in_n)
        if "lokr_w2" in self:
            t = grid @ self.lokr_w2.astype(x.dtype).T
        else:
            t = (grid @ self.lokr_w2_b.astype(x.dtype).T) @ self.lokr_w2_a.astype(x.dtype).T
        z = (w1 @ t).reshape(*x.shape[:-1], -1)  # (..., out_l, out_k) → (..., out)
        return y + (self.scale * z).astype(y.dtype)

    def base_layer(self) -> nn.Module:
        return self.linear

    def to_delta(self) -> LokrDelta:
        f = {n: (self[n] if n in self else None) for n in self._FACTORS}
        return LokrDelta(*f.values(), scale=self.scale, alpha=self.alpha)

    @classmethod
    def from_delta(cls, base: nn.Module, delta: LokrDelta) -> LoKrLinear:
        layer = cls()
        layer.linear = base
        layer.rank, layer.alpha = delta.rank, delta.file_alpha
        for name in cls._FACTORS:
            value = getattr(delta, name.removeprefix("lokr_"))
            if value is not None:
                layer[name] = value.astype(mx.float32)
        layer.set_delta(delta)
        return layer

    def set_delta(self, delta) -> bool:
        if not isinstance(delta, LokrDelta):
            return False
        given = {n: getattr(delta, n.removeprefix("lokr_")) for n in self._FACTORS}
        if {n for n, v in given.items() if v is not None} != set(self.TRAINABLE) or any(
            given[n].shape != self[n].shape for n in self.TRAINABLE
        ):
            return False
        if delta.strength != 1.0:
            return False
        _same_alpha(self, delta.file_alpha)
        for name in self.TRAINABLE:
            self[name] = given[name].astype(mx.float32)
        return True


class LoHaLinear(AdapterLayer):
    """A frozen base plus a trainable Hadamard product of two low-rank updates (see module docstring)."""

    TRAINABLE = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    @classmethod
    def from_base(
        cls, linear: nn.Module, rank: int = 8, alpha: float | None = None, dropout: float = 0.0
    ) -> LoHaLinear:
        out_dims, in_dims = linear_dims(linear)
        layer = cls._around(linear, "LoHa", rank, alpha, dropout)
        layer.hada_w1_a = 0.1 * mx.random.normal((out_dims, rank))
        layer.hada_w1_b = mx.random.normal((rank, in_dims))
        layer.hada_w2_a = mx.zeros((out_dims, rank))
        layer.hada_w2_b = mx.random.normal((rank, in_dims))
        return layer

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: mx.array) -> mx.array:
        y = self.linear(x)
        xd = self.adapter_input(x)
        factors = self.to_delta().low_rank()
        if factors is not None:  # (x V^T) U'^T with the exact rank-r² factors
            z = (xd @ factors[0].astype(x.dtype).T) @ factors[1].astype(x.dtype).T
        else:
            z = xd @ self.to_delta().weight_delta().astype(x.dtype).T
        return y + z.astype(y.dtype)

    def base_layer(self) -> nn.Module:
        return self.linear

    def to_delta(self) -> LohaDelta:
        return LohaDelta(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale, self.alpha
        )

    @classmethod
    def from_delta(cls, base: nn.Module, delta: LohaDelta) -> LoHaLinear:
        layer = cls.from_base(base, rank=delta.rank, alpha=delta.file_alpha)
        layer.set_delta(delta)
        return layer

    def set_delta(self, delta) -> bool:
        if (
            not isinstance(delta, LohaDelta)
            or delta.w1_a.shape != self.hada_w1_a.shape
            or delta.strength != 1.0
        ):
            return False
        if delta.w1_b.shape != self.hada_w1_b.shape:
            return False
        _same_alpha(self, delta.file_alpha)
        for name in self.TRAINABLE:
            self[name] = getattr(delta, name.removeprefix("hada_")).astype(mx.float32)
        return True


TRAINABLE_KINDS.update({"dora": DoRALinear, "lokr": LoKrLinear, "loha": LoHaLinear})
