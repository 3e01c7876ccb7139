"""scan_images: which files count, in what order, with which stat fields, and the errors for bad folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from zrecipe.data.scan import ImageFile, scan_dataset, scan_images
from zrecipe.errors import DatasetError, UserError


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"not decoded by scan")


def rels(files: list[ImageFile]) -> list[str]:
    return [f.rel_path for f in files]


def test_extensions_case_insensitive_and_sorted(tmp_path: Path) -> None:
    touch(
        tmp_path, "c.PNG", "a.jpg", "B.JPEG", "d.WebP", "e.Jpg", "notes.txt", "anim.gif", "x.jpg.bak", "jpg"
    )
    assert rels(scan_images(tmp_path)) == ["B.JPEG", "a.jpg", "c.PNG", "d.WebP", "e.Jpg"]


def test_order_does_not_depend_on_creation_order(tmp_path: Path) -> None:
    names = [f"img_{i:03d}.png" for i in range(50)]
    touch(tmp_path / "one", *names)
    touch(tmp_path / "two", *reversed(names))
    assert rels(scan_images(tmp_path / "one")) == rels(scan_images(tmp_path / "two")) == sorted(names)


def test_recursive_only_when_asked(tmp_path: Path) -> None:
    touch(tmp_path, "top.jpg", "sub/inner.png", "sub/deeper/z.webp", "a_sub/first.jpg")
    assert rels(scan_images(tmp_path)) == ["top.jpg"]
    assert rels(scan_images(tmp_path, recursive=True)) == [
        "a_sub/first.jpg",
        "sub/deeper/z.webp",
        "sub/inner.png",
        "top.jpg",
    ]


def test_hidden_files_and_folders_skipped(tmp_path: Path) -> None:
    touch(tmp_path, "ok.jpg", ".hidden.jpg", ".cache/x.jpg", "sub/.y.png", "sub/fine.png")
    assert rels(scan_images(tmp_path, recursive=True)) == ["ok.jpg", "sub/fine.png"]


def test_stat_fields_and_paths(tmp_path: Path) -> None:
    touch(tmp_path, "sub/a.jpg")
    (tmp_path / "sub/a.jpg").write_bytes(b"12345")
    (f,) = scan_images(tmp_path, recursive=True)
    st = os.stat(tmp_path / "sub/a.jpg")
    assert f.rel_path == "sub/a.jpg"
    assert Path(f.path) == (tmp_path / "sub/a.jpg").absolute()
    assert (f.size, f.mtime_ns, f.ctime_ns, f.inode) == (5, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    with pytest.raises(AttributeError):
        f.size = 3  # type: ignore[misc]  # frozen: these are keys


def test_folder_named_like_an_image_is_walked_not_listed(tmp_path: Path) -> None:
    touch(tmp_path, "album.jpg/inside.png", "real.jpg")
    assert rels(scan_images(tmp_path)) == ["real.jpg"]
    assert rels(scan_images(tmp_path, recursive=True)) == ["album.jpg/inside.png", "real.jpg"]


def test_missing_folder_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="nope") as info:
        scan_images(missing)
    assert isinstance(info.value, UserError)
    assert "does not exist" in str(info.value)


def test_path_that_is_a_file(tmp_path: Path) -> None:
    touch(tmp_path, "a.jpg")
    with pytest.raises(DatasetError, match="not a folder"):
        scan_images(tmp_path / "a.jpg")


def test_empty_folder_message(tmp_path: Path) -> None:
    touch(tmp_path, "readme.txt", "sub/deep.jpg")
    with pytest.raises(DatasetError) as info:
        scan_images(tmp_path)
    msg = str(info.value)
    assert f"no images found in {tmp_path} (looked for .jpg .jpeg .png .webp; recursive: false)" in msg
    assert "recursive: true" in msg  # the hint, since an image sits in a sub-folder
    assert rels(scan_images(tmp_path, recursive=True)) == ["sub/deep.jpg"]


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_dangling_symlink_is_named(tmp_path: Path) -> None:
    touch(tmp_path, "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    with pytest.raises(DatasetError, match="link.jpg") as info:
        scan_images(tmp_path)
    assert info.value.items and "link.jpg" in info.value.items[0]


@pytest.mark.skipif(not hasattr(os, "symlink") or sys.platform == "win32", reason="needs symlinks")
def test_symlink_loop_terminates_and_linked_files_count(tmp_path: Path) -> None:
    touch(tmp_path, "sub/a.jpg", "elsewhere/b.png")
    os.symlink(tmp_path, tmp_path / "sub" / "loop")  # points back at the root
    os.symlink(tmp_path / "elsewhere" / "b.png", tmp_path / "linked.png")
    found = rels(scan_images(tmp_path, recursive=True))
    assert found == ["elsewhere/b.png", "linked.png", "sub/a.jpg"]


def test_architecture_alias() -> None:
    assert scan_dataset is scan_images


def test_scan_and_captions_do_not_import_pil() -> None:
    code = (
        "import sys, zrecipe.data, zrecipe.data.scan, zrecipe.data.captions, zrecipe.data.images;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('PIL', 'numpy', 'mlx')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
