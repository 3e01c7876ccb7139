"""Recipe text → plain Python data plus the line of every key, so errors can say `file:line`.

PyYAML's composer keeps a start mark on every node; we build the dicts and lists ourselves from the node
tree and record `path → line` on the way (a path is a tuple of keys and list indices). Two YAML 1.1 quirks
are fixed because JSON recipes go through the same parser: `1e-4` (exponent without a dot) is a float, and
a JSON file indented with tabs is parsed with the tabs read as spaces.

PyYAML is imported on the first parse of a text not seen before (`parse_cache`): importing it is ~10 ms,
a large part of a no-op `zrecipe plan`.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

from zrecipe.errors import RecipeError
from zrecipe.recipe import parse_cache

if TYPE_CHECKING:
    import yaml

Path_ = tuple  # a key path: ("datasets", 0, "captions")

_MAX_NODES = 200_000  # guards against alias bombs ("billion laughs")
_MAX_DEPTH = 64


@functools.cache
def _loader_class() -> type:
    """SafeLoader with YAML 1.2 / JSON floats (`1e-4`, `1.0E5`), which YAML 1.1 reads as strings."""
    import re

    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return _Loader


_COLLECTION_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}


class _Walker:
    """Builds plain data from a node tree, recording lines and structural problems."""

    def __init__(self, loader: yaml.SafeLoader, label: str):
        import yaml

        self.yaml = yaml
        self.loader = loader
        self.label = label
        self.lines: dict[Path_, int] = {}
        self.problems: list[tuple[Path_, str, int]] = []
        self.count = 0

    def problem(self, node: yaml.Node, path: Path_, message: str) -> None:
        self.problems.append((path, message, node.start_mark.line + 1))

    def build(self, node: yaml.Node, path: Path_, active: frozenset[int]) -> Any:
        yaml = self.yaml
        self.count += 1
        if self.count > _MAX_NODES:
            raise _TooBig()
        if id(node) in active or len(path) > _MAX_DEPTH:
            self.problem(node, path, "nested too deeply (or a recursive alias)")
            return None
        active = active | {id(node)}
        if isinstance(node, yaml.ScalarNode):
            return self.loader.construct_object(node, deep=True)
        if node.tag not in _COLLECTION_TAGS:
            self.problem(node, path, f"unsupported YAML tag {node.tag}")
            return None
        if isinstance(node, yaml.SequenceNode):
            out = []
            for i, item in enumerate(node.value):
                self.lines[path + (i,)] = item.start_mark.line + 1
                out.append(self.build(item, path + (i,), active))
            return out
        self.loader.flatten_mapping(node)  # `<<: *anchor` merge keys
        result: dict[str, Any] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            key = self.build(key_node, path, active) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                shown = (
                    repr(key_node.value)
                    if isinstance(key_node, yaml.ScalarNode)
                    else ("a list" if isinstance(key_node, yaml.SequenceNode) else "a mapping")
                )
                self.problem(key_node, path, f"keys must be text, got {shown}; quote it")
                continue
            if key in first_line:
                self.problem(key_node, path + (key,), f"duplicate key (first at line {first_line[key]})")
                continue
            first_line[key] = line
            self.lines[path + (key,)] = line
            result[key] = self.build(value_node, path + (key,), active)
        return result


class _TooBig(Exception):
    pass


def _compose(text: str) -> tuple[yaml.SafeLoader, yaml.Node | None]:
    loader = _loader_class()(text)
    return loader, loader.get_single_node()


def parse_recipe_text(text: str, label: str) -> tuple[Any, dict[Path_, int], list[tuple[Path_, str, int]]]:
    """Parse YAML/JSON text. Returns (data, lines, structural problems as (path, message, line)).

    Raises RecipeError for text that is not YAML at all (with the line of the syntax error). The result
    depends on the text alone (`label` only names the file in errors), so it is remembered by the text."""
    remembered = parse_cache.read(text)
    if remembered is not None:
        return remembered
    result = _parse(text, label)
    parse_cache.write(text, result)
    return result


def _parse(text: str, label: str) -> tuple[Any, dict[Path_, int], list[tuple[Path_, str, int]]]:
    import yaml

    try:
        loader, node = _compose(text)
    except yaml.YAMLError as exc:
        if "\t" in text and _is_json(text):
            # Valid JSON has tabs only between tokens, so reading them as spaces changes nothing.
            return _parse(text.replace("\t", " "), label)
        raise RecipeError(_syntax_message(exc, label), [_syntax_message(exc, label)]) from None
    except RecursionError:
        msg = f"{label}: the recipe is nested too deeply to read"
        raise RecipeError(msg, [msg]) from None
    try:
        if node is None:
            msg = f"{label}:1: the recipe is empty; start from `zrecipe init` or the README's example"
            raise RecipeError(msg, [msg])
        walker = _Walker(loader, label)
        walker.lines[()] = node.start_mark.line + 1
        try:
            data = walker.build(node, (), frozenset())
        except _TooBig:
            msg = f"{label}: the recipe expands to more than {_MAX_NODES} values (alias bomb?)"
            raise RecipeError(msg, [msg]) from None
        except yaml.YAMLError as exc:  # a scalar that cannot be constructed (bad !!binary, unknown !tag)
            raise RecipeError(_syntax_message(exc, label), [_syntax_message(exc, label)]) from None
        except RecursionError:
            msg = f"{label}: the recipe is nested too deeply to read"
            raise RecipeError(msg, [msg]) from None
        return data, walker.lines, walker.problems
    finally:
        loader.dispose()


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def _syntax_message(exc: yaml.YAMLError, label: str) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    context = getattr(exc, "context", None)
    what = f"{context}, {problem}" if context else problem
    if mark is not None:
        return f"{label}:{mark.line + 1}: invalid YAML: {what} (column {mark.column + 1})"
    return f"{label}: invalid YAML: {what}"
