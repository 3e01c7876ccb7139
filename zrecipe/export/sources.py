"""What `zrecipe export` exports: a recipe's final result, a checkpoint zip's adapter, or an adapter file.

Each input becomes an `ExportSource` (LoRA or full fine-tune tensors + metadata + where outputs go by
default); `run_export` then writes every requested format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from zrecipe.errors import CheckpointError, UserError
from zrecipe.export.lora_formats import holds_adapter, lora_from_tensors, write_lora
from zrecipe.recipe.schema import EXPORT_FORMATS

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
FULL_FORMAT = "zrecipe-full"


@dataclass
class ExportSource:
    path: Path  # the file the tensors came from
    tensors: dict
    metadata: dict
    out_dir: Path  # default destination folder
    stem: str  # default output name stem
    model: str | None = None  # base model spec, when known (needed for full fine-tunes)
    formats: tuple[str, ...] = ()  # the recipe's export formats (defaults for --format)
    dtype: str | None = None  # the recipe's export dtype
    notes: list[str] = field(default_factory=list)

    @property
    def is_full(self) -> bool:
        """Full fine-tune weights (the whole transformer) rather than a LoRA adapter."""
        if self.metadata.get("format") == FULL_FORMAT:
            return True
        return not holds_adapter(self.tensors) and any(k.endswith(".weight") for k in self.tensors)


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read as a safetensors file ({exc}).") from exc
    return tensors, dict(metadata or {})


def _from_recipe(path: Path) -> ExportSource:
    from zrecipe.recipe import load_recipe
    from zrecipe.training.checkpoint import list_checkpoints

    recipe = load_recipe(path)
    out = recipe.save.output_path
    notes = []
    for name in ("adapter.safetensors", "transformer.safetensors"):
        if (out / name).is_file():
            source = _from_file(out / name)
            break
    else:
        checkpoints = list_checkpoints(out)
        if not checkpoints:
            raise UserError(
                f"{path}: no trained result in {out} (no adapter.safetensors, "
                "transformer.safetensors or checkpoints); run `zrecipe build` first."
            )
        source = _from_checkpoint(checkpoints[-1])
        notes.append(f"no final adapter yet: exporting the newest checkpoint {checkpoints[-1].name}")
    source.out_dir = recipe.export.output_path
    source.model = recipe.model
    source.formats = tuple(recipe.export.formats)
    source.dtype = recipe.export.dtype
    source.notes.extend(notes)
    return source


def checkpoint_adapter(path: Path) -> tuple[dict, dict]:
    """(adapter tensors, metadata) of a training checkpoint zip: zrecipe's (verified whole) or an mflux
    training checkpoint (its adapter in zrecipe's layout, see `zrecipe.lora.mflux_checkpoint`)."""
    from zrecipe.lora.mflux_checkpoint import is_mflux_checkpoint, read_mflux_checkpoint
    from zrecipe.training.checkpoint import read_checkpoint

    if is_mflux_checkpoint(path):
        run = read_mflux_checkpoint(path)
        return run.adapter, run.adapter_metadata
    checkpoint = read_checkpoint(path)
    metadata = dict(checkpoint.adapter_metadata or {})
    metadata.setdefault("step", str(checkpoint.step))
    return checkpoint.adapter, metadata


def _from_checkpoint(path: Path) -> ExportSource:
    from zrecipe.lora.mflux_checkpoint import is_mflux_checkpoint, read_mflux_checkpoint
    from zrecipe.training.checkpoint import read_checkpoint

    if is_mflux_checkpoint(path):
        run = read_mflux_checkpoint(path)
        notes = [f"{path.name} is an mflux training checkpoint (step {run.step}): exporting its adapter"]
        return ExportSource(path, run.adapter, run.adapter_metadata, path.parent, path.stem, notes=notes)
    checkpoint = read_checkpoint(path)
    metadata = dict(checkpoint.adapter_metadata or {})
    metadata.setdefault("step", str(checkpoint.step))
    model = checkpoint.config.get("model") if isinstance(checkpoint.config, dict) else None
    return ExportSource(path, checkpoint.adapter, metadata, path.parent, path.stem, model=model)


def _from_file(path: Path) -> ExportSource:
    tensors, metadata = _read_safetensors(path)
    return ExportSource(path, tensors, metadata, path.parent, path.stem, model=metadata.get("base_model"))


def load_export_source(spec: str | Path) -> ExportSource:
    """RECIPE (.yaml/.yml/.json), CHECKPOINT (.zip) or ADAPTER (.safetensors) → ExportSource."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(
            f"{path}: not found; pass a recipe, a checkpoint zip or an adapter .safetensors file."
        )
    suffix = path.suffix.lower()
    if suffix in RECIPE_SUFFIXES:
        return _from_recipe(path)
    if suffix == ".zip":
        return _from_checkpoint(path)
    if suffix == ".safetensors":
        return _from_file(path)
    raise UserError(
        f"{path}: unknown input type {suffix or '(no suffix)'}; pass a recipe (.yaml/.json), "
        "a checkpoint (.zip) or an adapter (.safetensors)."
    )


def _lora_targets(source: ExportSource, formats: list[str], output: Path | None, dtype: str) -> list[Path]:
    lora = lora_from_tensors(source.tensors, source.metadata, str(source.path))
    written = []
    for fmt in formats:
        if output is not None and len(formats) == 1:
            dest = output if output.suffix else output.with_suffix(".safetensors")
        else:
            dest = (output or source.out_dir) / f"{source.stem}_{fmt}.safetensors"
        written.append(write_lora(lora, dest, fmt, dtype))
    return written


def _full_target(
    source: ExportSource, formats: list[str], output: Path | None, dtype: str, model: str | None
) -> list[Path]:
    from zrecipe.export.full_export import export_full_model
    from zrecipe.models.z_image.resolve import resolve_model

    unsupported = [f for f in formats if f not in ("diffusers", "mflux")]
    if unsupported:
        raise UserError(
            f"{source.path}: a full fine-tune exports as a diffusers-layout model folder "
            f"(--format diffusers or mflux), not {', '.join(unsupported)}."
        )
    spec = model or source.model
    if not spec:
        raise UserError(
            f"{source.path}: the base model is unknown; pass --model (folder, preset or repo id)."
        )
    dest = output or source.out_dir / f"{source.stem}_diffusers"
    return [export_full_model(source.tensors, resolve_model(spec), dest, dtype, where=str(source.path))]


def run_export(
    spec: str | Path,
    formats: list[str] | None = None,
    output: str | Path | None = None,
    dtype: str | None = None,
    model: str | None = None,
) -> tuple[list[Path], list[str]]:
    """Export `spec` in each of `formats` (default: the recipe's export formats). Returns (files, notes)."""
    source = load_export_source(spec)
    formats = list(formats or source.formats)
    if not formats:
        raise UserError(
            f"{spec}: give --format ({', '.join(EXPORT_FORMATS)}); the input names no export formats."
        )
    bad = [f for f in formats if f not in EXPORT_FORMATS]
    if bad:
        raise UserError(f"unknown --format {', '.join(bad)}; use one of {', '.join(EXPORT_FORMATS)}.")
    dtype = dtype or source.dtype or "bfloat16"
    out = Path(output).expanduser() if output else None
    if source.is_full:
        files = _full_target(source, list(dict.fromkeys(formats)), out, dtype, model)
    else:
        files = _lora_targets(source, formats, out, dtype)
    return files, source.notes
