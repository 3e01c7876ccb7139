"""LoRA targets, from the seed's `lora_layers` form or the native `lora:` block.

Seed form (as mflux writes it):

    lora_layers:
      main_layers:                        # main_layers / layers → `layers`; noise_refiner and
        block_range: {start: 0, end: 30}  #   context_refiner name themselves; any other group name
        layer_types: [attention.to_q]     #   needs `block_type:`. `end` is exclusive; no block_range
        lora_rank: 32                     #   → every block of the type
        lora_alpha: 32                    # optional, default = rank

Native form:

    lora:
      rank: 16                  # default rank of every target (16)
      alpha: 16                 # default alpha of every target (default: the target's rank)
      kind: lora                # default adapter kind: lora | dora | lokr | loha (lora)
      dropout: 0.0              # default LoRA dropout (on the adapter path's input, training only)
      targets:                  # default: attention q/k/v/out of every `layers` block
        - blocks: layers        # layers | noise_refiner | context_refiner (default layers)
          range: [0, 30]        # [start, end), end exclusive; omitted, or end null → to the last block
          layer_types: [attention, feed_forward.w1]   # names, or the shorthands attention / feed_forward
          rank: 32              # per-target overrides of rank, alpha, kind, dropout
          alpha: 16
          kind: lokr
          factor: 8             # LoKr only (LyCORIS defaults): factor -1, decompose_both false,
          decompose_both: false #   full_matrix false
          full_matrix: false

Layer types are resolved to full names in canonical order, and targets are sorted (block type, range,
layer types). Two targets may not put a LoRA on the same
layer (one layer, one rank). Block counts come from the model, so an `end` past the last block is caught
when the LoRA is applied, not here.
"""

from __future__ import annotations

from typing import Any

from zrecipe.recipe.fields import (
    MISSING,
    Bad,
    Context,
    KeyPath,
    Reader,
    boolean,
    describe,
    format_path,
    integer,
    list_of,
    number,
    suggest,
    text,
)
from zrecipe.recipe.schema import (
    BLOCK_LAYER_TYPES,
    BLOCK_TYPES,
    DEFAULT_LORA_BLOCK_TYPE,
    DEFAULT_LORA_LAYER_TYPES,
    DEFAULT_LORA_RANK,
    LAYER_TYPE_GROUPS,
    LAYER_TYPES,
    LOKR_OPTIONS,
    LORA_KINDS,
    LoraSpec,
    LoraTarget,
)

GROUP_BLOCK_TYPES = {
    "main_layers": "layers",
    "layers": "layers",
    "noise_refiner": "noise_refiner",
    "context_refiner": "context_refiner",
}
_RANK = integer(min=1)
_ALPHA = number(gt=0.0)
_KIND = text(choices=LORA_KINDS)
_DROPOUT = number(ge=0.0, lt=1.0)


def _factor(value: Any) -> Any:
    out = integer(min=-1)(value)
    if out == 0:
        raise Bad("must be -1 (the factors nearest the square root) or a positive divisor size, got 0")
    return out


_LOKR_SPECS = {"factor": _factor, "decompose_both": boolean(), "full_matrix": boolean()}


def read_lora(ctx: Context, top: Reader, mode: Any) -> LoraSpec | None:
    """The LoRA spec of a recipe: None in full mode (where a LoRA section is an error)."""
    given = [k for k in ("lora_layers", "lora") if top.data.get(k) is not None]
    if mode == "full":
        for key in given:
            ctx.add(
                (key,), "`mode: full` trains the whole transformer; remove this section or set `mode: lora`"
            )
        return None
    if len(given) == 2:
        ctx.add(("lora",), "give either `lora_layers` (seed form) or `lora`, not both")
        return None
    if not given:
        return LoraSpec((LoraTarget(block_type=DEFAULT_LORA_BLOCK_TYPE),))
    found = _seed_form(ctx, top) if given[0] == "lora_layers" else _native_form(ctx, top)
    if found is None:
        return None
    _check_overlaps(ctx, found)
    # Targets never overlap, so their order carries no meaning: a canonical order keeps the recipe hash
    # independent of how the groups happen to be listed.
    return LoraSpec(tuple(sorted((t for _, t in found), key=_order)))


def _order(t: LoraTarget) -> tuple:
    return (
        BLOCK_TYPES.index(t.block_type),
        t.start,
        float("inf") if t.end is None else t.end,
        [LAYER_TYPES.index(x) for x in t.layer_types],
    )


def _seed_form(ctx: Context, top: Reader) -> list[tuple[KeyPath, LoraTarget]] | None:
    groups = top.sub("lora_layers")
    if groups is None:
        return None
    if not groups.data:
        ctx.add(
            ("lora_layers",), "no groups; add one such as `main_layers: {block_range: ..., layer_types: ...}`"
        )
        return None
    out, before = [], ctx.count
    for name in groups.data:
        g = groups.sub(name)
        if g is None:
            if groups.data[name] is None:
                ctx.add(("lora_layers", name), "expected a mapping of keys, got null")
            continue
        g.check_keys(("block_range", "layer_types", "lora_rank", "lora_alpha", "block_type"))
        block_type = g.get("block_type", text(choices=BLOCK_TYPES), GROUP_BLOCK_TYPES.get(name))
        if block_type is None:
            ctx.add(
                g.path,
                "cannot tell which blocks this group targets: name it layers (or main_layers), "
                f"noise_refiner or context_refiner, or set `block_type`{suggest(name, GROUP_BLOCK_TYPES)}",
            )
            continue
        start, end = _seed_range(g)
        target = _target(g, block_type, start, end, "layer_types", "lora_rank", "lora_alpha", {})
        if target is not None:
            out.append((g.path, target))
    return out if ctx.count == before else None


def _seed_range(g: Reader) -> tuple[Any, Any]:
    rng = g.sub("block_range")
    if rng is None:
        return LoraTarget.start, LoraTarget.end
    rng.check_keys(("start", "end"))
    start = rng.get("start", integer(min=0), LoraTarget.start)
    end = rng.get("end", integer(min=1, nullable=True), LoraTarget.end)
    _check_range(g.ctx, rng.path, start, end)
    return start, end


def _native_form(ctx: Context, top: Reader) -> list[tuple[KeyPath, LoraTarget]] | None:
    lora = top.sub("lora")
    if lora is None:
        return None
    lora.check_keys(
        ("rank", "alpha", "kind", "dropout", "targets"), hints=dict.fromkeys(LOKR_OPTIONS, "targets")
    )
    before = ctx.count
    defaults = {
        "rank": lora.get("rank", _RANK, DEFAULT_LORA_RANK),
        "alpha": lora.get("alpha", _ALPHA, None),
        "kind": lora.get("kind", _KIND, LoraTarget.kind),
        "dropout": lora.get("dropout", _DROPOUT, LoraTarget.dropout),
    }
    targets = lora.data.get("targets")
    if targets is None:
        targets = [{}]
    elif not isinstance(targets, (list, tuple)) or not targets:
        ctx.add(lora.path + ("targets",), f"expected a non-empty list of targets, got {describe(targets)}")
        return None
    out = []
    for i, item in enumerate(targets):
        t = Reader.open(ctx, lora.path + ("targets", i), item)
        if t is None:
            continue
        t.check_keys(("blocks", "range", "layer_types", "rank", "alpha", "kind", "dropout", *LOKR_OPTIONS))
        block_type = t.get("blocks", text(choices=BLOCK_TYPES), DEFAULT_LORA_BLOCK_TYPE)
        start, end = LoraTarget.start, LoraTarget.end
        rng = t.get("range", list_of(integer(min=0, nullable=True), length=2), None)
        if rng is not None and rng is not MISSING:
            start, end = (LoraTarget.start if rng[0] is None else rng[0]), rng[1]
            _check_range(ctx, t.path + ("range",), start, end)
        target = _target(t, block_type, start, end, "layer_types", "rank", "alpha", defaults)
        if target is not None:
            out.append((t.path, target))
    return out if ctx.count == before else None


def _check_range(ctx: Context, path: KeyPath, start: Any, end: Any) -> None:
    if isinstance(start, int) and isinstance(end, int) and end <= start:
        ctx.add(path, f"start must be less than end (end is exclusive), got start {start}, end {end}")


def _target(
    r: Reader,
    block_type: Any,
    start: Any,
    end: Any,
    types_key: str,
    rank_key: str,
    alpha_key: str,
    defaults: dict[str, Any],
) -> LoraTarget | None:
    """The target at `r`; `defaults` holds the `lora:` block's rank / alpha / kind / dropout (any may be
    MISSING after an error there, or absent in the seed form)."""
    default_rank = defaults.get("rank", MISSING)
    rank = r.get(rank_key, _RANK, DEFAULT_LORA_RANK if default_rank is MISSING else default_rank)
    alpha = r.get(alpha_key, _ALPHA, defaults.get("alpha"))
    kind = r.get("kind", _KIND, defaults.get("kind", LoraTarget.kind))
    dropout = r.get("dropout", _DROPOUT, defaults.get("dropout", LoraTarget.dropout))
    options = r.fill(_LOKR_SPECS)
    if options and kind not in (MISSING, "lokr"):
        for name in options:
            r.ctx.add(
                r.path + (name,), f"only LoKr reads `{name}`; this target's kind is {kind} (set `kind: lokr`)"
            )
        return None
    if block_type is MISSING:
        return None
    layer_types = _layer_types(r, types_key, block_type)
    if MISSING in (rank, alpha, start, end, layer_types, kind, dropout) or len(options) < sum(
        r.has(k) for k in LOKR_OPTIONS
    ):
        return None
    return LoraTarget(
        block_type=block_type,
        start=start,
        end=end,
        layer_types=layer_types,
        rank=rank,
        alpha=float(rank) if alpha is None else alpha,
        kind=kind,
        dropout=dropout,
        **options,
    )


def _layer_types(r: Reader, key: str, block_type: str) -> Any:
    if not r.has(key):
        return DEFAULT_LORA_LAYER_TYPES
    names = r.get(key, list_of(text(), nonempty=True))
    if names is MISSING:
        return MISSING
    allowed, chosen, ok = BLOCK_LAYER_TYPES[block_type], set(), True
    for i, name in enumerate(names):
        path = r.path + (key, i)
        if name not in LAYER_TYPES and name not in LAYER_TYPE_GROUPS:
            r.ctx.add(
                path,
                f"unknown layer type {name!r}{suggest(name, LAYER_TYPES + tuple(LAYER_TYPE_GROUPS))}; "
                f"known: {', '.join(LAYER_TYPES)}",
            )
            ok = False
            continue
        for full in LAYER_TYPE_GROUPS.get(name, (name,)):
            if full not in allowed:
                why = " (they have no timestep modulation)" if block_type == "context_refiner" else ""
                r.ctx.add(path, f"{block_type} blocks have no {full}{why}")
                ok = False
            elif full in chosen:
                r.ctx.add(path, f"{full} is listed twice")
                ok = False
            chosen.add(full)
    return tuple(t for t in LAYER_TYPES if t in chosen) if ok else MISSING


def _check_overlaps(ctx: Context, found: list[tuple[KeyPath, LoraTarget]]) -> None:
    for j, (path_b, b) in enumerate(found):
        for path_a, a in found[:j]:
            if a.block_type != b.block_type:
                continue
            a_end = float("inf") if a.end is None else a.end
            b_end = float("inf") if b.end is None else b.end
            shared = set(a.layer_types) & set(b.layer_types)
            if a.start < b_end and b.start < a_end and shared:
                ctx.add(
                    path_b,
                    f"overlaps {format_path(path_a)} on {b.block_type} "
                    f"{', '.join(sorted(shared))}: a layer can carry only one LoRA",
                )
