"""Buckets, decode (EXIF, modes, corrupt files), resize geometry, draft-mode accuracy, PNG determinism."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps, JpegImagePlugin

from zrecipe.data.images import (
    bucket_list,
    choose_bucket,
    image_size,
    load_image,
    output_size,
    resize_image,
    resize_to_file,
    target_size,
)
from zrecipe.data.png import encode_png, write_png
from zrecipe.errors import DatasetError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def halves(w: int, h: int, left=RED, right=BLUE) -> Image.Image:
    """Left half one colour, right half another: any rotation or mirror shows up as moved colours."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr, "RGB")


def smooth(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content: random low-frequency colour field (JPEG-friendly, no flat areas)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8), "RGB")
    return small.resize((w, h), Image.Resampling.BICUBIC)


def near(pixel, colour, tol: int = 40) -> bool:
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, colour, strict=True))


def exif_with_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


# --- buckets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
@pytest.mark.parametrize("max_aspect", [1.0, 1.5, 2.0, 3.0])
def test_bucket_list_properties(resolution: int, max_aspect: float) -> None:
    buckets = bucket_list(resolution, max_aspect)
    assert buckets == sorted(set(buckets)) == bucket_list(resolution, max_aspect)  # sorted, unique, stable
    assert (resolution, resolution) in buckets
    area = resolution * resolution
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 1 / max_aspect - 1e-9 <= w / h <= max_aspect + 1e-9
        assert 0.9 * area <= w * h <= area  # ≈ resolution², never more memory than the square
        assert (h, w) in buckets  # tall and wide alike
    if max_aspect == 1.0:
        assert buckets == [(resolution, resolution)]
    else:  # the extreme buckets reach close to the allowed aspect
        widest = max(w / h for w, h in buckets)
        assert widest > max_aspect * 0.9


def test_bucket_list_other_step_and_bad_arguments() -> None:
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in bucket_list(1000, 2.0, step=64))
    assert (960, 960) in bucket_list(1000, 2.0, step=64)
    with pytest.raises(ValueError):
        bucket_list(8)
    with pytest.raises(ValueError):
        bucket_list(512, 0.5)


def test_choose_bucket_closest_log_aspect_order_independent() -> None:
    buckets = bucket_list(512, 2.0)
    for w, h in [(3000, 2000), (2000, 3000), (100, 100), (1920, 1080), (500, 2000), (5000, 1000)]:
        best = choose_bucket(w, h, buckets)
        dist = abs(math.log(best[0] / best[1]) - math.log(w / h))
        assert all(dist <= abs(math.log(bw / bh) - math.log(w / h)) + 1e-12 for bw, bh in buckets)
        assert choose_bucket(w, h, list(reversed(buckets))) == best
    assert choose_bucket(100, 100, buckets) == (512, 512)
    # An exact tie in aspect goes to the larger area whatever the order.
    assert (
        choose_bucket(10, 10, [(256, 256), (512, 512)])
        == choose_bucket(10, 10, [(512, 512), (256, 256)])
        == (
            512,
            512,
        )
    )


def test_target_size_never_upscales_unless_asked() -> None:
    assert target_size(3000, 2000, (624, 416)) == (624, 416)
    small = target_size(300, 200, (624, 416))
    assert small[0] <= 300 and small[1] <= 200 and small[0] % 16 == 0 and small[1] % 16 == 0
    assert small == (288, 192)  # largest multiple-of-16 size at 3:2 within 300×200
    assert target_size(300, 200, (624, 416), upscale=True) == (624, 416)
    # Source smaller on one side only: still inside the source, at the bucket's aspect.
    tw, th = target_size(1000, 300, (512, 512))
    assert (tw, th) == (288, 288)
    with pytest.raises(ValueError):
        target_size(10, 10, (512, 512))


# --- decode --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_honoured(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "rot.jpg"
    halves(64, 32).save(path, quality=95, exif=exif_with_orientation(orientation))
    img = load_image(path)
    assert img.mode == "RGB" and img.info == {}
    if orientation == 3:  # 180°: red moves to the right
        assert img.size == (64, 32)
        assert near(img.getpixel((4, 16)), BLUE) and near(img.getpixel((60, 16)), RED)
        return
    assert img.size == (32, 64) == image_size(path)
    top, bottom = img.getpixel((16, 4)), img.getpixel((16, 60))
    # 6 = rotate 90° clockwise to display: the left (red) column becomes the top row; 8 the opposite.
    assert (near(top, RED), near(bottom, BLUE)) == ((True, True) if orientation == 6 else (False, False))
    assert (near(top, BLUE), near(bottom, RED)) == ((orientation == 8),) * 2


def test_exif_rotation_survives_draft_resize(tmp_path: Path) -> None:
    path = tmp_path / "big_rot.jpg"
    halves(1024, 512).save(path, quality=95, exif=exif_with_orientation(6))
    out = resize_image(path, 128, 2.0)
    assert out.width < out.height  # portrait after rotation: the bucket is tall
    assert near(out.getpixel((out.width // 2, 4)), RED) and near(
        out.getpixel((out.width // 2, out.height - 4)), BLUE
    )


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_and_resize_agrees(tmp_path: Path, orientation: int) -> None:
    path = tmp_path / "o.jpg"
    quadrants = np.zeros((480, 640, 3), np.uint8)
    quadrants[:240, :320], quadrants[:240, 320:] = RED, BLUE
    quadrants[240:, :320], quadrants[240:, 320:] = (0, 200, 0), (240, 240, 0)
    Image.fromarray(quadrants).save(path, quality=95, exif=exif_with_orientation(orientation))
    upright = load_image(path)
    with Image.open(path) as ref:
        assert np.array_equal(np.asarray(upright), np.asarray(ImageOps.exif_transpose(ref).convert("RGB")))
    # The resize works in the stored frame and rotates last; it must equal resizing the upright image.
    out = resize_image(path, 128)  # 5× down: the draft path
    w, h = upright.size
    tw, th = out.size
    assert (tw, th) == output_size(w, h, 128)
    cw, ch = (h * tw / th, h) if w * th > h * tw else (w, w * th / tw)
    box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
    expected = upright.resize((tw, th), Image.Resampling.LANCZOS, box=box)
    diff = np.abs(np.asarray(out, np.float64) - np.asarray(expected, np.float64))
    assert diff.mean() < 1.0, diff.mean()  # measured: 0.44


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((16, 48, 4), np.uint8)
    arr[:, :16] = (255, 0, 0, 255)  # opaque red
    arr[:, 16:32] = (0, 0, 0, 0)  # fully transparent (black underneath must not show)
    arr[:, 32:] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img.mode == "RGB"
    assert img.getpixel((8, 8)) == RED and img.getpixel((24, 8)) == WHITE
    half = img.getpixel((40, 8))
    assert half[2] == 255 and abs(half[0] - 127) <= 2 and abs(half[1] - 127) <= 2

    la = np.zeros((16, 16, 2), np.uint8)  # LA: grey 0 with alpha 0 → white
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((3, 3)) == WHITE


def test_palette_converted_with_and_without_transparency(tmp_path: Path) -> None:
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30, 250, 100, 0] + [0] * (256 * 3 - 9))
    pal.paste(2, (0, 0, 4, 8))
    pal.save(tmp_path / "p.png")
    img = load_image(tmp_path / "p.png")
    assert (
        img.mode == "RGB" and img.getpixel((1, 1)) == (250, 100, 0) and img.getpixel((6, 1)) == (10, 200, 30)
    )
    pal.save(tmp_path / "pt.png", transparency=2)  # palette index 2 transparent
    img = load_image(tmp_path / "pt.png")
    assert img.getpixel((1, 1)) == WHITE and img.getpixel((6, 1)) == (10, 200, 30)
    Image.open(tmp_path / "pt.png").convert("RGBA").save(tmp_path / "pt.webp", lossless=True)
    assert load_image(tmp_path / "pt.webp").getpixel((1, 1)) == WHITE


def test_cmyk_grey_and_16bit_converted(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    assert near(load_image(tmp_path / "cmyk.jpg").getpixel((4, 4)), RED, 10)
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    assert load_image(tmp_path / "grey.png").getpixel((4, 4)) == (77, 77, 77)
    deep = np.array([[0, 32768], [65535, 1000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = load_image(tmp_path / "deep.png")
    assert img.mode == "RGB"
    # Scaled, not clipped: Pillow's own convert would make 32768 and 1000 both 255.
    assert [img.getpixel(p)[0] for p in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [0, 128, 255, 4]


def test_corrupt_and_truncated_files_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"\x00definitely not an image" * 10)
    full = tmp_path / "full.jpg"
    smooth(256, 256).save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[:1500])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad in (junk, cut, empty):
        for call in (
            load_image,
            lambda p: resize_image(p, 64),
            lambda p: resize_to_file(p, tmp_path / "o.png", 64),
        ):
            with pytest.raises(DatasetError) as info:
                call(bad)
            assert str(bad) in str(info.value) and info.value.items == [str(bad)]
    assert not (tmp_path / "o.png").exists()


# --- resize --------------------------------------------------------------------------------------------


def test_resize_bucket_and_centre_crop(tmp_path: Path) -> None:
    # A wide image with a red centre band: the crop keeps the centre and drops the blue sides.
    arr = np.zeros((300, 900, 3), np.uint8)
    arr[:] = BLUE
    arr[:, 300:600] = RED
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = resize_image(tmp_path / "wide.png", 128, max_aspect=2.0)
    assert out.size == output_size(900, 300, 128, 2.0) and out.size[0] / out.size[1] <= 2.0
    assert out.size[0] % 16 == 0 and out.size[1] % 16 == 0
    assert near(out.getpixel((out.width // 2, out.height // 2)), RED, 5)
    assert near(out.getpixel((2, 2)), BLUE, 5)
    # Bucketing off: a square of `resolution`, cropped from the centre (only red survives).
    sq = resize_image(tmp_path / "wide.png", 128, bucketing=False)
    assert (
        sq.size == (128, 128) and near(sq.getpixel((2, 2)), RED, 5) and near(sq.getpixel((125, 64)), RED, 5)
    )


def test_no_upscale_unless_asked(tmp_path: Path) -> None:
    smooth(100, 60).save(tmp_path / "small.png")
    out = resize_image(tmp_path / "small.png", 512)
    assert out.width <= 100 and out.height <= 60 and out.width % 16 == 0 and out.height % 16 == 0
    assert out.size == (96, 48)  # the 512-resolution bucket closest to 5:3 is 2:1 (640×320 → 96×48 here)
    assert resize_image(tmp_path / "small.png", 512, upscale=True).size == choose_bucket(
        100, 60, bucket_list(512)
    )
    assert resize_image(tmp_path / "small.png", 512, bucketing=False).size == (48, 48)
    assert resize_image(tmp_path / "small.png", 512, bucketing=False, upscale=True).size == (512, 512)
    smooth(12, 40).save(tmp_path / "tiny.png")
    with pytest.raises(DatasetError, match="tiny.png.*12×40.*upscale"):
        resize_image(tmp_path / "tiny.png", 512)


def test_png_output_deterministic_and_metadata_free(tmp_path: Path) -> None:
    src = tmp_path / "src.jpg"
    smooth(640, 480, seed=3).save(src, quality=90, exif=exif_with_orientation(1), icc_profile=b"fake icc" * 8)
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert resize_to_file(src, a, 256) == resize_to_file(src, b, 256) == output_size(640, 480, 256)
    assert a.read_bytes() == b.read_bytes()
    chunks = png_chunks(a.read_bytes())
    assert set(chunks) <= {"IHDR", "IDAT", "IEND"}, chunks
    with Image.open(a) as img:
        assert img.mode == "RGB" and img.size == output_size(640, 480, 256)
        assert np.array_equal(np.asarray(img), np.asarray(resize_image(src, 256)))


def png_chunks(data: bytes) -> list[str]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, names = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        name = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(name + body)
        names.append(name.decode())
        pos += 12 + length
    return names


def test_draft_mode_used_and_close_to_full_decode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "photo.jpg"
    smooth(1600, 1200, seed=7).save(src, quality=92)
    calls: list[tuple] = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = original(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = resize_image(src, 256)
    assert len(calls) == 1 and calls[0][1][0] < 1600  # decoded at reduced scale
    slow = resize_image(src, 256, draft=False)
    assert len(calls) == 1  # no draft on the reference path
    assert fast.size == slow.size == output_size(1600, 1200, 256)
    diff = np.abs(np.asarray(fast, np.float64) - np.asarray(slow, np.float64))
    assert diff.mean() < 1.0 and diff.max() < 16, (diff.mean(), diff.max())  # measured: 0.37, 2
    # A mild downscale (< 2×) must not use draft: the DCT shortcut would cost detail for little speed.
    calls.clear()
    resize_image(src, 1024)
    assert calls == []


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (5, 17), (64, 48)])
def test_png_writer_round_trips_exactly(tmp_path: Path, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    arr = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)  # noise: every filter byte value occurs
    write_png(tmp_path / "x.png", arr)
    data = (tmp_path / "x.png").read_bytes()
    assert png_chunks(data) == ["IHDR", "IDAT", "IEND"] and data == encode_png(arr)
    with Image.open(tmp_path / "x.png") as img:
        assert img.mode == "RGB" and np.array_equal(np.asarray(img), arr)
    with pytest.raises(ValueError):
        encode_png(arr.astype(np.uint16))
