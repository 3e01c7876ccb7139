"""The adapter kinds beside plain LoRA, as deltas (`zrecipe.lora.delta`): DoRA, LoKr, LoHa and full diffs.

- `DecomposedDelta` (DoRA, and LyCORIS' weight-decomposed LoKr / LoHa): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖
  with ΔW the inner kind's update and the norm per output row (PEFT's `use_dora`, LyCORIS `wd_on_out`;
  a file's (1, in) `dora_scale` normalises per input column instead, LyCORIS' older default).
- `LokrDelta` (LyCORIS LoKr): ΔW = scale · kron(W1, W2), each factor a full matrix (`lokr_w1`) or a
  low-rank pair (`lokr_w1_a @ lokr_w1_b`); scale = alpha / rank when a factor is a pair, else 1.
- `LohaDelta` (LyCORIS LoHa): ΔW = scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b), scale = alpha / rank. Its
  exact rank-r² factors (`low_rank()`) let it stack like a LoRA and be written as one for diffusers.
- `DiffDelta`: a full weight difference (`<name>.diff`, LyCORIS "full"); also what a LoKr on a fused
  projection splits into when its factors do not divide along the outputs.

The scale rules and factor shapes follow LyCORIS (`lycoris/modules/lokr.py`, `loha.py`) and ComfyUI's
`comfy/weight_adapter/lokr.py` / `loha.py`, which read these files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import ClassVar

import mlx.core as mx

from zrecipe.errors import UserError
from zrecipe.lora.delta import (
    COMFY,
    DELTA_KINDS,
    DIFFUSERS,
    KOHYA,
    ZRECIPE,
    LoraDelta,
)

_F32 = mx.float32


def _f32(x: mx.array | None) -> mx.array | None:
    return None if x is None else x.astype(_F32)


def _alpha_part(value: float) -> mx.array:
    return mx.array(float(value), dtype=_F32)


def _alpha_of(parts: dict) -> float | None:
    return float(parts["alpha"].item()) if "alpha" in parts else None


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m · n = dimension and m <= n, as LyCORIS factors a layer size for LoKr.

    A positive `factor` that divides `dimension` gives (factor, dimension / factor), ordered. Otherwise
    divisors are walked upwards from 1 (each a candidate m, with n = dimension / m) while m < n and m stays
    within `factor` (unbounded for -1): -1 gives the divisor pair at the square root.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    limit = dimension if factor < 0 else factor
    m, n = 1, dimension
    while m < n:
        candidate = m + 1
        while dimension % candidate:
            candidate += 1
        if candidate > limit:
            break
        m, n = candidate, dimension // candidate
    return (m, n) if m <= n else (n, m)


@dataclass(frozen=True)
class LokrShape:
    """The factor layout LyCORIS gives a Linear (out, in) for LoKr: W1 (out_l, in_m) ⊗ W2 (out_k, in_n)."""

    w1: tuple[int, int]
    w2: tuple[int, int]
    w1_pair: bool  # W1 = w1_a (out_l, r) @ w1_b (r, in_m)
    w2_pair: bool  # W2 = w2_a (out_k, r) @ w2_b (r, in_n)

    @classmethod
    def of(
        cls, out_dims: int, in_dims: int, rank: int, factor: int = -1, decompose_both: bool = False,
        full_matrix: bool = False,
    ) -> LokrShape:  # fmt: skip
        in_m, in_n = factorization(in_dims, factor)
        out_l, out_k = factorization(out_dims, factor)
        w1_pair = decompose_both and rank < max(out_l, in_m) / 2 and not full_matrix
        w2_pair = rank < max(out_k, in_n) / 2 and not full_matrix
        return cls((out_l, in_m), (out_k, in_n), w1_pair, w2_pair)


@dataclass(frozen=True)
class LokrDelta:
    """ΔW = strength · scale · kron(W1, W2); W1 = w1 or w1_a @ w1_b, W2 = w2 or w2_a @ w2_b."""

    w1: mx.array | None
    w1_a: mx.array | None
    w1_b: mx.array | None
    w2: mx.array | None
    w2_a: mx.array | None
    w2_b: mx.array | None
    scale: float
    alpha: float | None = None
    strength: float = 1.0

    KIND: ClassVar[str] = "lokr"
    _NAMES: ClassVar[tuple[str, ...]] = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")
    PART_PATTERNS: ClassVar = tuple((re.compile(rf"\.lokr_{n}$"), n) for n in _NAMES) + (
        (re.compile(r"\.lokr_t[12]$"), "tucker"),
    )

    def _factor(self, which: int) -> mx.array:
        full, a, b = (self.w1, self.w1_a, self.w1_b) if which == 1 else (self.w2, self.w2_a, self.w2_b)
        return full.astype(_F32) if full is not None else a.astype(_F32) @ b.astype(_F32)

    def _shape(self, which: int) -> tuple[int, int]:
        full, a, b = (self.w1, self.w1_a, self.w1_b) if which == 1 else (self.w2, self.w2_a, self.w2_b)
        return tuple(full.shape) if full is not None else (int(a.shape[0]), int(b.shape[1]))

    @property
    def out_dims(self) -> int:
        return self._shape(1)[0] * self._shape(2)[0]

    @property
    def in_dims(self) -> int:
        return self._shape(1)[1] * self._shape(2)[1]

    @property
    def rank(self) -> int:
        """The pairs' inner size (LyCORIS' lora_dim); with two full factors, W2's larger side."""
        if self.w2_a is not None:
            return int(self.w2_a.shape[1])
        if self.w1_a is not None:
            return int(self.w1_a.shape[1])
        return max(self._shape(2))

    @property
    def file_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else self.scale * self.rank

    def weight_delta(self, base_weight: mx.array | None = None) -> mx.array:
        return (self.strength * self.scale) * mx.kron(self._factor(1), self._factor(2))

    def low_rank(self) -> None:
        return None  # rank(W1) · rank(W2) is rarely small: added into the weights

    def scaled(self, strength: float) -> LokrDelta:
        return replace(self, strength=self.strength * float(strength))

    def file_parts(self, style: str) -> dict:
        """`lokr_*` factors (the strength folded into W1) and the alpha; diffusers: the scale folded in too
        and no alpha (its loader bakes alpha / rank into W1 the same way). With two full factors the scale
        is 1 and the alpha written is W2's larger side, which is what musubi-tuner divides it by."""
        parts = {f".lokr_{n}": _f32(getattr(self, n)) for n in self._NAMES if getattr(self, n) is not None}
        first = ".lokr_w1" if self.w1 is not None else ".lokr_w1_a"
        fold = self.strength * (self.scale if style == DIFFUSERS else 1.0)
        parts[first] = fold * parts[first]
        if style != DIFFUSERS:
            both_full = self.w1_a is None and self.w2_a is None
            parts[".alpha"] = _alpha_part(float(self.rank) if both_full else self.file_alpha)
        return parts

    @classmethod
    def from_file_parts(cls, parts: dict, scale_for=None) -> LokrDelta | str:
        """ComfyUI's rule: scale = alpha / rank of the pair (W2's if both are pairs), 1 with no pair or
        no alpha."""
        if "tucker" in parts:
            return "LoKr with a Tucker core (lokr_t2) is for convolutions, not Linear layers"
        f = {n: parts.get(n) for n in cls._NAMES}
        for name in ("w1", "w2"):
            pair = (f[f"{name}_a"] is not None, f[f"{name}_b"] is not None)
            if f[name] is None and pair != (True, True):
                return f"incomplete LoKr factor {name} (needs lokr_{name} or lokr_{name}_a and _b)"
            if f[name] is None and f[f"{name}_a"].shape[1] != f[f"{name}_b"].shape[0]:
                return f"lokr_{name}_a {tuple(f[f'{name}_a'].shape)} and _b do not multiply"
        if any(f[n] is not None and f[n].ndim != 2 for n in cls._NAMES):
            return "LoKr factors must be matrices (a Linear layer's)"
        alpha = _alpha_of(parts)
        dim = (
            int(f["w2_b"].shape[0])
            if f["w2"] is None
            else int(f["w1_b"].shape[0])
            if f["w1"] is None
            else None
        )
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return cls(*(f[n] for n in cls._NAMES), scale=scale, alpha=alpha)

    def with_full_w1(self) -> LokrDelta:
        """The same update with W1 as one matrix (w1_a @ w1_b): the layout musubi-tuner reads. With W2
        full too the scale becomes 1 (no pair left to carry alpha), so it is folded into W1."""
        if self.w1 is not None:
            return self
        w1 = self.w1_a.astype(_F32) @ self.w1_b.astype(_F32)
        if self.w2 is not None:
            return replace(self, w1=self.scale * w1, w1_a=None, w1_b=None, scale=1.0, alpha=None)
        return replace(self, w1=w1, w1_a=None, w1_b=None)

    def split_outputs(self, count: int) -> list | str:
        """Row blocks of a fused projection: W1's rows split when they divide by `count` (exact LoKr
        blocks), else each block is the full difference's rows."""
        rows = self._shape(1)[0]
        if rows % count == 0:
            key = "w1" if self.w1 is not None else "w1_a"
            chunks = mx.split(getattr(self, key), count, axis=0)
            return [replace(self, **{key: c}) for c in chunks]
        if self.out_dims % count:
            return f"fused LoKr has {self.out_dims} rows, not a multiple of {count}"
        return [DiffDelta(w) for w in mx.split(self.weight_delta(), count, axis=0)]


@dataclass(frozen=True)
class LohaDelta:
    """ΔW = strength · scale · (w1_a @ w1_b) ⊙ (w2_a @ w2_b); w*_a (out, r), w*_b (r, in)."""

    w1_a: mx.array
    w1_b: mx.array
    w2_a: mx.array
    w2_b: mx.array
    scale: float
    alpha: float | None = None
    strength: float = 1.0

    KIND: ClassVar[str] = "loha"
    _NAMES: ClassVar[tuple[str, ...]] = ("w1_a", "w1_b", "w2_a", "w2_b")
    PART_PATTERNS: ClassVar = tuple((re.compile(rf"\.hada_{n}$"), n) for n in _NAMES) + (
        (re.compile(r"\.hada_t[12]$"), "tucker"),
    )

    @property
    def out_dims(self) -> int:
        return int(self.w1_a.shape[0])

    @property
    def in_dims(self) -> int:
        return int(self.w1_b.shape[1])

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def file_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else self.scale * self.rank

    def weight_delta(self, base_weight: mx.array | None = None) -> mx.array:
        f = [x.astype(_F32) for x in (self.w1_a, self.w1_b, self.w2_a, self.w2_b)]
        return (self.strength * self.scale) * ((f[0] @ f[1]) * (f[2] @ f[3]))

    def hadamard_factors(self) -> tuple[mx.array, mx.array]:
        """(V (r², in), U (out, r²)) with (w1_a @ w1_b) ⊙ (w2_a @ w2_b) = U @ V exactly: column k·r + l of
        U is w1_a[:, k] ⊙ w2_a[:, l], row k·r + l of V is w1_b[k] ⊙ w2_b[l]."""
        a1, b1, a2, b2 = (x.astype(_F32) for x in (self.w1_a, self.w1_b, self.w2_a, self.w2_b))
        r = self.rank
        u = (a1[:, :, None] * a2[:, None, :]).reshape(self.out_dims, r * r)
        v = (b1[:, None, :] * b2[None, :, :]).reshape(r * r, self.in_dims)
        return v, u

    def low_rank(self) -> tuple[mx.array, mx.array] | None:
        """The exact rank-r² factors (A, B'), when that is cheaper than the dense ΔW, else None."""
        r2 = self.rank**2
        if r2 * (self.in_dims + self.out_dims) >= self.in_dims * self.out_dims:
            return None
        v, u = self.hadamard_factors()
        return v, (self.strength * self.scale) * u

    def as_lora(self) -> LoraDelta:
        """The same update as a rank-r² LoRA (exact; what clients that load no LoHa get)."""
        v, u = self.hadamard_factors()
        return LoraDelta(v, (self.strength * self.scale) * u, 1.0, float(self.rank**2))

    def scaled(self, strength: float) -> LohaDelta:
        return replace(self, strength=self.strength * float(strength))

    def file_parts(self, style: str) -> dict:
        """`hada_*` factors and alpha; diffusers loads no LoHa, so it gets the exact rank-r² LoRA."""
        if style == DIFFUSERS:
            return self.as_lora().file_parts(style)
        parts = {f".hada_{n}": _f32(getattr(self, n)) for n in self._NAMES}
        parts[".hada_w1_a"] = self.strength * parts[".hada_w1_a"]
        parts[".alpha"] = _alpha_part(self.file_alpha)
        return parts

    @classmethod
    def from_file_parts(cls, parts: dict, scale_for=None) -> LohaDelta | str:
        """scale = alpha / rank (rank = hada_w1_b's rows), 1 without an alpha (ComfyUI's rule)."""
        if "tucker" in parts:
            return "LoHa with Tucker cores (hada_t1/t2) is for convolutions, not Linear layers"
        missing = [n for n in cls._NAMES if n not in parts]
        if missing:
            return "incomplete LoHa (missing " + ", ".join(f"hada_{n}" for n in missing) + ")"
        a1, b1, a2, b2 = (parts[n] for n in cls._NAMES)
        if any(x.ndim != 2 for x in (a1, b1, a2, b2)) or a1.shape != a2.shape or b1.shape != b2.shape:
            return "LoHa factors do not form two (out, r) @ (r, in) pairs of one shape"
        if a1.shape[1] != b1.shape[0]:
            return f"hada_w1_a {tuple(a1.shape)} and hada_w1_b {tuple(b1.shape)} do not multiply"
        alpha = _alpha_of(parts)
        scale = alpha / int(b1.shape[0]) if alpha is not None else 1.0
        return cls(a1, b1, a2, b2, scale, alpha)

    def split_outputs(self, count: int) -> list | str:
        if self.out_dims % count:
            return f"fused LoHa has {self.out_dims} rows, not a multiple of {count}"
        a1, a2 = mx.split(self.w1_a, count, axis=0), mx.split(self.w2_a, count, axis=0)
        return [replace(self, w1_a=x, w2_a=y) for x, y in zip(a1, a2, strict=True)]


@dataclass(frozen=True)
class DiffDelta:
    """A full weight difference ΔW (out, in) (`<name>.diff`: LyCORIS "full", ComfyUI's diff patch)."""

    W: mx.array
    strength: float = 1.0

    KIND: ClassVar[str] = "diff"
    PART_PATTERNS: ClassVar = ((re.compile(r"\.diff$"), "diff"),)

    @property
    def out_dims(self) -> int:
        return int(self.W.shape[0])

    @property
    def in_dims(self) -> int:
        return int(self.W.shape[1])

    @property
    def rank(self) -> int:
        return min(self.out_dims, self.in_dims)

    @property
    def file_alpha(self) -> float:
        return float(self.rank)

    def weight_delta(self, base_weight: mx.array | None = None) -> mx.array:
        return self.strength * self.W.astype(_F32)

    def low_rank(self) -> None:
        return None

    def scaled(self, strength: float) -> DiffDelta:
        return DiffDelta(self.W, self.strength * float(strength))

    def file_parts(self, style: str) -> dict:
        if style == DIFFUSERS:
            raise UserError("diffusers loads no full weight differences (.diff): export for comfyui instead.")
        return {".diff": self.weight_delta()}

    @classmethod
    def from_file_parts(cls, parts: dict, scale_for=None) -> DiffDelta | str:
        if parts["diff"].ndim != 2:
            return "a .diff for a Linear layer must be a matrix"
        return cls(parts["diff"])

    def split_outputs(self, count: int) -> list | str:
        if self.out_dims % count:
            return f"fused diff has {self.out_dims} rows, not a multiple of {count}"
        return [DiffDelta(w, self.strength) for w in mx.split(self.W, count, axis=0)]


@dataclass(frozen=True)
class DecomposedDelta:
    """Weight decomposition over an inner update: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ (DoRA).

    `magnitude` is (out,) with the norm per output row (PEFT, LyCORIS `wd_on_out`), or (1, in) with the
    norm per input column (a LyCORIS `wd_on_out=False` file). The change it makes needs the base weight.
    The norm is the fp32 2-norm; ComfyUI adds its dtype's eps to it, a 1e-7 relative difference.
    """

    inner: object  # any other delta kind
    magnitude: mx.array
    strength: float = 1.0

    PART_PATTERNS: ClassVar = ()  # its parts are the inner kind's plus the shared magnitude

    @classmethod
    def over(cls, inner, magnitude: mx.array) -> DecomposedDelta | str:
        """From a file's magnitude: (out,), (out, 1) → per row; (1, in) → per column."""
        shape = tuple(magnitude.shape)
        if shape in ((inner.out_dims,), (inner.out_dims, 1)):
            return cls(inner, magnitude.reshape(-1))
        if shape == (1, inner.in_dims):
            return cls(inner, magnitude)
        return f"magnitude {shape} fits neither the {inner.out_dims} outputs nor the {inner.in_dims} inputs"

    @property
    def KIND(self) -> str:  # noqa: N802 (the protocol's name)
        return "dora" if isinstance(self.inner, LoraDelta) else f"{self.inner.KIND}+dora"

    @property
    def per_row(self) -> bool:
        return self.magnitude.ndim == 1

    @property
    def out_dims(self) -> int:
        return self.inner.out_dims

    @property
    def in_dims(self) -> int:
        return self.inner.in_dims

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def file_alpha(self) -> float:
        return self.inner.file_alpha

    def weight_delta(self, base_weight: mx.array | None = None) -> mx.array:
        if base_weight is None:
            raise UserError(
                "a DoRA update depends on the base weights: apply it to a model (or pass --model)."
            )
        w = base_weight.astype(_F32)
        v = w + self.inner.weight_delta(w)
        m = self.magnitude.astype(_F32)
        if self.per_row:
            merged = (m / mx.sqrt(mx.sum(v * v, axis=1)))[:, None] * v
        else:
            merged = (m / mx.sqrt(mx.sum(v * v, axis=0, keepdims=True))) * v
        return self.strength * (merged - w)

    def low_rank(self) -> None:
        return None  # the rescaled rows make it full rank: added into the weights with the base at hand

    def scaled(self, strength: float) -> DecomposedDelta:
        """ComfyUI's strength: W + strength · (W' − W)."""
        return replace(self, strength=self.strength * float(strength))

    def file_parts(self, style: str) -> dict:
        """The inner kind's parts plus the magnitude: `.dora_scale` (out, 1) — 2-D, as ComfyUI broadcasts
        it — or (1, in); diffusers / PEFT: `.lora_magnitude_vector` (out,)."""
        if self.strength != 1.0:
            raise UserError("a DoRA update at a strength other than 1 has no file form; merge it instead.")
        parts = self.inner.file_parts(style)
        m = self.magnitude.astype(_F32)
        if style == DIFFUSERS:
            if not self.per_row or not any(k.endswith(".lora_A.weight") for k in parts):
                raise UserError(
                    f"diffusers loads DoRA only over LoRA with a per-output magnitude, not {self.KIND}; "
                    "export for comfyui instead."
                )
            parts[".lora_magnitude_vector"] = m
        elif style in (ZRECIPE, COMFY, KOHYA):
            parts[".dora_scale"] = m[:, None] if self.per_row else m
        return parts

    @classmethod
    def from_file_parts(cls, parts: dict, scale_for=None) -> str:
        return "a magnitude needs the adapter it decomposes"  # built by `delta.build_delta`

    def split_outputs(self, count: int) -> list | str:
        """Row blocks: the inner update's and the magnitude's (per-row norms only involve their row)."""
        if not self.per_row:
            return "a per-input-column DoRA cannot be split over a fused projection's outputs"
        inner = self.inner.split_outputs(count)
        if isinstance(inner, str):
            return inner
        mags = mx.split(self.magnitude, count, axis=0)
        rows = self.out_dims // count
        # A block whose inner update is empty still rescales its rows: keep it as a zero difference.
        return [
            DecomposedDelta(DiffDelta(mx.zeros((rows, self.in_dims))) if d is None else d, m, self.strength)
            for d, m in zip(inner, mags, strict=True)
        ]


for _kind in (LokrDelta, LohaDelta, DiffDelta):
    DELTA_KINDS[_kind.KIND] = _kind
DELTA_KINDS["dora"] = DecomposedDelta  # read from LoRA parts plus a magnitude (`delta.build_delta`)
