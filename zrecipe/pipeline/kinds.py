"""The Z-Image step kinds, in one table. Everything about a kind is read from it: the names `--until`,
`--force` and `explain` accept, the engine's StepKinds (the version in every key), the dependency closure of
`--until`, which kinds need the model resolved, and how a distributed build runs each kind.

    name           needs                     models               distribution
    resize         -                         -                    sharded (process pool per rank)
    mask           -                         -                    sharded (process pool per rank)
    encode-image   resize                    vae                  sharded, in the VAE's batches
    encode-text    (caption producers)       text_encoder         sharded, in the text encoder's batches
    train          encode-image, encode-text, transformer         collective (every rank trains)
                   mask
    sample         train, encode-text        transformer, vae     rank 0
    contact-sheet  sample                    -                    rank 0
    export         train                     vae, text_encoder    rank 0 (a full fine-tune's folder
                                                                  carries the base model's other parts)

`models` lists the components a kind reads; their identities are inputs of its nodes' keys (a LoRA export
reads none, so only a full fine-tune's export nodes carry them). A caption-producing kind (see
`captions.CaptionProducer`) is a row of the same shape, registered by the producer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from zrecipe.engine import StepKind
from zrecipe.engine.graph import closure

Distribution = Literal["sharded", "collective", "rank0"]


def one_per_batch(tasks: list, ctx: Any) -> list[list]:
    """Per-item work: every task is its own batch."""
    return [[task] for task in tasks]


@dataclass(frozen=True)
class Kind:
    """One step kind of the Z-Image build.

    run: `run(tasks, ctx)` (zrecipe.engine's contract). needs: kinds whose outputs its nodes read.
    models: model components it reads. distribution: how a multi-rank build runs it (`sharded`: each rank
    takes whole batches of `batches(tasks, ctx)`, the groups `run` computes together, so every entry is
    byte-identical to a one-process build; `collective`: every rank runs it; `rank0`: rank 0 alone).
    parallel: per-item CPU work, chunked over a process pool.
    """

    name: str
    version: int
    run: Callable[..., Any]
    description: str
    needs: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    distribution: Distribution = "rank0"
    parallel: bool = False
    batches: Callable[[list, Any], list[list]] = one_per_batch

    def step_kind(self) -> StepKind:
        """The engine's view of this kind."""
        return StepKind(
            self.name,
            self.version,
            self.run,
            after=self.needs,
            parallel=self.parallel,
            description=self.description,
        )


def _table() -> tuple[Kind, ...]:
    from zrecipe.pipeline import masks, steps

    return (
        Kind("resize", 1, steps.run_resize, "decode, crop, resize", distribution="sharded", parallel=True),
        Kind("mask", 1, masks.run_mask, "loss masks", distribution="sharded", parallel=True),
        Kind("encode-image", 2, steps.run_encode_image, "VAE latents", ("resize",), ("vae",), "sharded",
             batches=steps.image_batches),
        Kind("encode-text", 2, steps.run_encode_text, "text embeddings", (), ("text_encoder",), "sharded",
             batches=steps.text_batches),
        # 2: AdamW follows torch.optim.AdamW (bias-corrected).
        Kind("train", 2, steps.run_train, "LoRA / full fine-tune", ("encode-image", "encode-text", "mask"),
             ("transformer",), "collective"),
        Kind("sample", 1, steps.run_sample, "sample images", ("train", "encode-text"), ("transformer", "vae")),
        Kind("contact-sheet", 1, steps.run_contact_sheet, "grid", ("sample",)),
        # 2: the file name is a parameter (it was the recipe's stem, outside the key); a full fine-tune's
        # export covers the VAE and text encoder it carries; kohya files use ComfyUI's names with a fused
        # qkv (the `musubi` format keeps the split names).
        Kind("export", 2, steps.run_export, "LoRA / model export", ("train",), ("vae", "text_encoder")),
    )  # fmt: skip


TABLE: tuple[Kind, ...] = _table()
BY_NAME: dict[str, Kind] = {k.name: k for k in TABLE}
KINDS: tuple[str, ...] = tuple(BY_NAME)
MODEL_KINDS: tuple[str, ...] = tuple(k.name for k in TABLE if k.models)


def needs(extra: Iterable[Kind] = ()) -> dict[str, tuple[str, ...]]:
    """{kind: kinds it needs} over the table and `extra` kinds (caption producers, which encode-text
    then needs too)."""
    extra = tuple(extra)
    out = {k.name: k.needs for k in (*TABLE, *extra)}
    out["encode-text"] = tuple(sorted({*out["encode-text"], *(k.name for k in extra)}))
    return out


def until_closure(until: str, extra: Iterable[Kind] = ()) -> set[str]:
    """`until` and every kind it needs, transitively (the engine's closure over the table)."""
    return closure(needs(extra), [until])


def lookup(name: str, extra: Mapping[str, Kind] | None = None) -> Kind:
    """The table row of kind `name` (or of an extra kind such as a caption producer's)."""
    if extra and name in extra:
        return extra[name]
    return BY_NAME[name]
