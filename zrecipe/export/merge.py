"""`zrecipe merge`: several LoRAs (any kind, any convention) into one LoRA of a chosen rank, or into the base.

Into one LoRA: per layer ΔW = Σ wᵢ · ΔWᵢ, then its best rank-R approximation (truncated SVD), written as
a plain LoRA (A = √S·Vᵀ, B = U·√S, alpha = R: scale 1) every client loads. The report gives the energy kept
per layer and overall, Σ kept σ² / Σ σ² (1.0: exact). When every input of a layer is a low-rank update
(LoRA, a small LoHa) its SVD comes from the stacked factors without forming ΔW (QR of both sides, SVD of
the K×K core, K = Σ ranks); otherwise ΔW is formed (DoRA needs the base weights for that: `--model`).

Into the base: the model's transformer with ΔW fused into its weights (`apply_loras(..., fuse=True)`),
written as a diffusers model folder (`export_full_model`) or, for `-o NAME.safetensors`, one safetensors
file in the original Z-Image naming (`full_export.write_original_naming`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from zrecipe.errors import UserError
from zrecipe.export.lora_formats import LoraWeights, read_lora
from zrecipe.lora.delta import LoraDelta


@dataclass
class LayerEnergy:
    path: str
    rank: int  # the rank kept
    kept: float  # Σ of the kept σ²
    total: float  # Σ σ² (= ‖ΔW‖²_F)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total == 0 else self.kept / self.total


@dataclass
class MergeResult:
    deltas: dict[str, LoraDelta]
    layers: list[LayerEnergy] = field(default_factory=list)

    @property
    def kept_energy(self) -> float:
        """Σ kept σ² / Σ σ² over every layer."""
        total = sum(layer.total for layer in self.layers)
        return 1.0 if total == 0 else sum(layer.kept for layer in self.layers) / total


def _svd_of_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, S, Vᵀ) of B @ A (B (out, K), A (K, in)) from QR of each side: O((out + in)·K²)."""
    qb, rb = np.linalg.qr(b)
    qa, ra = np.linalg.qr(a.T)
    u, s, vt = np.linalg.svd(rb @ ra.T)
    return qb @ u, s, vt @ qa.T


def _layer_svd(deltas: list, base_weight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pairs = [d.low_rank() for d in deltas]
    if all(p is not None for p in pairs):
        a = np.concatenate([np.array(p[0], np.float64) for p in pairs], axis=0)
        b = np.concatenate([np.array(p[1], np.float64) for p in pairs], axis=1)
        return _svd_of_factors(a, b)
    dense = sum(np.array(d.weight_delta(base_weight), np.float64) for d in deltas)
    return np.linalg.svd(dense, full_matrices=False)


def merge_loras(
    loras: list[LoraWeights],
    weights: list[float] | None = None,
    rank: int | None = None,
    base_weights: dict[str, mx.array] | None = None,
) -> MergeResult:
    """Σ wᵢ · loraᵢ per layer at rank `rank` (default: every singular value, i.e. exact: the sum of the
    inputs' ranks for low-rank inputs). `base_weights` ({module path: weight (out, in)}) is needed for DoRA
    inputs."""
    weights = [1.0] * len(loras) if weights is None else [float(w) for w in weights]
    if len(weights) != len(loras):
        raise UserError(f"{len(loras)} LoRA file(s) but {len(weights)} weight(s): give one weight per LoRA.")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}.")
    per_path: dict[str, list] = {}
    for lora, weight in zip(loras, weights, strict=True):
        for path, delta in lora.deltas.items():
            per_path.setdefault(path, []).append(delta.scaled(weight))
    result = MergeResult({})
    for path, deltas in sorted(per_path.items()):
        shapes = {(d.out_dims, d.in_dims) for d in deltas}
        if len(shapes) > 1:
            raise UserError(f"{path}: the LoRAs disagree on this layer's size ({sorted(shapes)}).")
        base = None if base_weights is None else base_weights.get(path)
        u, s, vt = _layer_svd(deltas, base)
        keep = len(s) if rank is None else min(rank, len(s))
        root = np.sqrt(s[:keep])
        a = (root[:, None] * vt[:keep]).astype(np.float32)
        b = (u[:, :keep] * root[None, :]).astype(np.float32)
        result.deltas[path] = LoraDelta(mx.array(a), mx.array(b), 1.0, float(keep))
        energy = s.astype(np.float64) ** 2
        result.layers.append(LayerEnergy(path, keep, float(energy[:keep].sum()), float(energy.sum())))
    return result


def merge_files(
    paths: list[str | Path],
    weights: list[float] | None,
    rank: int | None,
    output: str | Path,
    fmt: str = "comfyui",
    dtype: str = "float32",
    model: str | None = None,
) -> tuple[Path, MergeResult]:
    """Read `paths`, merge them (`merge_loras`) and write the result in format `fmt`."""
    from zrecipe.export.lora_formats import write_lora

    loras = [read_lora(Path(p)) for p in paths]
    base = None
    if any(d.low_rank() is None and d.KIND.endswith("dora") for lora in loras for d in lora.deltas.values()):
        if model is None:
            raise UserError(
                "a DoRA input depends on the base weights: pass --model (folder, preset or repo id)."
            )
        base = _base_weights(model)
    result = merge_loras(loras, weights, rank, base)
    meta = {"merged_from": [str(p) for p in paths], "merge_weights": list(weights or [1.0] * len(paths)),
            "merge_kept_energy": f"{result.kept_energy:.6f}"}  # fmt: skip
    written = write_lora(result.deltas, Path(output), fmt, dtype, metadata=meta)
    return written, result


def _base_weights(model: str) -> dict[str, mx.array]:
    from zrecipe.lora.delta import dense_weight
    from zrecipe.lora.layers import linear_shapes
    from zrecipe.models.z_image.resolve import resolve_model
    from zrecipe.models.z_image.transformer import load_transformer

    transformer = load_transformer(resolve_model(model), dtype="float32")
    modules = dict(transformer.named_modules())
    return {path: dense_weight(modules[path]) for path in linear_shapes(transformer)}


def fuse_into_base(
    paths: list[str | Path],
    weights: list[float] | None,
    model: str,
    output: str | Path,
    dtype: str = "bfloat16",
) -> Path:
    """The base transformer with the LoRAs fused in, written as a full model: a diffusers folder, or one
    safetensors file in the original naming when `output` ends in `.safetensors`."""
    from zrecipe.export.apply import apply_loras
    from zrecipe.export.full_export import export_full_model, write_original_naming
    from zrecipe.models.z_image.resolve import resolve_model
    from zrecipe.models.z_image.transformer import export_weights, load_transformer

    folder = resolve_model(model)
    transformer = load_transformer(folder, dtype="float32")  # fuse in fp32; the writer casts to `dtype`
    apply_loras(transformer, [Path(p) for p in paths], weights, fuse=True)
    tensors = export_weights(transformer)
    output = Path(output)
    if output.suffix.lower() == ".safetensors":
        return write_original_naming(tensors, transformer.config, output, dtype)
    return export_full_model(tensors, folder, output, dtype, where="the fused model")
