"""LoRA files: the writers for every client's format and the one reader of every convention.

A LoRA is held as {module path: delta} (`zrecipe.lora.delta`; for LoRA ΔW = scale · B @ A in the
orientation PEFT, mflux and zrecipe's own adapter share). Formats written (DESIGN §7):

- `mflux` / `comfyui` (one format): `diffusion_model.<path>.lora_A.weight`, `.lora_B.weight`, and
  `diffusion_model.<path>.alpha` when alpha ≠ rank (mflux, ComfyUI and diffusers read the alpha there).
- `diffusers`: `transformer.<path>.lora_A.weight` / `.lora_B.weight` with the scale folded into B:
  diffusers treats a PEFT file without alphas as scale 1 per module (and mis-prefixes one with `.alpha`
  keys), so folding is what makes every consumer see the same ΔW.
- `kohya`: the kohya names ComfyUI maps onto its own Z-Image layers (comfy/lora.py
  `model_lora_keys_unet`): `lora_unet_<ComfyUI path with _>.lora_down.weight` / `.lora_up.weight` /
  `.alpha`. ComfyUI fuses q/k/v into one `attention.qkv` weight and has no kohya name for each of them, so
  q/k/v are written as one `attention_qkv` LoRA: A = [A_q; A_k; A_v] (rank 3r), B block-diagonal — exact
  (musubi-tuner's `convert_z_image_lora_to_comfy` writes the same layout); `to_out.0` is `attention_out`.
- `musubi`: musubi-tuner's (sd-scripts') naming, split q/k/v: `lora_unet_<path with _>...` (what
  musubi's Z-Image LoRA network loads).
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
from zrecipe.export.lora_keys import (
    comfy_kohya_name,
    key_convention,
    kohya_name,
    parse_key,
    patch_key,
    qkv_head,
    resolve_stem,
)
from zrecipe.lora.delta import COMFY, DIFFUSERS, KOHYA, ZRECIPE, LoraDelta, build_delta
from zrecipe.lora.variants import LokrDelta
from zrecipe.recipe.schema import EXPORT_FORMATS  # the format names a user can ask for

FORMATS = (*EXPORT_FORMATS, "zrecipe")
DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32}
# Metadata keys carried over from the source adapter into exports (DESIGN §7).
CARRIED_METADATA = ("base_model", "recipe_hash", "step", "targets", "zrecipe_version")


@dataclass
class LoraWeights:
    """A LoRA file's updates by module path, plus what could not be matched and the file's metadata."""

    deltas: dict[str, LoraDelta]  # (or any delta kind of zrecipe.lora.delta)
    source: str = ""
    convention: str = "zrecipe"
    metadata: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


def _load(path: str | Path) -> tuple[dict, dict]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: LoRA file not found.")
    if path.suffix.lower() == ".zip":  # a training checkpoint (zrecipe's or another tool's): its adapter
        from zrecipe.export.sources import checkpoint_adapter

        return checkpoint_adapter(path)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:  # mlx raises RuntimeError/ValueError on damaged or non-safetensors files
        raise CheckpointError(f"{path}: cannot read as a safetensors LoRA file ({exc}).") from exc
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: not a safetensors file of named tensors.")
    return tensors, dict(metadata or {})


def holds_adapter(tensors) -> bool:
    """Whether these tensor names are an adapter's (some name is a part of an adapter kind), rather than
    a full model's weights."""
    return any((found := parse_key(k)) is not None and found[1] is not None for k in tensors)


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


def parse_deltas(
    tensors: dict,
    metadata: dict,
    path: str = "LoRA",
    module_shapes: dict[str, tuple[int, int]] | None = None,
    title: str = "this LoRA does not fit the model (made for another model or size?)",
) -> tuple[dict, list[str]]:
    """The one reader of LoRA tensors in every convention: ({module path: delta}, unmatched keys).

    Tensors are grouped by module stem and delta kind (`zrecipe.lora.delta.DELTA_KINDS`); stems are
    resolved against `module_shapes` ({path: (out, in)}) when given, else against Z-Image's naming. A fused
    qkv stem is split onto to_q/to_k/to_v. Broken pairs and mis-sized layers raise one `CheckpointError`
    (starting with `title`) listing all of them.
    """
    paths = set(module_shapes) if module_shapes is not None else None
    patch = patch_key(paths)
    peft = _peft_scales(metadata)
    groups: dict[tuple[str, bool], dict[str, tuple[str, mx.array]]] = {}
    kinds: dict[tuple[str, bool], set[type]] = {}
    unmatched: list[str] = []
    for key in sorted(tensors):
        parsed = parse_key(key)
        if parsed is None:
            unmatched.append(key)
            continue
        stem, kind, part, underscored = parsed
        groups.setdefault((stem, underscored), {})[part] = (key, tensors[key])
        kinds.setdefault((stem, underscored), set()).update({kind} - {None})
    if not groups:
        raise CheckpointError(
            f"{path}: no LoRA tensors found (expected lora_A/lora_B, lora_down/lora_up, LyCORIS lokr_* / hada_* "
            "or .diff keys); "
            f"first keys: {', '.join(sorted(tensors)[:5]) or '(none)'}."
        )
    deltas: dict = {}
    origin: dict[str, tuple[str, bool]] = {}  # path → (key it came from, whether via a fused alias)
    problems: list[str] = []
    for (stem, underscored), parts in sorted(groups.items()):
        keys = [k for k, _ in parts.values()]
        targets = resolve_stem(stem, underscored, paths, patch)
        if targets is None:
            unmatched.extend(keys)
            continue
        first = next(iter(parts.values()))[0]

        def scale_for(rank: int, alpha: float | None, target: str = targets[0][0]) -> float:
            return _scale_for(target, rank, alpha, peft)

        delta = build_delta(kinds[stem, underscored], {part: t for part, (_, t) in parts.items()}, scale_for)
        if isinstance(delta, str):
            problems.append(f"{stem}: {delta} (has {', '.join(sorted(keys))})")
            continue
        fused = len(targets) > 1
        chunks = delta.split_outputs(len(targets)) if fused else [delta]
        if isinstance(chunks, str):
            problems.append(f"{stem}: {chunks}")
            continue
        for (target, _), chunk in zip(targets, chunks, strict=True):
            if chunk is None:
                continue
            if target in deltas:
                # Some trainers write both a fused qkv and the split keys: the explicit split key wins.
                if fused and not origin[target][1]:
                    continue
                if fused == origin[target][1]:
                    problems.append(f"{target}: given twice ({origin[target][0]} and {first})")
                    continue
            deltas[target] = chunk
            origin[target] = (first, fused)
    if module_shapes is not None:
        for target, d in sorted(deltas.items()):
            out_dim, in_dim = module_shapes[target]
            if (d.in_dims, d.out_dims) != (in_dim, out_dim):
                problems.append(
                    f"{target}: LoRA maps {d.in_dims} → {d.out_dims} but the layer is {in_dim} → {out_dim}"
                )
    if problems:
        raise CheckpointError(
            f"{path}: {title}: "
            + "; ".join(problems[:20])
            + (f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    return deltas, unmatched


def lora_from_tensors(
    tensors: dict,
    metadata: dict,
    path: str = "LoRA",
    module_shapes: dict[str, tuple[int, int]] | None = None,
    allow_unmatched: bool = False,
) -> LoraWeights:
    """`read_lora` on tensors already in memory (e.g. a checkpoint zip's adapter); `path` names them."""
    deltas, unmatched = parse_deltas(tensors, metadata, path, module_shapes)
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
        raise UserError(f"unknown LoRA format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}.")
    return "mflux" if fmt == "comfyui" else fmt


def _named(deltas: dict, prefix: str, style: str) -> dict:
    """Each module's parts behind `prefix + path` (the dotted conventions)."""
    out: dict[str, mx.array] = {}
    for path in sorted(deltas):
        for suffix, tensor in deltas[path].file_parts(style).items():
            out[f"{prefix}{path}{suffix}"] = tensor
    return out


def _musubi(deltas: dict) -> dict:
    """musubi-tuner's names; a LoKr's W1 written whole (musubi's LoKr merge reads only `lokr_w1`)."""
    out: dict[str, mx.array] = {}
    for path in sorted(deltas):
        delta = deltas[path]
        delta = delta.with_full_w1() if isinstance(delta, LokrDelta) else delta
        for suffix, tensor in delta.file_parts(KOHYA).items():
            out[kohya_name(path) + suffix] = tensor
    return out


def _diffusers(deltas: dict) -> dict:
    """`transformer.<path>` + the diffusers parts. diffusers' Z-Image loader builds one PEFT config per
    file: LoRA (DoRA when magnitudes are present: then on every layer) or LoKr, never a mix."""
    out = _named(deltas, "transformer.", DIFFUSERS)
    lokr = {k.rsplit(".lokr_", 1)[0] for k in out if ".lokr_" in k}
    lora = {k.rsplit(".lora_", 1)[0] for k in out if ".lora_A." in k}
    dora = {k.rsplit(".lora_", 1)[0] for k in out if k.endswith(".lora_magnitude_vector")}
    if lokr and lora:
        raise UserError(
            "diffusers loads one adapter kind per file, and this adapter mixes LoKr layers with LoRA-type "
            "layers; export it with --format comfyui (ComfyUI, zrecipe) instead."
        )
    if dora and dora != lora:
        raise UserError(
            "diffusers applies DoRA to every layer of a file, and this adapter has DoRA on only some of its "
            "layers; export it with --format comfyui (ComfyUI, zrecipe) instead."
        )
    return out


def _comfy_kohya(deltas: dict) -> dict:
    """kohya names ComfyUI maps; q/k/v of one attention fused into one exact rank-3r `attention_qkv`."""
    out: dict[str, mx.array] = {}
    heads: dict[str, dict[int, object]] = {}
    for path in sorted(deltas):
        head = qkv_head(path)
        if head is not None:
            heads.setdefault(head[0], {})[head[1]] = deltas[path]
            continue
        for suffix, tensor in deltas[path].file_parts(KOHYA).items():
            out[comfy_kohya_name(path) + suffix] = tensor
    for head, parts in heads.items():
        name = kohya_name(head + ".qkv")
        for suffix, tensor in fused_qkv(parts, name).file_parts(KOHYA).items():
            out[name + suffix] = tensor
    return out


def fused_qkv(parts: dict[int, LoraDelta], name: str = "qkv") -> LoraDelta:
    """One LoRA for the fused [q; k; v] projection from the q (0), k (1), v (2) deltas present.

    Each projection gets a rank slice of width r = the largest rank (smaller ones and absent projections
    are zero-padded), A = the slices stacked, B block-diagonal: ΔW_qkv = [ΔW_q; ΔW_k; ΔW_v] exactly, with
    the rank equal thirds that ComfyUI and musubi's converter expect. A common scale s stays in alpha
    (alpha = s · 3r, B untouched); differing scales are folded into their B blocks (alpha = 3r).
    """
    pairs = {}
    for index, delta in parts.items():
        lora = (
            delta if isinstance(delta, LoraDelta) else delta.as_lora() if hasattr(delta, "as_lora") else None
        )
        if lora is None:
            raise UserError(
                f"{name}: ComfyUI's kohya names fuse q/k/v into one qkv, which a {delta.KIND} adapter on q/k/v "
                "cannot be written as; export it with --format comfyui (ComfyUI maps those names itself)."
            )
        pairs[index] = lora
    r = max(d.rank for d in pairs.values())
    any_delta = next(iter(pairs.values()))
    in_dims, out_dims = any_delta.in_dims, any_delta.out_dims  # Z-Image: q, k and v are all dim → dim
    scales = {d.scale for d in pairs.values()}
    common = len(scales) == 1
    a_blocks, b_blocks = [], []
    for index in range(3):
        d = pairs.get(index)
        a = mx.zeros((r, in_dims), mx.float32)
        b = mx.zeros((out_dims, 3 * r), mx.float32)
        if d is not None:
            a[: d.rank] = d.A.astype(mx.float32)
            b_own = d.B.astype(mx.float32) if common else d.scale * d.B.astype(mx.float32)
            b[:, index * r : index * r + d.rank] = b_own
        a_blocks.append(a)
        b_blocks.append(b)
    scale = scales.pop() if common else 1.0
    return LoraDelta(mx.concatenate(a_blocks), mx.concatenate(b_blocks), scale, scale * 3 * r)


# How each format lays out a module's tensors (see the module docstring).
_WRITERS = {
    "mflux": lambda d: _named(d, "diffusion_model.", COMFY),
    "diffusers": _diffusers,
    "kohya": _comfy_kohya,
    "musubi": _musubi,
    "zrecipe": lambda d: _named(d, "", ZRECIPE),
}


def export_tensors(deltas: dict, fmt: str, dtype: str = "bfloat16") -> dict[str, mx.array]:
    """The tensors of `deltas` in format `fmt` (see module docstring), cast to `dtype` (alphas stay fp32)."""
    kind = _format_name(fmt)
    if dtype not in DTYPES:
        raise UserError(f"unknown export dtype {dtype!r}; use bfloat16 or float32.")
    cast = DTYPES[dtype]
    tensors = _WRITERS[kind](deltas)
    return {k: (v if k.endswith(".alpha") else v.astype(cast)) for k, v in tensors.items()}


def _common(values) -> str:
    counted = Counter(values).most_common()
    return _num(counted[0][0]) if counted else ""


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _targets_json(deltas: dict) -> str:
    """{path: {rank, alpha[, kind]}}: the kind only where it is not plain LoRA (LoRA files as before)."""
    out = {}
    for path, d in sorted(deltas.items()):
        out[path] = {"rank": d.rank, "alpha": d.file_alpha}
        if d.KIND != "lora":
            out[path]["kind"] = d.KIND
    return json.dumps(out)


def adapter_file_metadata(deltas: dict, extra: dict | None = None) -> dict[str, str]:
    """zrecipe's adapter.safetensors metadata: format, rank and alpha (the one value, or the sorted distinct
    values as json), targets, version, and the caller's fields."""
    from zrecipe import __version__

    ranks = sorted({d.rank for d in deltas.values()})
    alphas = sorted({d.file_alpha for d in deltas.values()})
    meta = {
        "format": "zrecipe",
        "rank": str(ranks[0]) if len(ranks) == 1 else json.dumps(ranks),
        "alpha": str(alphas[0]) if len(alphas) == 1 else json.dumps(alphas),
        "targets": _targets_json(deltas),
        "zrecipe_version": __version__,
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return meta


def export_metadata(
    deltas: dict,
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
    alphas = [d.file_alpha for d in deltas.values()]
    meta["rank"] = _common(ranks)
    meta["alpha"] = _common(alphas)
    meta.setdefault("targets", _targets_json(deltas))
    meta["format"] = fmt
    meta["exported_by"] = f"zrecipe {__version__}"
    if _format_name(fmt) == "diffusers":
        meta["lora_scale_folded"] = "true"  # alpha/rank already multiplied into lora_B
    if _format_name(fmt) in ("kohya", "musubi"):
        kinds = sorted({d.KIND.removesuffix("+dora") for d in deltas.values()} - {"lora", "dora"})
        network = {"ss_network_module": "networks.lora"}
        if kinds:  # LyCORIS' kohya network module, as LyCORIS-aware tools expect it named
            network = {
                "ss_network_module": "lycoris.kohya",
                "ss_network_args": json.dumps({"algo": kinds[0]}),
            }
        if any(d.KIND.endswith("dora") for d in deltas.values()):
            network["ss_network_args"] = json.dumps({**json.loads(network.get("ss_network_args", "{}")),
                                                     "dora_wd": True})  # fmt: skip
        meta.update(
            {
                **network,
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
