"""`zrecipe gc`: remove store entries no recipe's latest build references."""

from __future__ import annotations

import os
from pathlib import Path

import typer


def gc_cmd(
    cache: Path | None = typer.Option(
        None, "--cache", help="Store folder (default: $ZRECIPE_CACHE or ./cache)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report what would be removed."),
) -> None:
    """Garbage-collect the store: keep what the latest build of every recipe references."""
    from zrecipe.engine import Store, collect
    from zrecipe.errors import UserError

    root = cache or Path(os.environ.get("ZRECIPE_CACHE") or "cache")
    if not root.is_dir():
        raise UserError(f"{root}: no store here; pass --cache DIR (the folder a build used).")
    report = collect(Store(root), dry_run=dry_run)
    typer.echo(report.summary())


def register(app: typer.Typer) -> None:
    app.command("gc")(gc_cmd)
