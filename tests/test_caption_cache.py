"""The stat cache's small-file content cache: an unchanged caption file is not reopened by the next plan,
and captions resolved through it are exactly those read from disk (text and every problem)."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

import pytest

from zrecipe.data.captions import read_files, resolve_captions
from zrecipe.data.scan import scan_images
from zrecipe.engine import StatCache

OLD_NS = 1_600_000_000 * 10**9  # far outside the racy window


def write_old(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    os.utime(path, ns=(OLD_NS, OLD_NS))
    return path


def no_open(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"file opened: {args[0]}")

    monkeypatch.setattr(builtins, "open", refuse)


def test_unchanged_files_come_from_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_old(tmp_path / "a.txt", b"a red fox")
    b = write_old(tmp_path / "b.txt", b"snow")
    paths = [str(a), str(b)]
    with StatCache(tmp_path / "stat.sqlite") as sc:
        assert sc.read_small_files(paths) == {str(a): b"a red fox", str(b): b"snow"}
    with StatCache(tmp_path / "stat.sqlite") as sc, monkeypatch.context() as m:
        no_open(m)
        assert sc.read_small_files(paths) == {str(a): b"a red fox", str(b): b"snow"}


def test_changed_missing_and_racy_files_are_read_again(tmp_path: Path) -> None:
    a = write_old(tmp_path / "a.txt", b"first")
    with StatCache(tmp_path / "stat.sqlite") as sc:
        sc.read_small_files([str(a)])
        write_old(a, b"other")  # same size, same mtime: the inode's ctime still changes
        assert sc.read_small_files([str(a)]) == {str(a): b"other"}
        a.unlink()
        missing = sc.read_small_files([str(a)])[str(a)]
        assert isinstance(missing, FileNotFoundError)
    fresh = tmp_path / "fresh.txt"
    fresh.write_bytes(b"one")
    with StatCache(tmp_path / "racy.sqlite", granularity_ns=10**18) as sc:  # everything is racy
        sc.read_small_files([str(fresh)])
        fresh.write_bytes(b"two")
        os.utime(fresh, ns=(fresh.stat().st_mtime_ns,) * 2)
        assert sc.read_small_files([str(fresh)]) == {str(fresh): b"two"}


def test_prune_forgets_deleted_caption_rows(tmp_path: Path) -> None:
    a = write_old(tmp_path / "a.txt", b"x")
    with StatCache(tmp_path / "stat.sqlite") as sc:
        sc.read_small_files([str(a)])
        a.unlink()
        assert sc.prune() == 1


def test_captions_through_the_cache_equal_captions_from_disk(tmp_path: Path, monkeypatch) -> None:
    for name in ("good.jpg", "bom.png", "missing.jpg", "empty.jpg", "latin.jpg"):
        write_old(tmp_path / name, b"img")
    write_old(tmp_path / "good.txt", b"  a red fox \n")
    write_old(tmp_path / "bom.txt", "\ufeffsnow, mountains".encode())
    write_old(tmp_path / "empty.txt", b"  \n")
    write_old(tmp_path / "latin.txt", "caf\xe9".encode("latin-1"))
    files = scan_images(tmp_path)
    expected = resolve_captions(files, tmp_path, "sidecar", trigger="zz", read=read_files)
    assert expected.captions == {"good.jpg": "zz, a red fox", "bom.png": "zz, snow, mountains"}
    assert len(expected.problems) == 3
    with StatCache(tmp_path / "cache" / "stat.sqlite") as sc:
        first = resolve_captions(files, tmp_path, "sidecar", trigger="zz", read=sc.read_small_files)
    with StatCache(tmp_path / "cache" / "stat.sqlite") as sc, monkeypatch.context() as m:
        no_open(m)
        second = resolve_captions(files, tmp_path, "sidecar", trigger="zz", read=sc.read_small_files)
        templated = resolve_captions(
            files, tmp_path, "template", template="{caption} ({filename})", read=sc.read_small_files
        )
    for r in (first, second):
        assert r.captions == expected.captions and r.problems == expected.problems
    assert templated.captions["good.jpg"] == "a red fox (good)"
    assert templated.captions["missing.jpg"] == "(missing)"
