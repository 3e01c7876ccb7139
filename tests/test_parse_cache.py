"""The remembered recipe parse (zrecipe.recipe.parse_cache): the same result as parsing, never a wrong one.

An entry is used only when it names the digest of the text and parser and its payload hashes to the digest
stored with it; a torn, edited or foreign entry is a miss and the text is parsed again (and re-remembered).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from zrecipe.errors import RecipeError
from zrecipe.recipe import load_recipe, parse_cache
from zrecipe.recipe.yamlsource import _parse, parse_recipe_text

TEXT = """model: tiny
mode: lora
datasets:
  - name: d
    path: data
    resolution: 64
    repeats: 2
training_loop: {max_steps: 3}
optimizer: {learning_rate: 1e-4}
odd: [1, 2.5, true, null, "x", !!binary aGk=]
dup: 1
dup: 2
"""


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _entries():
    folder = parse_cache.folder()
    return sorted(folder.iterdir()) if folder.exists() else []


def test_remembered_parse_equals_the_parse():
    first = parse_recipe_text(TEXT, "r.yaml")
    assert len(_entries()) == 1
    again = parse_recipe_text(TEXT, "r.yaml")
    assert again == first == _parse(TEXT, "r.yaml")
    data, lines, problems = again
    assert data["optimizer"]["learning_rate"] == 1e-4 and data["odd"][-1] == b"hi"
    assert type(data["odd"][2]) is bool and lines[("datasets", 0, "repeats")] == 7
    assert [p[1] for p in problems] == ["duplicate key (first at line 11)"]


@pytest.mark.parametrize("where", ["magic", "key", "payload digest", "payload", "truncated", "empty"])
def test_a_damaged_entry_is_a_miss_and_is_replaced(where):
    expected = parse_recipe_text(TEXT, "r.yaml")
    (entry,) = _entries()
    blob = bytearray(entry.read_bytes())
    head = len(parse_cache.MAGIC)
    at = {"magic": 0, "key": head + 3, "payload digest": head + 20, "payload": len(blob) - 2}.get(where)
    if at is not None:
        blob[at] ^= 0x55
    elif where == "truncated":
        blob = blob[: len(blob) // 2]
    else:
        blob = bytearray()
    entry.write_bytes(bytes(blob))
    assert parse_cache.read(TEXT) is None
    assert parse_recipe_text(TEXT, "r.yaml") == expected
    assert parse_cache.read(TEXT) == expected  # parsed again and remembered again


def test_a_valid_entry_under_another_texts_name_is_refused():
    """An entry copied under the name of another text (same format, intact payload) is not that text's."""
    parse_recipe_text(TEXT, "r.yaml")
    other = TEXT.replace("repeats: 2", "repeats: 3")
    (entry,) = _entries()
    (parse_cache.folder() / parse_cache._key(other).hex()).write_bytes(entry.read_bytes())
    assert parse_cache.read(other) is None
    assert parse_recipe_text(other, "r.yaml")[0]["datasets"][0]["repeats"] == 3


def test_values_marshal_cannot_hold_are_parsed_every_time():
    text = "model: tiny\nwhen: 2026-12-02\n"
    data = parse_recipe_text(text, "r.yaml")[0]
    assert str(data["when"]) == "2026-12-02" and _entries() == []


def test_errors_are_not_remembered():
    with pytest.raises(RecipeError, match="invalid YAML"):
        parse_recipe_text("model: [unclosed\n", "r.yaml")
    assert _entries() == []


def test_an_unwritable_cache_folder_only_turns_the_cache_off(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    assert parse_recipe_text(TEXT, "r.yaml") == _parse(TEXT, "r.yaml")


def test_old_entries_are_pruned(monkeypatch):
    monkeypatch.setattr(parse_cache, "KEEP", 3)
    for i in range(6):
        parse_recipe_text(f"model: tiny\nseed: {i}\n", "r.yaml")
    assert len(_entries()) == 3


def test_an_unchanged_recipe_is_planned_without_pyyaml(tmp_path):
    """The second plan of the same recipe does not import PyYAML; the recipe it builds is the same."""
    (tmp_path / "data").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(TEXT.split("odd:")[0])
    code = (
        "import sys; from zrecipe.recipe import load_recipe; r = load_recipe(sys.argv[1]); "
        "print('yaml' in sys.modules, r == load_recipe(sys.argv[1]))"
    )
    env = {**os.environ, "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    runs = [
        subprocess.run(
            [sys.executable, "-c", code, str(recipe)], capture_output=True, text=True, env=env, timeout=120
        ).stdout.split()  # fmt: skip
        for _ in range(2)
    ]
    assert runs == [["True", "True"], ["False", "True"]]
    assert load_recipe(recipe) == load_recipe(recipe)
