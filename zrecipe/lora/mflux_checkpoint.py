"""mflux training checkpoint zips: recognised by their members and read into what a zrecipe run needs.

mflux 0.24 (`TrainingState.save` in mflux/models/common/training/state/training_state.py) writes
`<output>/checkpoints/<step:07d>_checkpoint.zip`, deflated, holding:

- `<step>_adapter.safetensors`: `diffusion_model.<mflux module path>.lora_A.weight` (r, in) and
  `.lora_B.weight` (out, r), no alpha (the scale alpha / rank lives in the config's targets; none means
  scale 1); metadata `mflux_version`, `model`.
- `<step>_optimizer.safetensors`: `tree_flatten(optimizer.state)` of an MLX optimizer over the whole
  model: `step`, `learning_rate` and, for Adam / AdamW, `transformer.<path>.lora_A.m|v`,
  `transformer.<path>.lora_B.m|v` with lora_A (in, r) and lora_B (r, out) — zrecipe's lora_a / lora_b.
- `<step>_iterator.json` (Python `random` state, permutation, epoch, position, num_iterations),
  `<step>_loss.json` ({step_loss: [{step, loss, time}], batch_loss: [...]}), `<step>_config.json` (the
  training config: model, seed, optimizer, lora_layers.targets[{module_path, blocks, rank, alpha}]),
  `checkpoint.json` ({metadata, files: {config, optimizer, lora_adapter, iterator, loss}}) and `run.json`.

`read_mflux_checkpoint` turns one into an `MfluxCheckpoint`: the adapter in zrecipe's layout, the optimiser
state where it maps onto MLX AdamW's flattened state (as `zrecipe.training.optim.restore_state` takes it),
the step, the loss history, the LoRA targets as recipe targets, and a list of what did not map.
"""

from __future__ import annotations

import json
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import mlx.core as mx

from zrecipe.errors import CheckpointError

_ADAPTER = re.compile(r"^(\d{7})_adapter\.safetensors$")
_OPTIMIZER_KEY = re.compile(r"^transformer\.(.+?)(?:\.loras\.\d+)?\.lora_([AB])\.(m|v)$")
_BLOCK_PATTERN = re.compile(r"^(layers|noise_refiner|context_refiner)\.\{block\}\.(.+)$")
_MAPPED_OPTIMIZERS = ("AdamW", "Adam")  # the same m / v state as zrecipe's AdamW


@dataclass
class MfluxCheckpoint:
    """An mflux training checkpoint, converted. `unmapped` says what a zrecipe run cannot take over."""

    path: Path
    step: int  # training iterations done (mflux's num_iterations)
    mflux_version: str
    model: str  # the config's model name (e.g. "z-image-turbo")
    adapter: dict[str, mx.array]  # zrecipe's adapter layout: <path>.lora_A.weight / .lora_B.weight / .alpha
    adapter_metadata: dict[str, str]
    optimizer: dict[str, mx.array]  # zrecipe's flattened AdamW state, {} when it does not map
    optimizer_name: str
    loss: list[dict[str, Any]]  # [{step, loss}] from mflux's per-step loss
    targets: list[Any]  # zrecipe.recipe.LoraTarget for every block target of the config
    config: dict[str, Any]
    unmapped: list[str] = field(default_factory=list)


def _basenames(zf: zipfile.ZipFile) -> dict[str, str]:
    # mflux reads members by base name (ZipUtil strips folders), so a re-zipped folder still loads there.
    return {PurePosixPath(name).name: name for name in zf.namelist()}


def mflux_members(names) -> str | None:
    """The adapter member's step prefix when `names` (a zip's member names) are an mflux training
    checkpoint's: a `<7 digits>_adapter.safetensors` beside a `checkpoint.json`; else None."""
    base = {PurePosixPath(n).name for n in names}
    steps = [m.group(1) for m in map(_ADAPTER.match, base) if m]
    return steps[0] if len(steps) == 1 and "checkpoint.json" in base else None


def is_mflux_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a readable zip laid out as an mflux training checkpoint."""
    try:
        with zipfile.ZipFile(path) as zf:
            return mflux_members(zf.namelist()) is not None
    except (zipfile.BadZipFile, OSError):
        return False


def foreign_checkpoint_message(path: str | Path, names) -> str | None:
    """What a zip that is not a zrecipe checkpoint is, when zrecipe knows (for read_checkpoint's error)."""
    step = mflux_members(names)
    if step is None:
        return None
    return (
        f"{path}: this is an mflux training checkpoint (step {int(step)}), not a zrecipe checkpoint. "
        "`zrecipe export` and `zrecipe generate --lora-paths` read its adapter; zrecipe cannot resume an "
        "mflux run with --train-checkpoint: train a zrecipe recipe instead."
    )


def _json(zf: zipfile.ZipFile, members: dict[str, str], name: str, where: Path) -> Any:
    if name not in members:
        raise CheckpointError(f"{where}: mflux checkpoint without its {name}.")
    try:
        return json.loads(zf.read(members[name]))
    except (ValueError, zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{where}: unreadable member {name} ({exc}).") from exc


def _tensors(zf: zipfile.ZipFile, members: dict[str, str], name: str, where: Path) -> tuple[dict, dict]:
    if name not in members:
        raise CheckpointError(f"{where}: mflux checkpoint without its {name}.")
    try:
        data = zf.read(members[name])  # zipfile checks the member's CRC
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{where}: damaged member {name} ({exc}).") from exc
    with tempfile.TemporaryDirectory() as scratch:
        file = Path(scratch) / "t.safetensors"
        file.write_bytes(data)
        try:
            tensors, metadata = mx.load(str(file), return_metadata=True)
            mx.eval(tensors)  # materialise before the scratch file goes away
        except Exception as exc:
            raise CheckpointError(
                f"{where}: member {name} is not a readable safetensors file ({exc})."
            ) from exc
    return tensors, dict(metadata or {})


def _zrecipe_path(mflux_path: str) -> str:
    """zrecipe's (the checkpoint's) module path for an mflux module path (`t_embedder.linear1` → `mlp.0`)."""
    from zrecipe.export.lora_keys import resolve_stem

    return resolve_stem(mflux_path, False, None)[0][0]


def _target_paths(targets: list[dict]) -> dict[str, tuple[int, float | None]]:
    """{mflux module path: (rank, alpha)} of the config's lora_layers.targets."""
    out: dict[str, tuple[int, float | None]] = {}
    for t in targets:
        path, blocks = str(t.get("module_path", "")), t.get("blocks")
        if blocks:
            indices = blocks.get("indices") or range(int(blocks["start"]), int(blocks["end"]))
            paths = [path.format(block=b) for b in indices]
        else:
            paths = [path]
        for p in paths:
            out[p] = (int(t["rank"]), None if t.get("alpha") is None else float(t["alpha"]))
    return out


def _recipe_targets(targets: list[dict], unmapped: list[str]) -> list[Any]:
    """The config's block targets as zrecipe LoRA targets; the others are listed in `unmapped`."""
    from zrecipe.recipe import LoraTarget

    out = []
    for t in targets:
        match = _BLOCK_PATTERN.match(str(t.get("module_path", "")))
        blocks = t.get("blocks") or {}
        if not match or blocks.get("indices") is not None or "start" not in blocks:
            unmapped.append(
                f"LoRA target {t.get('module_path')!r}: not a block range zrecipe's `lora:` targets express "
                "(its adapter weights are carried over all the same)"
            )
            continue
        rank = int(t["rank"])
        alpha = float(t["alpha"]) if t.get("alpha") is not None else float(rank)
        out.append(
            LoraTarget(
                match.group(1), int(blocks["start"]), int(blocks["end"]), (match.group(2),), rank, alpha
            )
        )
    return out


def _adapter(tensors: dict, targets: dict, where: Path, unmapped: list[str]) -> dict:
    """{zrecipe path: LoraDelta} of the adapter, at the scale the config trained it with."""
    from zrecipe.export.lora_formats import parse_deltas
    from zrecipe.lora.delta import LoraDelta

    deltas, stray = parse_deltas(tensors, {}, str(where))
    if stray:
        unmapped.append(f"adapter keys that are no Z-Image layer: {', '.join(stray[:10])}")
    by_zrecipe = {_zrecipe_path(p): p for p in targets}
    converted = {}
    for path, d in deltas.items():
        rank, alpha = targets.get(by_zrecipe.get(path, path), (d.rank, None))
        if path not in by_zrecipe:
            unmapped.append(f"{path}: not among the config's targets, taken at scale 1")
        scale = 1.0 if alpha is None else alpha / d.rank
        converted[path] = LoraDelta(d.A, d.B, scale, scale * d.rank)
    return dict(sorted(converted.items()))


def _optimizer(state: dict, name: str, ranks: dict[str, int], unmapped: list[str]) -> dict[str, mx.array]:
    """mflux's flattened optimiser state as zrecipe's AdamW state, or {} (with the reason) if it does not."""
    if name not in _MAPPED_OPTIMIZERS:
        unmapped.append(f"optimizer state: mflux used {name}, whose state has no AdamW equivalent")
        return {}
    out: dict[str, mx.array] = {}
    stray = []
    for key, value in state.items():
        if key in ("step", "learning_rate"):
            out[key] = value
            continue
        match = _OPTIMIZER_KEY.match(key)
        if not match:
            stray.append(key)
            continue
        name = f"{_zrecipe_path(match.group(1))}.lora_{match.group(2).lower()}.{match.group(3)}"
        if name in out:  # two trained LoRAs fused on one layer (mflux's FusedLoRALinear): which is ours?
            stray.append(key)
            continue
        out[name] = value
    expected = {f"{p}.lora_{ab}.{mv}" for p in ranks for ab in "ab" for mv in "mv"} | {
        "step",
        "learning_rate",
    }
    missing = sorted(expected - set(out))
    if stray or missing:
        unmapped.append(
            "optimizer state: it does not cover exactly the adapter's layers "
            f"(unexpected {', '.join(stray[:5]) or 'none'}; missing {', '.join(missing[:5]) or 'none'})"
        )
        return {}
    if name == "Adam":
        unmapped.append("optimizer: mflux used Adam (no weight decay); zrecipe continues with AdamW")
    return out


def read_mflux_checkpoint(path: str | Path) -> MfluxCheckpoint:
    """Read an mflux training checkpoint zip (see the module docstring); CheckpointError when damaged."""
    from zrecipe.export.lora_formats import adapter_file_metadata, export_tensors

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = _basenames(zf)
            if mflux_members(members) is None:
                raise CheckpointError(f"{path}: not an mflux training checkpoint.")
            files = _json(zf, members, "checkpoint.json", path).get("files") or {}
            names = {k: files.get(k) for k in ("config", "optimizer", "lora_adapter", "iterator", "loss")}
            if not all(names.values()):
                raise CheckpointError(
                    f"{path}: checkpoint.json lists no {sorted(k for k, v in names.items() if not v)}."
                )
            config = _json(zf, members, names["config"], path)
            iterator = _json(zf, members, names["iterator"], path)
            loss = _json(zf, members, names["loss"], path)
            adapter_tensors, adapter_meta = _tensors(zf, members, names["lora_adapter"], path)
            optimizer_state, _ = _tensors(zf, members, names["optimizer"], path)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as exc:
        raise CheckpointError(f"{path}: damaged mflux checkpoint zip ({exc}).") from exc
    unmapped: list[str] = []
    raw_targets = list((config.get("lora_layers") or {}).get("targets") or [])
    deltas = _adapter(adapter_tensors, _target_paths(raw_targets), path, unmapped)
    optimizer_name = str((config.get("optimizer") or {}).get("name", "AdamW"))
    optimizer = _optimizer(optimizer_state, optimizer_name, {p: d.rank for p, d in deltas.items()}, unmapped)
    unmapped.append(
        f"data order: mflux's iterator (epoch {iterator.get('epoch')}, position {iterator.get('position')}) "
        "is Python-random; zrecipe draws its own order"
    )
    step = int(iterator.get("num_iterations", 0))
    version = str(adapter_meta.get("mflux_version", "unknown"))
    model = str(config.get("model", adapter_meta.get("model", "")))
    metadata = adapter_file_metadata(
        deltas,
        {"base_model": model, "step": str(step), "converted_from": f"mflux {version} checkpoint {path.name}"},
    )
    steps = loss.get("step_loss", []) if isinstance(loss, dict) else []
    history = [
        {"step": int(e["step"]), "loss": float(e["loss"])} for e in steps if "step" in e and "loss" in e
    ]
    return MfluxCheckpoint(
        path,
        step,
        version,
        model,
        export_tensors(deltas, "zrecipe", "float32"),
        metadata,
        optimizer,
        optimizer_name,
        history,
        _recipe_targets(raw_targets, unmapped),
        config,
        unmapped,
    )
