"""Training examples and the resumable, deterministic bucket batch iterator.

An epoch lists every example `repeats` times, groups them by bucket (all items of a batch share a latent
size), shuffles inside each bucket and then the batch order, all from a generator seeded by (seed, epoch).
The iterator's whole state is (epoch, position, the epoch's batches), so a checkpoint restores it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from zrecipe.errors import CheckpointError, DatasetError


@dataclass(frozen=True)
class Example:
    """One pre-computed training item.

    latents: (16, h, w) float32 in model space (after the VAE scale/shift); caption: (L, D) text embedding;
    bucket: the item's size (items of a batch share it); dataset: its dataset name; repeats and
    caption_dropout come from that dataset; key: a content key (store key) used for the dataset fingerprint;
    loss_weight: its dataset's weight in the loss; mask: None or (h, w) float32 loss weights on the latent
    grid (the objective takes the masked mean).
    """

    latents: Any
    caption: Any
    bucket: tuple[int, int]
    dataset: str = "default"
    repeats: int = 1
    caption_dropout: float = 0.0
    key: str | None = None
    loss_weight: float = 1.0
    mask: Any = None


@dataclass
class BatchIterator:
    """Deterministic bucketed batches over `examples`; `state()` / `restore()` make it resumable."""

    examples: Sequence[Example]
    batch_size: int
    seed: int
    epoch: int = 0
    position: int = 0
    batches: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.examples:
            raise DatasetError("training has no examples: every dataset is empty or all items were skipped.")
        if self.batch_size < 1:
            raise DatasetError(f"batch size must be at least 1 (got {self.batch_size}).")
        if not self.batches:
            self.batches = self.epoch_batches(self.epoch)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches (lists of example indices) of one epoch; a pure function of (examples, seed, epoch)."""
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch), 7])
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, example in enumerate(self.examples):
            by_bucket.setdefault(tuple(example.bucket), []).extend([index] * max(1, int(example.repeats)))
        batches: list[list[int]] = []
        for bucket in sorted(by_bucket):
            items = by_bucket[bucket]
            order = [items[i] for i in rng.permutation(len(items))]
            batches.extend(order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    def next(self) -> tuple[list[int], int]:
        """The next batch of example indices and the epoch it belongs to."""
        if self.position >= len(self.batches):
            self.epoch += 1
            self.position = 0
            self.batches = self.epoch_batches(self.epoch)
        batch = self.batches[self.position]
        self.position += 1
        return batch, self.epoch

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next()[0]

    def state(self) -> dict[str, Any]:
        """JSON-able state for iterator.json."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "permutation": self.batches,
        }

    def restore(self, state: dict[str, Any], where: str = "iterator.json") -> None:
        """Continue from a saved state; refuses a state that does not fit these examples."""
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
            batches = [[int(i) for i in b] for b in state["permutation"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{where}: malformed iterator state ({exc}).") from exc
        if int(state.get("batch_size", self.batch_size)) != self.batch_size:
            raise CheckpointError(
                f"{where}: saved with batch size {state.get('batch_size')}, now {self.batch_size}; "
                "resume with the same batch size."
            )
        if any(not 0 <= i < len(self.examples) for b in batches for i in b) or not 0 <= position <= len(
            batches
        ):
            raise CheckpointError(f"{where}: the saved data order does not fit the current examples.")
        self.epoch, self.position, self.batches = epoch, position, batches


def dataset_fingerprint(examples: Sequence[Example]) -> str:
    """A hash of everything about the examples that changes training (content, bucket, repeats, dropout,
    loss weight and mask; the last two only when set, so examples without them keep their fingerprint)."""
    import xxhash

    h = xxhash.xxh3_128()
    for example in examples:
        head = [example.dataset, list(example.bucket), int(example.repeats), float(example.caption_dropout)]
        if example.loss_weight != 1.0:
            head.append({"loss_weight": float(example.loss_weight)})
        h.update(json.dumps(head).encode())
        if example.mask is not None:
            mask = _as_numpy(example.mask)
            h.update(b"mask" + repr(mask.shape).encode() + np.ascontiguousarray(mask).tobytes())
        if example.key is not None:
            h.update(example.key.encode())
        else:
            for array in (example.latents, example.caption):
                data = _as_numpy(array)
                h.update(repr(data.shape).encode())
                h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def _as_numpy(array: Any) -> np.ndarray:
    """float32 NumPy view of a NumPy or MLX array (MLX bfloat16 has no NumPy dtype: cast first)."""
    if not isinstance(array, np.ndarray) and hasattr(array, "astype") and hasattr(array, "dtype"):
        import mlx.core as mx

        if isinstance(array, mx.array):
            array = array.astype(mx.float32)
    return np.asarray(array, dtype=np.float32)
