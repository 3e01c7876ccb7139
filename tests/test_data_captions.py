"""resolve_captions: every source, trigger insertion, and every problem naming its item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zrecipe.data.captions import (
    add_trigger,
    caption_from_filename,
    distinct_texts,
    resolve_captions,
    sidecar_path,
)
from zrecipe.data.scan import scan_images
from zrecipe.errors import DatasetError


def dataset(root: Path, *names: str) -> Path:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"img")
    return root


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def resolve(root: Path, kind: str, recursive: bool = False, **kw):
    return resolve_captions(scan_images(root, recursive=recursive), root, kind, **kw)


# --- sidecar -------------------------------------------------------------------------------------------


def test_sidecar_read_stripped_bom_removed(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg", "sub/b.png")
    write(tmp_path / "a.txt", "  a red fox \n\n")
    write(tmp_path / "sub/b.txt", "\ufeffsnow, mountains")  # BOM as Windows Notepad writes it
    r = resolve(tmp_path, "sidecar", recursive=True)
    assert r.problems == [] and r.ok
    assert r.captions == {"a.jpg": "a red fox", "sub/b.png": "snow, mountains"}


def test_sidecar_problems_name_item_and_fix(tmp_path: Path) -> None:
    dataset(tmp_path, "good.jpg", "missing.jpg", "empty.jpg", "latin.jpg")
    write(tmp_path / "good.txt", "fine")
    write(tmp_path / "empty.txt", "  \n")
    write(tmp_path / "latin.txt", "caf\xe9".encode("latin-1"))
    r = resolve(tmp_path, "sidecar")
    assert r.captions == {"good.jpg": "fine"}
    assert len(r.problems) == 3
    empty, latin, missing = r.problems  # files are scanned in sorted order
    assert empty.startswith("empty.txt:") and "empty" in empty
    assert latin.startswith("latin.txt:") and "not UTF-8" in latin and "0xe9" in latin and "UTF-8" in latin
    assert missing.startswith("missing.jpg:") and "missing.txt" in missing
    with pytest.raises(DatasetError) as info:
        r.raise_for_problems("faces")
    assert (
        info.value.items == r.problems
        and "'faces'" in str(info.value)
        and "3 caption problems" in str(info.value)
    )


def test_sidecar_custom_extension(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg")
    write(tmp_path / "a.txt", "wrong one")
    write(tmp_path / "a.caption", "right one")
    assert resolve(tmp_path, "sidecar", extension=".caption").captions == {"a.jpg": "right one"}
    assert sidecar_path("x/y.photo.jpeg", ".caption") == "x/y.photo.caption"


# --- manifest ------------------------------------------------------------------------------------------


def test_manifest_jsonl_both_key_spellings(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg", "sub/b.png")
    m = write(
        tmp_path / "captions.jsonl",
        '{"file": "a.jpg", "caption": " fox "}\n\n{"image": "./sub/b.png", "prompt": "owl", "extra": 1}\n',
    )
    r = resolve(tmp_path, "manifest", recursive=True, manifest=m)
    assert r.problems == []
    assert r.captions == {"a.jpg": "fox", "sub/b.png": "owl"}


def test_manifest_jsonl_line_errors(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    lines = [
        '{"file": "a.jpg", "caption": "ok"}',  # 1
        '{"file": "b.jpg", "caption": ',  # 2: broken JSON
        '{"file": "c.jpg"}',  # 3: no caption
        '{"file": "ghost.jpg", "caption": "x"}',  # 4: not in folder
        '["d.jpg", "list"]',  # 5: not an object
        '{"file": "a.jpg", "caption": "other"}',  # 6: conflicting duplicate
        '{"file": "a.jpg", "caption": "ok"}',  # 7: same duplicate, harmless
        '{"file": "d.jpg", "caption": "  "}',  # 8: empty caption
    ]
    m = write(tmp_path / "m.jsonl", "\r\n".join(lines) + '\n{"file": "a.jpg", "caption": "ok\u2028"}')
    r = resolve(tmp_path, "manifest", manifest=m)
    assert r.captions == {"a.jpg": "ok"}
    text = "\n".join(r.problems)
    for line in (2, 3, 4, 5, 6, 8):
        assert f"m.jsonl:{line}:" in text, line
    assert "m.jsonl:7:" not in text and "m.jsonl:1:" not in text
    assert "m.jsonl:9:" not in text and "m.jsonl:10:" not in text  # U+2028 inside a string is not a line end
    assert "not valid JSON" in text and "ghost.jpg" in text and "first at" in text
    # Images the manifest never captioned are problems too, named by image.
    assert [p for p in r.problems if p.startswith(("b.jpg:", "c.jpg:", "d.jpg:"))] == [
        f"{n}: no caption in manifest {m}; add an entry for it" for n in ("b.jpg", "c.jpg", "d.jpg")
    ]


def test_manifest_csv(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg", "b.jpg", "c.jpg", "d.jpg")
    m = write(
        tmp_path / "m.csv",
        'Image,Caption,score\na.jpg,"a fox, running",3\n\nb.jpg,,1\nc.jpg,owl,1,surplus\nzzz.jpg,ghost,1\n'
        'd.jpg,"two\nlines",1\nc.jpg,"unterminated\n',
    )
    r = resolve(tmp_path, "manifest", manifest=m)
    assert r.captions == {"a.jpg": "a fox, running", "d.jpg": "two\nlines"}
    text = "\n".join(r.problems)
    assert "m.csv:4:" in text and "b.jpg" in text  # empty caption; line 3 is blank and still counted
    assert "m.csv:5:" in text and "more fields" in text
    assert "m.csv:6:" in text and "zzz.jpg" in text
    assert "m.csv:9:" in text and "fix the quoting" in text  # row starts after d.jpg's two-line caption
    assert "m.csv:2:" not in text and "m.csv:7:" not in text


def test_manifest_csv_bad_header(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg")
    m = write(tmp_path / "m.csv", "path,text\na.jpg,fox\n")
    r = resolve(tmp_path, "manifest", manifest=m)
    assert r.captions == {}
    assert len(r.problems) == 1 and r.problems[0].startswith(f"{m}:1:") and "`file`" in r.problems[0]


def test_manifest_json_list_and_unusable_manifests(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg")
    good = write(tmp_path / "m.json", json.dumps([{"file": "a.jpg", "caption": "fox"}]))
    assert resolve(tmp_path, "manifest", manifest=good).captions == {"a.jpg": "fox"}
    for path, needle in [
        (tmp_path / "absent.jsonl", "does not exist"),
        (write(tmp_path / "m.yaml", "a.jpg: fox"), "unknown manifest type .yaml"),
        (
            write(tmp_path / "bin.jsonl", b'{"file": "a.jpg", "caption": "ok"}\n{"file": "\xff"}'),
            ":2: manifest is not UTF-8",
        ),
    ]:
        r = resolve(tmp_path, "manifest", manifest=path)
        # One message about the manifest itself, not one per image on top of it.
        assert len(r.problems) == 1 and str(path) in r.problems[0] and needle in r.problems[0]
    assert "needs a `file`" in resolve(tmp_path, "manifest").problems[0]


def test_manifest_absolute_entry_inside_folder(tmp_path: Path) -> None:
    dataset(tmp_path, "sub/a.jpg")
    m = write(tmp_path / "m.jsonl", json.dumps({"file": str(tmp_path / "sub" / "a.jpg"), "caption": "x"}))
    assert resolve(tmp_path, "manifest", recursive=True, manifest=m).captions == {"sub/a.jpg": "x"}


# --- filename, inline ----------------------------------------------------------------------------------


def test_filename_source(tmp_path: Path) -> None:
    dataset(tmp_path, "red_fox-01.jpg", "sub/Snowy__owl.png", "_-_.jpg")
    r = resolve(tmp_path, "filename", recursive=True)
    assert r.captions == {"red_fox-01.jpg": "red fox 01", "sub/Snowy__owl.png": "Snowy owl"}
    assert r.problems == ["_-_.jpg: the file name gives an empty caption; rename the file"]
    assert caption_from_filename("a/b.c_d.jpg") == "b.c d"


def test_inline_source(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    inline = [("a.jpg", "fox"), ("b.jpg", ""), ("nowhere.jpg", "x"), ("broken",)]
    r = resolve(tmp_path, "inline", inline=inline)
    assert r.captions == {"a.jpg": "fox"}
    text = "\n".join(r.problems)
    assert "inline caption 2:" in text and "empty caption" in text
    assert "inline caption 3:" in text and "nowhere.jpg" in text
    assert "inline caption 4:" in text and "pair" in text
    assert "c.jpg: no caption in the recipe's inline captions" in text


# --- template and trigger ------------------------------------------------------------------------------


def test_template_fields(tmp_path: Path) -> None:
    dataset(tmp_path, "red_fox.jpg", "owl.jpg")
    write(tmp_path / "red_fox.txt", "in the snow")
    r = resolve(tmp_path, "template", template="{trigger}, {caption}, photo of {filename}", trigger="sks")
    assert r.problems == []
    # owl has no sidecar: {caption} is empty and the separator it leaves is tidied away.
    assert r.captions == {"red_fox.jpg": "sks, in the snow, photo of red fox", "owl.jpg": "sks, photo of owl"}


def test_template_problems(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg")
    unknown = resolve(tmp_path, "template", template="{trigger} {subject} {caption!r}", trigger="t")
    assert len(unknown.problems) == 2 and unknown.captions == {}
    assert "{subject}" in unknown.problems[0] and "{trigger}, {caption}, {filename}" in unknown.problems[0]
    assert "{caption!r}" in unknown.problems[1]
    assert "no `trigger`" in resolve(tmp_path, "template", template="{trigger} x").problems[0]
    assert "literal braces" in resolve(tmp_path, "template", template="{caption").problems[0]
    assert "needs a `template`" in resolve(tmp_path, "template").problems[0]
    write(tmp_path / "a.txt", b"\xff\xfe")
    bad = resolve(tmp_path, "template", template="{caption}")
    assert len(bad.problems) == 1 and bad.problems[0].startswith("a.txt:") and "not UTF-8" in bad.problems[0]
    assert resolve(tmp_path, "template", template="{{literal}} {filename}").captions == {
        "a.jpg": "{literal} a"
    }


def test_trigger_prepended_once(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    write(tmp_path / "a.txt", "a cat on a sofa")
    write(tmp_path / "b.txt", "photo of ohwx, smiling")
    write(tmp_path / "c.txt", "ohwxy and category")
    r = resolve(tmp_path, "sidecar", trigger="ohwx")
    assert r.captions == {
        "a.jpg": "ohwx, a cat on a sofa",
        "b.jpg": "photo of ohwx, smiling",  # already there: unchanged
        "c.jpg": "ohwx, ohwxy and category",  # a longer word is not the trigger
    }
    assert add_trigger("Cat", "cat") == "cat, Cat"  # case matters to the tokenizer
    assert add_trigger("my cat.", "cat") == "my cat."


def test_distinct_texts() -> None:
    assert distinct_texts({"a.jpg": "fox", "b.jpg": "owl", "c.jpg": "fox"}) == ["fox", "owl"]
    assert distinct_texts({}) == []


def test_unknown_source_kind(tmp_path: Path) -> None:
    dataset(tmp_path, "a.jpg")
    with pytest.raises(ValueError, match="sidecar"):
        resolve(tmp_path, "exif")
