"""`zrecipe download MODEL`: fetch a model into the local Hugging Face cache before a build needs it.

Also the `--offline` switch that every command which may resolve a model accepts (build, plan, train,
generate, download): it sets `HF_HUB_OFFLINE=1` for the process and the processes it starts, so a model
that is not complete in the local cache is an error (exit 2) instead of a download.
"""

from __future__ import annotations

import typer


def _offline(value: bool) -> bool:
    if value:
        from zrecipe.models.z_image.hub import set_offline

        set_offline()
    return value


OfflineOpt = typer.Option(
    False,
    "--offline",
    callback=_offline,
    help="Never use the network: only models already in the local Hugging Face cache (HF_HUB_OFFLINE=1).",
)


def download(
    model: str = typer.Argument(
        ...,
        help="Preset (z-image, z-image-turbo), Hugging Face repo id (org/name), or a spec with component "
        "files (BASE,transformer=FILE,...: only the base's configs and remaining components are fetched).",
        show_default=False,
    ),
    offline: bool = OfflineOpt,
) -> None:
    """Download a model (only the files the pipeline needs; resumable), or check it is complete offline."""
    from zrecipe.models.z_image.resolve import resolve_model

    typer.echo(str(resolve_model(model)))


def register(app: typer.Typer) -> None:
    app.command("download")(download)
