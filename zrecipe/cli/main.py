"""The `zrecipe` command line: a thin typer layer over library calls.

Each command lives in its own module under `zrecipe.cli` exposing `register(app)`; the module list below
is the only place commands are wired in. Command modules import heavy libraries (MLX, PIL) inside the
command function, never at module level, so `zrecipe --help` and `zrecipe plan` stay fast and MLX-free.
"""

from __future__ import annotations

import importlib
import sys

import typer

from zrecipe import __version__
from zrecipe.errors import ZRecipeError

# Modules under zrecipe.cli that define `register(app)`. Only working commands are listed here.
COMMAND_MODULES: list[str] = [
    "build", "train", "generate", "export", "memory", "store", "init", "doctor", "download", "caption"
]  # fmt: skip

app = typer.Typer(
    name="zrecipe",
    help="Declarative, incremental dataset-and-recipe builds for fine-tuning Z-Image with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"zrecipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """zrecipe: build Z-Image fine-tunes from declarative recipes."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"zrecipe.cli.{_name}").register(app)


def run_app(application: typer.Typer, argv: list[str] | None = None) -> int:
    """Run a typer app, turning zrecipe errors into a one-paragraph message and their exit code."""
    try:
        # With standalone_mode=False click *returns* the code of a typer.Exit instead of raising it.
        result = application(args=argv, standalone_mode=False)
    except ZRecipeError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # click usage errors carry their own exit code (2)
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> None:
    sys.exit(run_app(app, argv))


def _alias(command: str) -> None:
    """Run one zrecipe command under the seed's command name (same flags)."""
    sys.exit(run_app(app, [command, *sys.argv[1:]]))


def train_alias() -> None:
    _alias("train")


def generate_alias() -> None:
    _alias("generate")


if __name__ == "__main__":
    main()
