"""`zrecipe caption RECIPE`: run the build up to the captions and show every image's caption.

The images of each `captions: {generate: ...}` dataset that have no winning human caption are captioned
(only those not captioned before: the same store and keys as `zrecipe build`), then listed with where
each caption comes from. `--write-sidecars` writes the generated captions as `<stem>.txt` files to edit:
an unedited one changes nothing, an edited one wins over the model's caption from then on (and only that
image's text is encoded again). `--sheet FILE.png` draws the dataset contact sheet: thumbnails with their
captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from zrecipe.cli.build import CacheOpt, RecipeArg
from zrecipe.cli.download import OfflineOpt


def caption(
    recipe: Path = RecipeArg,
    cache: Path | None = CacheOpt,
    write_sidecars: bool = typer.Option(
        False,
        "--write-sidecars",
        help="Write generated captions as <stem>.txt sidecars (never over a human one).",
    ),
    sheet: Path | None = typer.Option(
        None, "--sheet", help="Draw a contact sheet of images and captions (PNG)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the captions as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    offline: bool = OfflineOpt,
) -> None:
    """Caption the images of `captions: {generate: ...}` datasets (only new ones) and show every caption."""
    from dataclasses import asdict

    from zrecipe.engine import Store
    from zrecipe.errors import UserError
    from zrecipe.pipeline import build_recipe
    from zrecipe.pipeline.caption_view import (
        SHEET_MAX_IMAGES,
        caption_rows,
        caption_sheet,
        generated_datasets,
    )
    from zrecipe.pipeline.vlm_captions import CAPTION_KIND
    from zrecipe.recipe import load_recipe

    loaded = load_recipe(recipe)
    datasets = generated_datasets(loaded)
    if not datasets:
        raise UserError(
            f"{recipe}: no dataset has `captions: {{generate: {{model: ...}}}}`, so there is nothing to caption. "
            "Add a generate caption source to a dataset (see README: Generated captions)."
        )
    outcome = build_recipe(loaded, cache, until=CAPTION_KIND, progress=not quiet)
    for line in outcome.skipped_at_plan or []:
        typer.secho(f"skipped (on_error: skip): {line}", err=True, fg=typer.colors.YELLOW)
    rows = caption_rows(loaded, outcome.plan, Store(outcome.cache_dir), outcome.report)
    if write_sidecars:
        _write_sidecars(loaded, rows)
    if sheet is not None:
        drawn = caption_sheet(loaded, rows, sheet)
        shown = (
            f" (the first {SHEET_MAX_IMAGES} of {len(rows)} images)" if len(rows) > SHEET_MAX_IMAGES else ""
        )
        typer.echo(f"contact sheet: {drawn}{shown}", err=True)
    if as_json:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2, ensure_ascii=False))
        return
    _table(rows)
    k = outcome.report.kinds.get(CAPTION_KIND)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.origin] = counts.get(r.origin, 0) + 1
    ran = f" ({k.ran} captioned now, {k.cached} before)" if k is not None else ""
    summary = ", ".join(f"{n} {origin}" for origin, n in sorted(counts.items()))
    typer.echo(f"{len(rows)} images: {summary}{ran}")
    truncated = sum(r.finish == "length" for r in rows)
    if truncated:
        typer.echo(
            f"{truncated} generated caption(s) stopped at max_tokens; raise captions.generate.max_tokens"
        )


def _table(rows) -> None:
    width = min(48, max((len(r.item) for r in rows), default=0))
    for r in rows:
        text = r.caption if r.caption is not None else f"({r.error})"
        typer.echo(f"{r.item:<{width}}  {r.origin:<9}  {text}")


def _write_sidecars(recipe, rows) -> None:
    from zrecipe.errors import UserError
    from zrecipe.pipeline.captions import write_sidecars

    wrote = 0
    for ds in recipe.datasets:
        generated = {r.image: r.generated for r in rows if r.dataset == ds.name and r.origin == "generated"}
        if ds.captions.kind != "generate":
            continue
        if ds.captions.human != "sidecar":
            typer.secho(
                f"dataset {ds.name!r}: human captions come from its {ds.captions.human}, not sidecar files; "
                "no sidecars written for it.",
                err=True,
                fg=typer.colors.YELLOW,
            )
            continue
        written, kept = write_sidecars(ds.path, generated, ds.captions.extension)
        wrote += len(written)
        typer.echo(f"dataset {ds.name!r}: wrote {len(written)} sidecar(s) in {ds.path}", err=True)
        for side in kept:
            typer.echo(f"  kept {side}: written or edited by hand", err=True)
    if not wrote and not any(
        ds.captions.human == "sidecar" for ds in recipe.datasets if ds.captions.kind == "generate"
    ):
        raise UserError("--write-sidecars: no dataset reads sidecar captions; nothing was written.")


def register(app: typer.Typer) -> None:
    app.command("caption")(caption)
