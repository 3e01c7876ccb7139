"""Command-line values converted without pydantic where typer's own conversion is the identity.

typer 0.2x converts every non-flag value (even an absent one) through a pydantic `TypeAdapter` built on
first use, so any command with a path or a string parameter imports pydantic and builds a schema: about
0.1 s of a `zrecipe plan` that otherwise starts in well under that. For the plain cases — a `str` given as a
string, a decimal `int` / `float`, a `Path` whose spelling `Path()` keeps (typer's own path checks and
messages still run), and lists of those — the result is known without pydantic; this module gives those
parameters a converter that returns it and hands every other value (signs, exponents, leading zeros,
choices, parsers, bounds, enums) to typer's real converter, so results, errors and messages are typer's.

typer versions without that layer (0.12.x, plain click) are left as they are: `use_plain_values` does
nothing there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

NOT_PLAIN = object()  # "only typer's own converter can say"
_plain_class: Any = None  # the RuntimeParam subclass, made on first use (False: this typer has no such layer)
_MAX_INT_DIGITS = 18  # below 2**63 whatever the converter's integer width


def _is_int(text: str) -> bool:
    """`0` or `123`: ASCII digits, no sign, no leading zero, no `_` (forms whose int() is pydantic's)."""
    return (
        text.isascii() and text.isdigit() and len(text) <= _MAX_INT_DIGITS and (text == "0" or text[0] != "0")
    )


def _is_decimal(text: str) -> bool:
    """`123` or `1.5` (digits on both sides of the point): forms whose float() is pydantic's."""
    whole, dot, frac = text.partition(".")
    return _is_int(whole) and (not dot or (frac.isascii() and frac.isdigit()))


def plain_value(value: Any, annotation: Any, info: Any, param: Any = None, ctx: Any = None) -> Any:
    """`value` converted as typer would convert it for `annotation`, or `NOT_PLAIN` when only typer can
    say. `info` is the parameter's typer ParameterInfo."""
    if getattr(info, "parser", None) is not None:
        return NOT_PLAIN
    kind = type(value)
    if annotation is str:
        return value if kind is str else NOT_PLAIN
    if annotation is int or annotation is float:
        if info.min is not None or info.max is not None or info.clamp:
            return NOT_PLAIN
        if kind is annotation:
            return value
        if kind is str and (_is_int(value) if annotation is int else _is_decimal(value)):
            return annotation(value)
        return NOT_PLAIN
    if annotation is Path and getattr(info, "path_type", None) is None:
        # Only spellings Path() keeps: typer's messages quote what was typed, the checks see the Path.
        if kind is not str or not value or str(Path(value)) != value:
            return NOT_PLAIN
        from typer._param_types import coerce_cli_path

        return coerce_cli_path(Path(value), info, path_type=Path, param=param, ctx=ctx)
    if getattr(annotation, "__origin__", None) is list and isinstance(value, (list, tuple)):
        (item_type,) = annotation.__args__
        items = [plain_value(v, item_type, info, param, ctx) for v in value]
        return NOT_PLAIN if any(i is NOT_PLAIN for i in items) else items
    return NOT_PLAIN


def _make_plain_class() -> Any:
    """typer's RuntimeParam with plain values first, or False when this typer has no such layer."""
    try:
        from typer._coercion import RuntimeParam, build_runtime_param
        from typer._param_types import coerce_cli_path  # noqa: F401 (plain paths need it)
    except ImportError:
        return False

    # Not decorated again: the fields, __init__ and frozenness are RuntimeParam's (a @dataclass here would
    # compile its methods once more at every start-up).
    class PlainRuntimeParam(RuntimeParam):
        """One parameter's converter: plain values here, every other value by typer's own converter."""

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            out = plain_value(value, self.annotation, self.parameter_info, param, ctx)
            if out is NOT_PLAIN:
                return build_runtime_param(param.type_descriptor)._coerce_value(value, param=param, ctx=ctx)
            return out

    return PlainRuntimeParam


def _give_plain(param: Any) -> None:
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or getattr(param, "_runtime_param", False) is not None:
        return
    if getattr(descriptor, "file_annotation", None) is not None:
        return  # typer opens files itself, without pydantic
    param._runtime_param = _plain_class(
        parameter_info=descriptor.parameter_info, annotation=descriptor.annotation
    )


def _plain_help_option(cmd: Any) -> None:
    """The `--help` option is made on first use (typer caches it in `_help_option`): convert it too."""
    original = getattr(cmd, "get_help_option", None)
    if original is None or not hasattr(cmd, "_help_option"):
        return

    def get_help_option(ctx: Any) -> Any:
        option = original(ctx)
        if option is not None:
            _give_plain(option)
        return option

    cmd.get_help_option = get_help_option


def use_plain_values(command: Any) -> bool:
    """Give every typer parameter of click `command` (and of its subcommands) the plain converter.
    Returns whether this typer has the conversion layer it replaces (False: nothing was changed)."""
    global _plain_class
    if _plain_class is None:
        _plain_class = _make_plain_class()
    if not _plain_class:
        return False
    stack = [command]
    while stack:
        cmd = stack.pop()
        stack.extend(getattr(cmd, "commands", {}).values())
        for p in cmd.params:
            _give_plain(p)
        _plain_help_option(cmd)
    return True
