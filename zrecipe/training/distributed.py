"""Data parallelism over MLX's own distributed layer (`mx.distributed`): ranks, collectives, agreement.

A run started by `mlx.launch` (ring, MPI, NCCL or JACCL backend) has one process per rank. Every helper
here is a collective: all ranks must call it in the same order, or the ring waits forever. Failures are
therefore *agreed* first (`phase`): a rank that fails tells the others through one small collective, and
every rank raises — a lone rank never walks away from a collective its peers are blocked in.

Collectives used: `all_sum` (gradients, in buckets like `mlx.nn.average_gradients`; per-step statistics;
barriers) and `all_gather` (small byte strings: hashes, outcomes, error messages). MLX and NumPy are
imported inside the functions, so the CLI can ask `launched()` without loading them.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

from zrecipe.errors import UserError
from zrecipe.training.progress import Progress

# Environment variables a launcher sets in each rank (mlx.launch ring/nccl: MLX_RANK; mpirun: OMPI_*/PMI_*).
LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")
# Gradients are concatenated into buckets of about this size before each all_sum (fewer, larger messages).
BUCKET_BYTES = 32 * 1024**2


class DistributedError(UserError):
    """Ranks disagree (recipe, data, store, settings) or one of them failed; raised on every rank."""

    all_ranks = True  # every rank raises it: ranks > 0 need not print it a second time


@dataclass(frozen=True)
class World:
    """This process's place in the launched job: `rank` of `size` (size 1: a plain single process)."""

    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def main(self) -> bool:
        """Rank 0 writes every file (checkpoints, adapters, reports) and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched() -> bool:
    """Whether a distributed launcher started this process (cheap: environment only, no MLX init)."""
    return any(name in os.environ for name in LAUNCH_ENV)


@functools.lru_cache(maxsize=1)
def world() -> World:
    """The job's world, initialised once. Outside a launcher it is World(0, 1) without touching MLX's
    distributed backends (so a single-machine run never waits for peers)."""
    if not launched():
        return World()
    import mlx.core as mx

    backend = launch_backend()
    group = mx.distributed.init(strict=backend != "any", backend=backend)
    if group.size() == 1 and os.environ.get("MLX_RANK", "0") != "0":
        raise DistributedError(
            f"this process was started as rank {os.environ['MLX_RANK']} but MLX formed a group of one "
            f"(backend {backend}); check the launcher's backend and hostfile."
        )
    return World(group.rank(), group.size(), group)


def launch_backend() -> str:
    """The backend the launcher prepared, from what it put in the environment (mlx.launch writes
    MLX_HOSTFILE for the ring, MLX_JACCL_COORDINATOR for JACCL, NCCL_HOST_IP for NCCL; mpirun its own),
    so MLX never settles on another available backend that forms a group of one."""
    if "MLX_JACCL_COORDINATOR" in os.environ:
        return "jaccl"
    if "NCCL_HOST_IP" in os.environ:
        return "nccl"
    if "MLX_HOSTFILE" in os.environ:
        return "ring"
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMI_RANK" in os.environ:
        return "mpi"
    return "any"


def shard(items: Sequence[Any], w: World) -> list[Any]:
    """This rank's share of `items` (round robin: shares differ in size by at most one item)."""
    return list(items[w.rank :: w.size])


def local_slice(n_global: int, w: World) -> tuple[int, int]:
    """(start, stop) of this rank's part of a global batch of `n_global` items (contiguous; a short last
    batch of a bucket splits as evenly as it can, possibly leaving a rank with nothing)."""
    return n_global * w.rank // w.size, n_global * (w.rank + 1) // w.size


def _eval(x: Any) -> Any:
    import mlx.core as mx
    import numpy as np

    mx.eval(x)
    return np.array(x)


def all_sum(values: Sequence[float], w: World) -> Any:
    """Element-wise float32 sum of `values` over the ranks (one collective), as a NumPy array."""
    import mlx.core as mx
    import numpy as np

    arr = mx.array(np.asarray(values, dtype=np.float32))
    if not w.distributed:
        return np.array(arr)
    return _eval(mx.distributed.all_sum(arr, group=w.group))


def barrier(w: World) -> None:
    """Return on each rank only once every rank got here (a one-element all_sum)."""
    if w.distributed:
        all_sum([1.0], w)


def gather_bytes(payload: bytes, w: World) -> list[bytes]:
    """Every rank's `payload`, indexed by rank (two all_gathers: lengths, then zero-padded bytes)."""
    if not w.distributed:
        return [payload]
    import mlx.core as mx
    import numpy as np

    lengths = _eval(mx.distributed.all_gather(mx.array([len(payload)], dtype=mx.int32), group=w.group))
    width = max(1, int(lengths.max()))
    padded = np.zeros(width, dtype=np.uint8)
    padded[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    rows = _eval(mx.distributed.all_gather(mx.array(padded), group=w.group)).reshape(w.size, width)
    return [rows[r, : int(lengths[r])].tobytes() for r in range(w.size)]


def gather_json(obj: Any, w: World) -> list[Any]:
    """Every rank's JSON-able `obj`, indexed by rank."""
    return [json.loads(b) for b in gather_bytes(json.dumps(obj, sort_keys=True).encode(), w)]


def agree(what: str, value: str, w: World, hint: str = "") -> None:
    """Raise DistributedError on every rank unless all ranks hold the same `value` (a hash or a short
    description) — the guard against ranks that read different recipes, data, models or stores."""
    if not w.distributed:
        return
    values = [b.decode() for b in gather_bytes(value.encode(), w)]
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        shown = "; ".join(f"rank {r}: {_short(values[r])}" for r in [0, *differ][:4])
        raise DistributedError(
            f"the ranks disagree about {what} (rank{'s' if len(differ) > 1 else ''} "
            f"{', '.join(map(str, differ))} differ from rank 0: {shown}). {hint}".strip()
        )


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextmanager
def phase(what: str, w: World) -> Iterator[None]:
    """Run the block on every rank, then agree on the outcome: if any rank raised, every rank raises
    (the failing rank its own error, the others a DistributedError naming it). Use it around work that
    can fail on one rank only (reading files, locking, validation) *before* the next collective."""
    if not w.distributed:
        yield
        return
    try:
        yield
    except Exception as exc:
        _report(what, f"{type(exc).__name__}: {exc}", w)
        exc.all_ranks = True  # type: ignore[attr-defined]  # every rank knows and raises too
        raise
    _report(what, "", w)


def _report(what: str, error: str, w: World) -> None:
    status = gather_json({"error": error, "host": socket.gethostname()}, w)
    failed = [(r, s) for r, s in enumerate(status) if s["error"]]
    if failed and not error:
        lines = "; ".join(f"rank {r} on {s['host']}: {_short(s['error'], 400)}" for r, s in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {w.size} ranks: {lines}")


def sum_gradients(grads: Any, w: World, bucket_bytes: int = BUCKET_BYTES) -> Any:
    """Sum a gradient tree over the ranks, small arrays concatenated into buckets of ~`bucket_bytes` so a
    LoRA's hundreds of tiny matrices cost a handful of collectives (mlx.nn.average_gradients' scheme; a
    sum, not a mean, because each rank already weighted its loss by its share of the global batch)."""
    if not w.distributed:
        return grads
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(grads)
    if not flat:
        return grads
    out: list[tuple[str, Any]] = []
    bucket: list[tuple[str, Any]] = []
    size = 0

    def flush() -> None:
        dtypes = {v.dtype for _, v in bucket}
        if len(dtypes) > 1:  # mixed precisions cannot share one buffer
            out.extend((k, mx.distributed.all_sum(v, group=w.group)) for k, v in bucket)
            return
        summed = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in bucket]), group=w.group)
        offsets = np.cumsum([v.size for _, v in bucket])[:-1].tolist()
        for (k, v), part in zip(bucket, mx.split(summed, offsets), strict=True):
            out.append((k, part.reshape(v.shape)))

    for key, value in flat:
        bucket.append((key, value))
        size += value.nbytes
        if size >= bucket_bytes:
            flush()
            bucket, size = [], 0
    if bucket:
        flush()
    return tree_unflatten(out)


# --- the training loop's per-step pieces ---------------------------------------------------------------


def run_summary(settings: Any, fingerprint: str, identity: str, step: int, total: int) -> str:
    """What every rank must agree on before the first collective, short enough to print when not."""
    import xxhash

    digest = xxhash.xxh64_hexdigest(repr(settings).encode())
    return (
        f"batch {settings.batch_size}x{settings.gradient_accumulation_steps}, steps {step}->{total}, "
        f"data {fingerprint[:12]}, model {identity[:12]}, settings {digest}"
    )


def note_world_change(saved: int, now: int) -> None:
    """Say what resuming on another number of ranks means (it is allowed: every state is global)."""
    if saved != now:
        print(
            f"resuming a checkpoint written by {saved} rank(s) on {now}: the data order, noise, dropout and "
            "schedule continue exactly (they are global); only float rounding of the gradient sum differs, "
            "so the result matches the uninterrupted run to ~1e-6, not bit for bit.",
            file=sys.stderr,
        )


class Share(NamedTuple):
    """This rank's rows `start:stop` of a global batch of `n_global` items and its loss weight (its share
    of the batch: the ranks' weighted gradients sum to the global batch mean's gradient). A plain tuple
    underneath, so `mx.compile` takes it as a constant."""

    start: int
    stop: int
    n_global: int
    weight: float

    @property
    def items(self) -> int:
        """Real items this rank trains on (0 for the weight-0 stand-in)."""
        return self.stop - self.start if self.weight else 0


def batch_share(n_global: int, w: World) -> Share | None:
    """This rank's share of a global batch of `n_global` items; None on a single process (all of it).

    A rank left without items (a short last batch of a bucket) computes on a stand-in, the batch's first
    item with weight 0: it must still take part in every collective."""
    if not w.distributed:
        return None
    start, stop = local_slice(n_global, w)
    if stop == start:
        return Share(0, 1, n_global, 0.0)
    return Share(start, stop, n_global, (stop - start) / n_global)


def step_stats(
    losses: list[float], rate: float, reason: str | None, w: World
) -> tuple[list[float], list[float], str | None]:
    """One small all_sum per step: the global losses (sum of the ranks' weighted ones), every rank's
    items/s, and whether any rank must stop (signal, battery) — so all ranks stop after the same step."""
    stats = [*losses, *([0.0] * w.size), 1.0 if reason else 0.0]
    stats[len(losses) + w.rank] = rate
    total = all_sum(stats, w)
    n = len(losses)
    stop = reason or ("stopped on another rank" if total[-1] > 0 else None)
    return [float(v) for v in total[:n]], [float(v) for v in total[n : n + w.size]], stop


class RankProgress(Progress):
    """Rank 0's progress line with every rank's throughput appended (items/s per rank)."""

    rates: Sequence[float] = ()

    def update_ranks(self, step: int, loss: float, rates: Sequence[float]) -> None:
        self.rates = list(rates)
        self.update(step, loss)

    def line(self, loss: float) -> str:
        base = super().line(loss)
        if len(self.rates) < 2:
            return base
        per_rank = " ".join(f"r{r} {v:.1f}" for r, v in enumerate(self.rates))
        return f"{base}  items/s: {per_rank} (total {sum(self.rates):.1f})"
