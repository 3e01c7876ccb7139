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
    verify: bool = typer.Option(
        False, "--verify", help="Also hash every kept entry against its manifest; remove damaged ones."
    ),
) -> None:
    """Garbage-collect the store: keep what the latest build of every recipe references."""
    from zrecipe.engine import Store, collect

    store = Store(store_root(cache))
    report = collect(store, dry_run=dry_run)
    typer.echo(report.summary())
    if verify:
        check_store(store, repair=not dry_run)


def store_root(cache: Path | None) -> Path:
    """The store folder `--cache` names (default: $ZRECIPE_CACHE or ./cache); UserError if none is there."""
    from zrecipe.errors import UserError

    root = cache or Path(os.environ.get("ZRECIPE_CACHE") or "cache")
    if not root.is_dir():
        raise UserError(f"{root}: no store here; pass --cache DIR (the folder a build used).")
    return root


def check_store(store, repair: bool = True) -> None:
    """Verify every entry of `store` (see zrecipe.engine.verify); exit 1 when something was damaged."""
    from zrecipe.engine import verify_store

    report = verify_store(store, repair=repair)
    typer.echo(report.summary())
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("gc")(gc_cmd)
