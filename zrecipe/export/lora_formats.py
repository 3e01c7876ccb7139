"""LoRA files: the writers for mflux/ComfyUI, diffusers and kohya, and one reader for every convention.

A LoRA is held as {module path: LoraDelta(A (r, in), B (out, r), scale)} with ΔW = scale · B @ A, the
orientation PEFT, mflux and zrecipe's own adapter share. Formats written (DESIGN §7):

- `mflux` / `comfyui` (one format): `diffusion_model.<path>.lora_A.weight`, `.lora_B.weight`, and
  `diffusion_model.<path>.alpha` when alpha ≠ rank (mflux, ComfyUI and diffusers read the alpha there).
- `diffusers`: `transformer.<path>.lora_A.weight` / `.lora_B.weight` with the scale folded into B:
  diffusers treats a PEFT file without alphas as scale 1 per module (and mis-prefixes one with `.alpha`
  keys), so folding is what makes every consumer see the same ΔW.
- `kohya`: `lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (always written).
- `zrecipe`: the training adapter layout (`<path>.lora_A.weight`, `.lora_B.weight`, `.alpha`).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from zrecipe.errors import CheckpointError, UserError
from zrecipe.export.lora_keys import key_convention, kohya_name, parse_key, patch_key, resolve_stem

FORMATS = ("mflux", "comfyui", "diffusers", "kohya", "zrecipe")
DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}
# Metadata keys carried over from the source adapter into exports (DESIGN §7).
CARRIED_METADATA = ("base_model", "recipe_hash", "step", "targets", "zrecipe_version")


@dataclass(frozen=True)
class LoraDelta:
    """One module's low-rank update: ΔW = scale · B @ A. `alpha` is the file's alpha (None if absent)."""

    A: mx.array  # (rank, in)
    B: mx.array  # (out, rank)
    scale: float
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self) -> mx.array:
        """ΔW (out, in) in float32."""
        return self.scale * (self.B.astype(mx.float32) @ self.A.astype(mx.float32))


@dataclass
class LoraWeights:
    """A LoRA file's updates by module path, plus what could not be matched and the file's metadata."""

    deltas: dict[str, LoraDelta]
    source: str = ""
    convention: str = "zrecipe"
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def _load(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found.")
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError on damaged or non-safetensors files
        raise CheckpointError(f"{path}: cannot read as a safetensors LoRA file ({exc}).") from exc
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: not a safetensors file of named tensors.")
    return tensors, dict(metadata or {})


def _peft_scales(metadata: dict) -> dict:
    """diffusers' `lora_adapter_metadata` (a packed LoraConfig), unpacked; {} when absent."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    return {k.removeprefix("transformer."): v for k, v in data.items()}


def _scale_for(path: str, rank: int, alpha: float | None, peft: dict) -> float:
    """alpha / rank; without an alpha tensor, PEFT metadata (lora_alpha, alpha_pattern, rslora) or 1."""
    if alpha is not None:
        return float(alpha) / rank
    if not peft or "lora_alpha" not in peft:
        return 1.0
    value = float(peft["lora_alpha"])
    for pattern, pattern_alpha in (peft.get("alpha_pattern") or {}).items():
        if path == pattern or path.endswith("." + pattern):
            value = float(pattern_alpha)
    return value / (rank**0.5 if peft.get("use_rslora") else rank)


def read_lora(
    path: str | Path,
    module_shapes: dict[str, tuple[int, int]] | None = None,
    allow_unmatched: bool = False,
) -> LoraWeights:
    """Read a LoRA file in any known convention → {module path: LoraDelta}.

    `module_shapes` ({path: (out, in)} of the model's Linear layers, see `apply.linear_shapes`) resolves
    ambiguous kohya names and checks shapes. Keys matching no layer are listed in one error (or kept in
    `.unmatched` with `allow_unmatched`); a file for another model (nothing matches, or shapes differ) is
    refused with a `CheckpointError`.
    """
    tensors, metadata = _load(path)
    return lora_from_tensors(tensors, metadata, str(path), module_shapes, allow_unmatched)


def lora_from_tensors(
    tensors: dict,
    metadata: dict,
    path: str = "LoRA",
    module_shapes: dict[str, tuple[int, int]] | None = None,
    allow_unmatched: bool = False,
) -> LoraWeights:
    """`read_lora` on tensors already in memory (e.g. a checkpoint zip's adapter); `path` names them."""
    paths = set(module_shapes) if module_shapes is not None else None
    patch = patch_key(paths)
    peft = _peft_scales(metadata)
    groups: dict[tuple[str, bool], dict[str, tuple[str, mx.array]]] = {}
    unmatched: list[str] = []
    for key in sorted(tensors):
        parsed = parse_key(key)
        if parsed is None:
            unmatched.append(key)
            continue
        stem, part, underscored = parsed
        groups.setdefault((stem, underscored), {})[part] = (key, tensors[key])
    if not groups:
        raise CheckpointError(
            f"{path}: no LoRA tensors found (expected lora_A/lora_B or lora_down/lora_up keys); "
            f"first keys: {', '.join(sorted(tensors)[:5]) or '(none)'}."
        )
    deltas: dict[str, LoraDelta] = {}
    origin: dict[str, tuple[str, bool]] = {}  # path → (key it came from, whether via a fused alias)
    problems: list[str] = []
    for (stem, underscored), parts in sorted(groups.items()):
        keys = [k for k, _ in parts.values()]
        targets = resolve_stem(stem, underscored, paths, patch)
        if targets is None:
            unmatched.extend(keys)
            continue
        if "down" not in parts or "up" not in parts:
            problems.append(f"{stem}: incomplete LoRA pair (only {', '.join(sorted(keys))})")
            continue
        a, b = parts["down"][1], parts["up"][1]
        alpha = float(parts["alpha"][1].item()) if "alpha" in parts else None
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            problems.append(f"{stem}: A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair")
            continue
        fused = len(targets) > 1
        if fused and b.shape[0] % len(targets):
            problems.append(f"{stem}: fused qkv B has {b.shape[0]} rows, not a multiple of 3")
            continue
        chunks = mx.split(b, len(targets), axis=0) if fused else [b]
        for (target, _), chunk in zip(targets, chunks, strict=True):
            if target in deltas:
                # Some trainers write both a fused qkv and the split keys: the explicit split key wins.
                if fused and not origin[target][1]:
                    continue
                if fused == origin[target][1]:
                    problems.append(f"{target}: given twice ({origin[target][0]} and {parts['down'][0]})")
                    continue
            rank = int(a.shape[0])
            deltas[target] = LoraDelta(a, chunk, _scale_for(target, rank, alpha, peft), alpha)
            origin[target] = (parts["down"][0], fused)
    if module_shapes is not None:
        for target, d in sorted(deltas.items()):
            out_dim, in_dim = module_shapes[target]
            if d.A.shape[1] != in_dim or d.B.shape[0] != out_dim:
                problems.append(
                    f"{target}: LoRA maps {d.A.shape[1]} → {d.B.shape[0]} but the layer is "
                    f"{in_dim} → {out_dim}"
                )
    if problems:
        raise CheckpointError(
            f"{path}: this LoRA does not fit the model (made for another model or size?): "
            + "; ".join(problems[:20])
            + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    if not deltas:
        raise CheckpointError(
            f"{path}: none of its {len(tensors)} keys matches a Z-Image transformer layer "
            f"(e.g. {', '.join(unmatched[:3])}); it is probably a LoRA for another model."
        )
    if unmatched and not allow_unmatched:
        shown = ", ".join(unmatched[:20]) + (
            f", ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else ""
        )
        raise CheckpointError(
            f"{path}: {len(unmatched)} key(s) match no layer of this model: {shown}. "
            "Pass --allow-unmatched to apply the rest anyway."
        )
    return LoraWeights(
        deltas, str(path), metadata.get("format") or key_convention(list(tensors)), metadata, unmatched
    )


def _format_name(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UserError(f"unknown LoRA format {fmt!r}; use one of {', '.join(FORMATS[:4])}.")
    return "mflux" if fmt == "comfyui" else fmt


def _alpha_of(d: LoraDelta) -> float:
    """The alpha to write: the file's own, else the one that reproduces the scale."""
    return float(d.alpha) if d.alpha is not None else d.scale * d.rank


def export_tensors(deltas: dict[str, LoraDelta], fmt: str, dtype: str = "bfloat16") -> dict[str, mx.array]:
    """The tensors of `deltas` in format `fmt` (see module docstring), cast to `dtype`."""
    kind = _format_name(fmt)
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use bfloat16 or float32.")
    cast = DTYPES[dtype]
    out: dict[str, mx.array] = {}
    for path in sorted(deltas):
        d = deltas[path]
        a, b = d.A.astype(mx.float32), d.B.astype(mx.float32)
        alpha = mx.array(_alpha_of(d), dtype=mx.float32)
        if kind == "kohya":
            base = kohya_name(path)
            out[f"{base}.lora_down.weight"] = a.astype(cast)
            out[f"{base}.lora_up.weight"] = b.astype(cast)
            out[f"{base}.alpha"] = alpha
        elif kind == "diffusers":
            out[f"transformer.{path}.lora_A.weight"] = a.astype(cast)
            out[f"transformer.{path}.lora_B.weight"] = (d.scale * b).astype(cast)
        else:
            prefix = "diffusion_model." if kind == "mflux" else ""
            out[f"{prefix}{path}.lora_A.weight"] = a.astype(cast)
            out[f"{prefix}{path}.lora_B.weight"] = b.astype(cast)
            if kind == "zrecipe" or d.scale != 1.0:
                out[f"{prefix}{path}.alpha"] = alpha
    return out


def _common(values) -> str:
    counted = Counter(values).most_common()
    return _num(counted[0][0]) if counted else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def export_metadata(
    deltas: dict[str, LoraDelta],
    fmt: str,
    source: dict | None = None,
    extra: dict | None = None,
    name: str = "",
) -> dict[str, str]:
    """Self-describing metadata: format, base model, rank, alpha, targets, recipe hash, step, version;
    kohya files also get the `ss_*` fields kohya-aware tools read."""
    from zrecipe import __version__

    source = source or {}
    meta = {k: str(source[k]) for k in CARRIED_METADATA if k in source}
    meta.setdefault("zrecipe_version", __version__)
    ranks = [d.rank for d in deltas.values()]
    alphas = [_alpha_of(d) for d in deltas.values()]
    meta["rank"] = _common(ranks)
    meta["alpha"] = _common(alphas)
    meta.setdefault(
        "targets", json.dumps({p: {"rank": d.rank, "alpha": _alpha_of(d)} for p, d in sorted(deltas.items())})
    )
    meta["format"] = fmt
    meta["exported_by"] = f"zrecipe {__version__}"
    if _format_name(fmt) == "diffusers":
        meta["lora_scale_folded"] = "true"  # alpha/rank already multiplied into lora_B
    if _format_name(fmt) == "kohya":
        meta.update(
            {
                "ss_network_module": "networks.lora",
                "ss_network_dim": meta["rank"],
                "ss_network_alpha": meta["alpha"],
                "ss_base_model_version": "z_image",
                "ss_sd_model_name": meta.get("base_model", ""),
                "ss_output_name": name,
                "ss_steps": meta.get("step", ""),
                "ss_training_comment": f"exported by zrecipe {__version__}",
            }
        )
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def write_lora(
    adapter: LoraWeights | dict[str, LoraDelta],
    path: str | Path,
    fmt: str,
    dtype: str = "bfloat16",
    metadata: dict | None = None,
) -> Path:
    """Write `adapter` to `path` in format `fmt` (atomically: temp file in the same folder, then rename)."""
    deltas = adapter.deltas if isinstance(adapter, LoraWeights) else adapter
    source = adapter.metadata if isinstance(adapter, LoraWeights) else {}
    if not deltas:
        raise UserError(f"{path}: nothing to export (the adapter has no LoRA layers).")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = export_tensors(deltas, fmt, dtype)
    meta = export_metadata(deltas, fmt, source, metadata, name=path.stem)
    tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}.safetensors"  # mlx appends the suffix otherwise
    try:
        mx.eval(tensors)
        mx.save_safetensors(str(tmp), tensors, metadata=meta)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
