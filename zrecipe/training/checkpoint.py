"""Checkpoint zips (DESIGN §6): written atomically, verified completely before anything is applied.

`<output_path>/checkpoints/<step:07d>_checkpoint.zip` holds exactly MEMBERS. checkpoint.json lists every
other member with its size and xxh128, so a truncated or bit-flipped zip is refused as a whole
(`CheckpointError`) instead of being half-loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import mlx.core as mx

from zrecipe.errors import CheckpointError

MEMBERS = (
    "adapter.safetensors",
    "optimizer.safetensors",
    "iterator.json",
    "loss.json",
    "config.json",
    "checkpoint.json",
)
FORMAT_VERSION = 1


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the same folder; on success fsync it and rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the result should look like any other file
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp.exists():
            tmp.unlink()


def _xxh(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_128_hexdigest(data)


def _safetensors_bytes(tensors: dict[str, mx.array], metadata: dict[str, str] | None, folder: Path) -> bytes:
    path = folder / "t.safetensors"
    mx.eval(tensors)
    mx.save_safetensors(str(path), tensors, metadata=metadata or {})
    data = path.read_bytes()
    path.unlink()
    return data


def checkpoint_path(output_path: str | Path, step: int) -> Path:
    return Path(output_path) / "checkpoints" / f"{step:07d}_checkpoint.zip"


def write_checkpoint(
    output_path: str | Path,
    step: int,
    adapter: tuple[dict[str, mx.array], dict[str, str]],
    optimizer: dict[str, mx.array],
    iterator: dict[str, Any],
    loss: list[dict[str, Any]],
    config: dict[str, Any],
    meta: dict[str, Any],
    keep_last: int | None = None,
    optimizer_metadata: dict[str, str] | None = None,
) -> Path:
    """Write one checkpoint zip atomically and prune older ones beyond `keep_last`; returns its path.

    `meta` adds to checkpoint.json (train step key, dataset fingerprint, model identity, mode, ...);
    `optimizer_metadata` to optimizer.safetensors' metadata (the optimiser's update rule).
    """
    from zrecipe import __version__

    target = checkpoint_path(output_path, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".ckpt-") as scratch:
        members = {
            "adapter.safetensors": _safetensors_bytes(adapter[0], adapter[1], Path(scratch)),
            "optimizer.safetensors": _safetensors_bytes(
                optimizer, {"format": "zrecipe-optimizer", **(optimizer_metadata or {})}, Path(scratch)
            ),
            "iterator.json": json.dumps(iterator).encode(),
            "loss.json": json.dumps(loss).encode(),
            "config.json": json.dumps(config, indent=2, sort_keys=True, default=str).encode(),
        }
    info = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "created": datetime.now(timezone.utc).isoformat(),
        "versions": {"zrecipe": __version__, "mlx": mx.__version__},
        **meta,
        "files": {name: {"size": len(data), "xxh128": _xxh(data)} for name, data in members.items()},
    }
    members["checkpoint.json"] = json.dumps(info, indent=2, sort_keys=True, default=str).encode()
    # Stored, not deflated: safetensors barely compress and storing keeps big checkpoints fast.
    with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in MEMBERS:
            zf.writestr(name, members[name])
    if keep_last:
        for old in list_checkpoints(output_path)[:-keep_last]:
            with contextlib.suppress(OSError):
                old.unlink()
    return target


def list_checkpoints(output_path: str | Path) -> list[Path]:
    """Checkpoint zips under `<output_path>/checkpoints`, oldest step first."""
    folder = Path(output_path) / "checkpoints"
    return sorted(folder.glob("[0-9]" * 7 + "_checkpoint.zip")) if folder.is_dir() else []


@dataclass
class Checkpoint:
    """A fully verified checkpoint, held in memory."""

    path: Path
    step: int
    adapter: dict[str, mx.array]
    adapter_metadata: dict[str, str]
    optimizer: dict[str, mx.array]
    iterator: dict[str, Any]
    loss: list[dict[str, Any]]
    config: dict[str, Any]
    meta: dict[str, Any]
    optimizer_metadata: dict[str, str] = field(default_factory=dict)


def _load_tensors(data: bytes, name: str, folder: Path, where: Path):
    path = folder / name
    path.write_bytes(data)
    try:
        tensors, metadata = mx.load(str(path), return_metadata=True)
        mx.eval(tensors)  # materialise before the scratch file goes away
    except Exception as exc:
        raise CheckpointError(f"{where}: member {name} is not a readable safetensors file ({exc}).") from exc
    return tensors, metadata


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify every member of a checkpoint zip; raises CheckpointError on any damage."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found.")
    damaged = f"{path}: damaged checkpoint"
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if sorted(names) != sorted(MEMBERS):
                from zrecipe.lora.mflux_checkpoint import foreign_checkpoint_message

                if foreign := foreign_checkpoint_message(path, names):  # another tool's valid zip
                    raise CheckpointError(foreign)
                raise CheckpointError(
                    f"{damaged}: members {sorted(names)} differ from the documented {sorted(MEMBERS)}."
                )
            data = {name: zf.read(name) for name in MEMBERS}  # zipfile checks each member's CRC
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{damaged} ({exc}); use an earlier checkpoint.") from exc
    try:
        meta = json.loads(data["checkpoint.json"])
        files = meta["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{damaged}: unreadable checkpoint.json ({exc}).") from exc
    for name in MEMBERS[:-1]:
        expected = files.get(name, {})
        if expected.get("size") != len(data[name]) or expected.get("xxh128") != _xxh(data[name]):
            raise CheckpointError(f"{damaged}: member {name} does not match its recorded hash.")
    try:
        iterator, loss, config = (json.loads(data[n]) for n in ("iterator.json", "loss.json", "config.json"))
    except ValueError as exc:
        raise CheckpointError(f"{damaged}: unreadable json member ({exc}).") from exc
    with tempfile.TemporaryDirectory() as scratch:
        adapter, adapter_meta = _load_tensors(
            data["adapter.safetensors"], "adapter.safetensors", Path(scratch), path
        )
        optimizer, optimizer_meta = _load_tensors(
            data["optimizer.safetensors"], "optimizer.safetensors", Path(scratch), path
        )
    return Checkpoint(
        path,
        int(meta["step"]),
        adapter,
        adapter_meta,
        optimizer,
        iterator,
        loss,
        config,
        meta,
        optimizer_meta,
    )


def check_compatible(
    checkpoint: Checkpoint, model_identity: str, dataset_fingerprint: str, mode: str, force: bool = False
) -> None:
    """Refuse a checkpoint made for another model or mode, or (unless `force`) another dataset."""
    meta = checkpoint.meta
    if meta.get("model_identity") != model_identity:
        raise CheckpointError(
            f"{checkpoint.path}: made for model {meta.get('model_identity')!r}, not the loaded model "
            f"{model_identity!r}; resume with the model it was trained on."
        )
    if meta.get("mode") != mode:
        raise CheckpointError(
            f"{checkpoint.path}: a {meta.get('mode')} checkpoint cannot resume {mode} training."
        )
    if meta.get("dataset_fingerprint") != dataset_fingerprint and not force:
        raise CheckpointError(
            f"{checkpoint.path}: the dataset changed since this checkpoint was written (fingerprint "
            f"{meta.get('dataset_fingerprint')} → {dataset_fingerprint}); pass --force to resume anyway "
            "(the data order restarts with the new dataset)."
        )
