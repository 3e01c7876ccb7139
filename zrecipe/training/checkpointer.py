"""Everything a training run writes, and the checkpoint it resumes from.

`Checkpointer` writes `<output_path>/checkpoints/<step:07d>_checkpoint.zip` (DESIGN §6, format in
checkpoint.py), keeps the last `keep_last` of them, rewrites loss.json / loss.png with each one, and writes
the final adapter.safetensors (LoRA) or transformer.safetensors (full), plus adapter_ema.safetensors /
transformer_ema.safetensors when the run keeps an EMA (ema.py: its shadow travels in optimizer.safetensors
under `ema/`). Reading goes the other way: `read` verifies a zip and its fit to this run before anything
is touched; `restore` then puts adapter or transformer, optimiser state, EMA, data order and loss history
back. Under a distributed launcher only rank 0 writes; the other ranks keep the same bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from zrecipe.errors import CheckpointError
from zrecipe.training import checkpoint as ckpt
from zrecipe.training import ema as ema_state
from zrecipe.training.data import BatchIterator, dataset_fingerprint
from zrecipe.training.lora import adapter_metadata, adapter_tensors, load_adapter_tensors, save_adapter
from zrecipe.training.optim import check_rule, flatten_state, restore_state, state_metadata
from zrecipe.training.progress import plot_loss, write_loss_log


@dataclass(frozen=True)
class RunInfo:
    """What a run records about itself and checks on resume.

    model_identity: the base model's content hash (a checkpoint of another model is refused);
    train_step_key: the build's train step key; config: the resolved recipe (config.json);
    adapter_metadata: extra adapter metadata (base_model, recipe_hash, ...);
    checkpoint_meta: extra checkpoint.json fields (recipe_source, ...)."""

    model_identity: str = ""
    train_step_key: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    adapter_metadata: dict[str, Any] = field(default_factory=dict)
    checkpoint_meta: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Checkpoints, loss log and final weights of one run in `output_path` (see the module docstring)."""

    def __init__(
        self,
        output_path: str | Path,
        settings: Any,
        run: RunInfo,
        examples: Sequence[Any],
        world,
        ema: ema_state.ExponentialMovingAverage | None = None,
    ):
        self.output_path = Path(output_path).expanduser()
        self.settings, self.run, self.world, self.ema = settings, run, world, ema
        self.fingerprint = dataset_fingerprint(examples)
        self.history: list[dict[str, Any]] = []  # one record per optimiser step, restored on resume
        self.last: Path | None = None  # the newest checkpoint of this run
        self.resumed: ckpt.Checkpoint | None = None
        self._meta: dict[str, Any] = {}
        if world.main:
            self.output_path.mkdir(parents=True, exist_ok=True)

    def read(self, resume_from: str | Path | None, force: bool = False) -> ckpt.Checkpoint | None:
        """The verified checkpoint to resume from (None: start afresh); refuses a damaged zip, another
        model, mode or optimiser, or (unless `force`) another dataset."""
        if resume_from is None:
            return None
        checkpoint = ckpt.read_checkpoint(resume_from)
        ckpt.check_compatible(
            checkpoint, self.run.model_identity, self.fingerprint, self.settings.mode, force=force
        )
        where = f"{checkpoint.path}: optimizer.safetensors"
        check_rule(checkpoint.optimizer_metadata, self.settings.optimizer, where)
        has_ema = ema_state.METADATA_KEY in checkpoint.optimizer_metadata
        if has_ema != (self.ema is not None):
            kept, asked = ("keeps", "asks for none") if has_ema else ("keeps no", "asks for one")
            raise CheckpointError(
                f"{where}: the checkpoint {kept} EMA of the weights but this recipe {asked} "
                "(training_loop.ema); resume with the EMA setting it was trained with."
            )
        return checkpoint

    def restore(
        self, checkpoint: ckpt.Checkpoint | None, model, optimizer, iterator: BatchIterator, start=None
    ) -> int:
        """Apply a verified checkpoint to the freshly prepared run; returns the step to continue from.
        Without one, a `start` (training.start.StartFrom: a LoRA file or another tool's run) is applied."""
        self.resumed = checkpoint
        if checkpoint is None:
            if start is None:
                return 0
            from zrecipe.training.start import apply_start

            step = apply_start(
                start, model, optimizer, iterator, int(self.settings.gradient_accumulation_steps)
            )
            self.history = list(start.history)
            return step
        where = str(checkpoint.path)
        optimizer_state, ema_weights = ema_state.split_state(checkpoint.optimizer)
        if self.ema is not None and self.world.main:  # through the model: file layout → parameters
            self._load_weights(model, ema_weights, f"{where}: EMA weights")
            self.ema.take_from(model)
        self._load_weights(model, checkpoint.adapter, where)
        restore_state(optimizer, optimizer_state, where)
        if checkpoint.meta.get("dataset_fingerprint") == self.fingerprint:
            iterator.restore(checkpoint.iterator, where)
        else:  # --force over a changed dataset: keep the epoch count, start that epoch's (new) order afresh
            iterator.epoch = int(checkpoint.iterator.get("epoch", 0))
            iterator.position, iterator.batches = 0, iterator.epoch_batches(iterator.epoch)
        self.history = list(checkpoint.loss)
        return checkpoint.step

    def _load_weights(self, model, tensors: dict[str, mx.array], where: str) -> None:
        """Put weights in the layout of adapter.safetensors (LoRA, or the transformer) into the model."""
        if self.settings.mode == "lora":
            load_adapter_tensors(model, tensors, where)
            return
        try:
            model.load_weights(list(tensors.items()), strict=True)
        except ValueError as exc:
            raise CheckpointError(f"{where}: transformer weights do not fit this model ({exc}).") from exc

    def start(self, total_steps: int, trainable_parameters: int) -> None:
        """Fix what every checkpoint.json of the run says about it."""
        started = self.resumed.meta.get("started") if self.resumed else None
        self._meta = {
            **self.run.checkpoint_meta,
            "mode": self.settings.mode,
            "model_identity": self.run.model_identity,
            "dataset_fingerprint": self.fingerprint,
            "train_step_key": self.run.train_step_key,
            "total_steps": total_steps,
            "trainable_parameters": trainable_parameters,
            "world_size": self.world.size,
            "started": started or time.strftime("%FT%T%z"),
        }

    def due(self, step: int, total_steps: int) -> bool:
        """Whether `step` ends with a checkpoint (every `checkpoint_frequency` steps and the last one)."""
        return step % self.settings.checkpoint_frequency == 0 or step == total_steps

    def save(self, step: int, model, optimizer, iterator: BatchIterator) -> Path:
        """Write the checkpoint of `step` (rank 0) and the loss log; returns its path on every rank."""
        self.last = ckpt.checkpoint_path(self.output_path, step)
        if not self.world.main:
            return self.last
        iterator_state = {
            **iterator.state(),
            "rng": {"seed": self.settings.seed, "scheme": "pure(seed, step, micro)"},
        }
        state, metadata = flatten_state(optimizer), state_metadata(self.settings.optimizer)
        if self.ema is not None:
            with self.ema.swapped_in(model):
                ema_tensors, _ = self._weights(model, step)
            state.update({ema_state.PREFIX + k: v for k, v in ema_tensors.items()})
            metadata[ema_state.METADATA_KEY] = ema_state.settings_metadata(self.ema.spec)
        self.last = ckpt.write_checkpoint(
            self.output_path, step, self._weights(model, step), state, iterator_state,
            self.history, self.run.config, self._meta, keep_last=self.settings.keep_last,
            optimizer_metadata=metadata,
        )  # fmt: skip
        write_loss_log(self.output_path / "loss.json", self.history)
        plot_loss(self.output_path / "loss.png", self.history)
        return self.last

    def finish(self, step: int, model, optimizer, iterator: BatchIterator) -> Path:
        """After the last step: its checkpoint (unless written already) and the final weights file (the
        trained weights; the EMA's beside it when the run keeps one)."""
        if self.last != ckpt.checkpoint_path(self.output_path, step):
            self.save(step, model, optimizer, iterator)
        path = self.output_path / final_name(self.settings.mode)
        if not self.world.main:
            return path
        self._write_weights(model, step, path)
        if self.ema is not None:
            with self.ema.swapped_in(model):
                extra = {"ema": ema_state.settings_metadata(self.ema.spec)}
                self._write_weights(model, step, self.output_path / ema_state.ema_name(path.name), extra)
        return path

    def _write_weights(self, model, step: int, path: Path, extra: dict[str, str] | None = None) -> None:
        if self.settings.mode == "lora":
            save_adapter(model, path, {**self._adapter_meta(step), **(extra or {})})
            return
        tensors, metadata = self._weights(model, step)
        mx.eval(tensors)
        with ckpt.atomic_path(path) as tmp:
            mx.save_safetensors(str(tmp), tensors, metadata={**metadata, **(extra or {})})

    def _adapter_meta(self, step: int) -> dict[str, Any]:
        return {**self.run.adapter_metadata, "step": str(step)}

    def _weights(self, model, step: int) -> tuple[dict[str, mx.array], dict[str, str]]:
        """(tensors, metadata) of adapter.safetensors in a checkpoint: the LoRA, or the whole transformer."""
        meta = self._adapter_meta(step)
        if self.settings.mode == "lora":
            return adapter_tensors(model), adapter_metadata(model, meta)
        from zrecipe import __version__

        tensors = dict(tree_flatten(model.parameters()))
        return tensors, {
            "format": "zrecipe-full",
            "zrecipe_version": __version__,
            **{k: str(v) for k, v in meta.items()},
        }


def final_name(mode: str) -> str:
    """The final weights' file name: adapter.safetensors (LoRA) or transformer.safetensors (full)."""
    return "adapter.safetensors" if mode == "lora" else "transformer.safetensors"
