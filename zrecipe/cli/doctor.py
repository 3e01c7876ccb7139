"""`zrecipe doctor`: what this machine gives zrecipe (backend, BLAS, dtype, memory)."""

from __future__ import annotations

import platform
from pathlib import Path

import typer


def doctor_cmd(
    store: bool = typer.Option(
        False,
        "--store",
        help="Check every store entry against its hashes instead (damaged ones are removed).",
    ),
    cache: Path | None = typer.Option(
        None, "--cache", help="Store folder (default: $ZRECIPE_CACHE or ./cache)."
    ),
) -> None:
    """Print the MLX device, the BLAS MLX uses, the default compute dtype and memory (or check a store)."""
    if store:
        from zrecipe.cli.store import check_store, store_root
        from zrecipe.engine import Store

        check_store(Store(store_root(cache)))
        return
    from zrecipe import __version__
    from zrecipe.backend import blas_status, coretype_note, default_compute_dtype, heap_status

    status = blas_status()  # before importing mlx
    import mlx.core as mx

    from zrecipe import native

    typer.echo(
        f"zrecipe {__version__} on {platform.system()} {platform.machine()}, Python {platform.python_version()}"
    )
    typer.echo(f"mlx {mx.__version__}, default device: {mx.default_device()}")
    typer.echo(f"BLAS: {status}")
    note = coretype_note()
    if note:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    typer.echo(f"heap: {heap_status()}")
    typer.echo(f"default compute dtype: {default_compute_dtype()}")
    typer.echo(f"native kernels: {native.status()}")
    try:
        import os

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        typer.echo(f"memory: {pages * size / 2**30:.1f} GiB")
    except (ValueError, OSError, AttributeError):
        pass


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor_cmd)
