"""The train step's work folder (`Store.work_dir(train key)`), where its checkpoints live.

Which checkpoint a train step resumes from (`--force train` empties the folder first; a checkpoint given to
`zrecipe train --train-checkpoint` is copied in when it belongs to this run; a checkpoint of another run is
an error that says what differs), and the train entry committed from the folder once training is done.
The entry holds only what the key determines, so a resumed run stores the bytes an uninterrupted one does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def resume_point(task, ctx, work: Path, examples, log) -> Path | None:
    """The checkpoint to resume from: `--force train` empties the work folder first; a checkpoint given
    with `zrecipe train --train-checkpoint` is copied in (when it belongs to this run); then the newest
    readable checkpoint of this key. A checkpoint of another run in the folder is an error."""
    from zrecipe.training import distributed as dist
    from zrecipe.training.checkpoint import list_checkpoints, read_checkpoint

    w, options = dist.world(), ctx.data.options
    if "train" in options.get("force", ()):
        if w.main:
            for entry in work.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        dist.barrier(w)
    if options.get("resume_checkpoint"):
        seed_work_folder(task, work, Path(options["resume_checkpoint"]), examples)
        dist.barrier(w)
    for candidate in reversed(list_checkpoints(work)):
        try:
            checkpoint = read_checkpoint(candidate)  # a damaged zip (killed while writing) is skipped
        except Exception:  # noqa: BLE001 — any unreadable checkpoint is just not a resume point
            continue
        if checkpoint.meta.get("train_step_key") != task.key:
            from zrecipe.errors import CheckpointError

            source = ctx.data.recipe.source
            raise CheckpointError(
                f"{candidate}: the train step's work folder holds a checkpoint of another training run "
                f"({mismatch(checkpoint, task, examples)}). Run `zrecipe build {source} --force train` to "
                "discard the work folder's checkpoints and train from scratch."
            )
        log(f"train: resuming from {candidate.name}")
        return candidate
    return None


def seed_work_folder(task, work: Path, path: Path, examples) -> None:
    """Copy checkpoint `path` into the work folder (rank 0), refusing one made for another run."""
    import os

    from zrecipe.errors import CheckpointError
    from zrecipe.training import distributed as dist
    from zrecipe.training.checkpoint import checkpoint_path, read_checkpoint

    checkpoint = read_checkpoint(path)
    if checkpoint.meta.get("train_step_key") != task.key:
        raise CheckpointError(
            f"{path}: cannot resume this training run: {mismatch(checkpoint, task, examples)}. Train "
            "from scratch with `zrecipe train --train-config RECIPE` (or `zrecipe build RECIPE`)."
        )
    dest = checkpoint_path(work, checkpoint.step)
    if dist.world().main and not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)


def assistant_input(task, ctx) -> tuple[str, str] | None:
    """(file, identity) of the assistant LoRA the train node fuses into its base, or None."""
    from zrecipe.training.assistant import IDENTITY_PREFIX

    if ctx.data.assistant_lora is None:
        return None
    identity = next(i for i in _literal_inputs(task) if i.startswith(IDENTITY_PREFIX))
    return ctx.data.assistant_lora, identity


def start_input(task, ctx, work: Path, log):
    """The state the run starts from (`training_loop.start_from`, read from bytes checked against the
    planned content hash), or None."""
    from zrecipe.engine.files import read_verified
    from zrecipe.training.start import START_PREFIX, read_start

    if ctx.data.start_from is None:
        return None
    expected = next(i for i in _literal_inputs(task) if i.startswith(START_PREFIX)).removeprefix(START_PREFIX)
    source = Path(ctx.data.start_from)
    data = read_verified(source, expected)  # the bytes the key covers, parsed from a private copy
    copy = work / f".start-{expected[:16]}{source.suffix}"
    copy.write_bytes(data)
    try:
        start = read_start(copy)
    finally:
        copy.unlink(missing_ok=True)
    start.source, start.log = source, log
    log(f"train: starting from {source} ({start.what})")
    for note in start.notes:  # what reading it found (e.g. an optimiser that does not map)
        log(f"train: start_from: {note}")
    return start


def _literal_inputs(task) -> list[str]:
    """The train node's identity inputs (transformer, assistant LoRA, start weights), before its Refs."""
    from zrecipe.engine import Ref

    return [i for i, ref in zip(task.inputs, task.node.inputs, strict=True) if not isinstance(ref, Ref)]


def training_identity(task) -> str:
    """What the run trains on, as checkpoints record it: the transformer's identity, plus the assistant
    LoRA's when one is fused into the base (the train node's inputs before its Refs)."""
    from zrecipe.training.assistant import IDENTITY_PREFIX

    parts = [task.inputs[0], *(i for i in _literal_inputs(task)[1:] if i.startswith(IDENTITY_PREFIX))]
    return "+".join(parts)


def mismatch(checkpoint, task, examples) -> str:
    """Why `checkpoint` does not belong to `task`'s training run, in words."""
    from zrecipe.training.data import dataset_fingerprint

    meta = checkpoint.meta
    if meta.get("model_identity") != training_identity(task):
        return (
            f"it was made for another model ({meta.get('model_identity')}, this build's is "
            f"{training_identity(task)})"
        )
    if meta.get("dataset_fingerprint") != dataset_fingerprint(examples):
        return "the training data changed since it was written (images, captions, repeats or dropout)"
    return (
        f"the training settings or zrecipe's train step differ (train step key {meta.get('train_step_key')}, "
        f"this build's is {task.key})"
    )


# The run's final files copied into the train entry (loss.json is written from the history, without the
# wall-clock times; TensorBoard's event files stay in the work folder: they hold wall-clock times too).
FINAL_FILES = (
    "adapter.safetensors",
    "transformer.safetensors",
    "adapter_ema.safetensors",
    "transformer_ema.safetensors",
    "loss.png",
)


def commit_train(task, ctx, work: Path, result, skipped: list[str], settings) -> None:
    """The train entry: the final weights, the loss log and plot, the scheduled checkpoints' adapters."""
    import mlx.core as mx

    from zrecipe.training.checkpoint import list_checkpoints, read_checkpoint
    from zrecipe.training.ema import ema_weights

    with ctx.output(task) as folder:
        for name in FINAL_FILES:
            if (work / name).exists():
                shutil.copy2(work / name, folder / name)
        # Wall-clock step times stay in the checkpoints' loss.json: an entry holds only what its key
        # determines, and a resumed run must write the same bytes as an uninterrupted one.
        history = [{k: v for k, v in h.items() if k != "time"} for h in result.history]
        (folder / "loss.json").write_text(json.dumps(history))
        steps = []
        if settings.mode == "lora":
            # Intermediate adapters (small) for per-checkpoint samples; the zips stay in the work folder.
            # Only scheduled checkpoints: a stop writes one off the schedule, an uninterrupted run does not.
            (folder / "adapters").mkdir()
            for zpath in list_checkpoints(work):
                step = int(zpath.name[:7])
                if step % settings.checkpoint_frequency and step != result.step:
                    continue
                ck = read_checkpoint(zpath)
                steps.append(ck.step)
                mx.save_safetensors(
                    str(folder / "adapters" / f"{ck.step:07d}.safetensors"), ck.adapter, ck.adapter_metadata
                )
                if (averaged := ema_weights(ck)) is not None:  # for `sample.use_ema`
                    mx.save_safetensors(
                        str(folder / "adapters" / f"{ck.step:07d}_ema.safetensors"), *averaged
                    )
        info = {"checkpoint_steps": steps, "skipped_items": skipped, "final_step": result.step}
        (folder / "train.json").write_text(json.dumps(info, indent=1))
