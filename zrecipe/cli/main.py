"""The `zrecipe` command line: a thin typer layer over library calls.

Each command lives in its own module under `zrecipe.cli` exposing `register(app)`; the module list below
is the only place commands are wired in. Command modules import heavy libraries (MLX, PIL) inside the
command function, never at module level, so `zrecipe --help` and `zrecipe plan` stay fast and MLX-free.
"""

from __future__ import annotations

import copy
import functools
import gc
import importlib
import sys
import warnings

import typer

from zrecipe import __version__
from zrecipe.cli.generate import expand_generate_args
from zrecipe.errors import ZRecipeError, ZRecipeWarning, is_environment_error, os_problem

# Modules under zrecipe.cli that define `register(app)`. Only working commands are listed here.
COMMAND_MODULES: list[str] = [
    "build", "train", "generate", "export", "merge", "memory", "store", "init", "doctor", "download",
    "caption",
]  # fmt: skip

app = typer.Typer(
    name="zrecipe",
    help="Declarative, incremental dataset-and-recipe builds for fine-tuning Z-Image with MLX.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help and usage errors: typer's rich panels import rich + markdown-it, which cost ~80 ms
    # of a ~150 ms `zrecipe --help` (start-up target: 0.12 s, issue 16). The text is the same.
    rich_markup_mode=None,
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


def _usage_error_classes() -> tuple[type, ...]:
    """The ClickException class(es) typer raises for usage errors, whichever click it uses: typer ≤ 0.2x
    depends on click, newer typer vendors it as `typer._click` (an `except click.ClickException` misses
    those). typer.BadParameter derives from the right one on every version."""
    return tuple(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _show_usage_error(exc: Exception) -> None:
    """Print a usage error exactly as typer itself does with `rich_markup_mode=None`: click's own form."""
    exc.show()  # type: ignore[attr-defined]


class Interrupted(ZRecipeError):
    """Ctrl-C (or a step stopping on purpose) reached the top: one line, exit 130."""

    exit_code = 130


def _stop_here(callback):
    """Wrap a command so that KeyboardInterrupt leaves it as Interrupted: typer ≥ 0.2x would swallow it
    into a silent exit 130, older typer into "Aborted!" with exit 1."""

    @functools.wraps(callback)
    def command(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Interrupted(str(exc) or "interrupted") from None

    return command


for _info in app.registered_commands:
    _info.callback = _stop_here(_info.callback)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """zrecipe's own warnings as one `warning: ...` line; others as Python prints them."""
    if issubclass(category, ZRecipeWarning):
        typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _command(application: typer.Typer, args: list[str]):
    """The click command that `application(args=args)` would run, built for `args`: when the first
    argument names a command, typer builds only that one (building all of them is ~5% of a no-op
    `zrecipe plan`; help, usage errors and unknown commands still see the whole app); values are converted
    without pydantic where that changes nothing (zrecipe.cli.plain_values)."""
    from zrecipe.cli.plain_values import use_plain_values

    chosen = [info for info in application.registered_commands if args and info.name == args[0]]
    if len(chosen) == 1 and not application.registered_groups and application.registered_callback:
        # With its callback the app stays a group, so usage lines and messages are the same.
        application = copy.copy(application)
        application.registered_commands = chosen
    command = typer.main.get_command(application)
    use_plain_values(command)
    return command


def run_app(application: typer.Typer, argv: list[str] | None = None) -> int:
    """Run a typer app; returns the exit code (DESIGN §8).

    zrecipe errors print a one-paragraph message and exit with their code (2: bad input or a broken
    environment); usage errors get typer's own message and exit 2; an OS fault on a user's path becomes
    the message naming the path and the fix (exit 2); Ctrl-C prints one line and exits 130. Anything
    else is a bug and keeps its traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    try:
        # With standalone_mode=False click *returns* the code of a typer.Exit instead of raising it.
        args = expand_generate_args(args)
        result = _command(application, args)(args=args, standalone_mode=False)
    except ZRecipeError as exc:
        typer.secho(f"error: {exc}" if exc.exit_code != 130 else str(exc), err=True, fg=typer.colors.RED)
        return exc.exit_code
    except (KeyboardInterrupt, typer.Abort):
        typer.echo("interrupted", err=True)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except _usage_error_classes() as exc:
        _show_usage_error(exc)
        return exc.exit_code
    except OSError as exc:
        if not is_environment_error(exc):
            raise
        typer.secho(f"error: {os_problem(exc)}", err=True, fg=typer.colors.RED)
        return 2
    except MemoryError:
        typer.secho(
            "error: out of memory; close other programs, lower training_loop.batch_size or set "
            "`low_ram: true`, and run again (finished steps are kept).",
            err=True,
            fg=typer.colors.RED,
        )
        return 2
    finally:
        warnings.showwarning = _python_showwarning
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> None:
    # What start-up made (modules, typer's command tree) lives as long as the process: keep it out of
    # every cyclic-GC pass (~1.5% of a no-op `zrecipe plan`).
    gc.freeze()
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
