"""Decode, orient, convert, bucket and resize dataset images.

Sizes are multiples of 16 (VAE ÷8 × patch 2) so every latent patchifies exactly. The resize path decodes
each file once; JPEGs that shrink by 2× or more are decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself
(draft mode) and then resized exactly with LANCZOS, which is most of the speed of this module.
PIL is imported inside functions: the planner imports this module for `bucket_list` without paying for it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

from zrecipe.errors import DatasetError

if TYPE_CHECKING:
    from PIL import Image

_DRAFT_MIN_FACTOR = 2.0  # draft only when the image shrinks at least this much (libjpeg scales by 1/2^k)


# --- buckets -------------------------------------------------------------------------------------------


def bucket_list(resolution: int, max_aspect: float = 2.0, step: int = 16) -> list[tuple[int, int]]:
    """Every (w, h) with sides multiples of `step`, area ≤ resolution² and as close to it as the step allows,
    and aspect ratio within [1/max_aspect, max_aspect]. Sorted by (w, h); always contains the square.
    """
    return list(_buckets(int(resolution), float(max_aspect), int(step)))


@lru_cache(maxsize=64)
def _buckets(resolution: int, max_aspect: float, step: int) -> tuple[tuple[int, int], ...]:
    if step <= 0 or resolution < step:
        raise ValueError(f"resolution {resolution} must be at least the step {step}")
    if max_aspect < 1.0:
        raise ValueError(f"max_aspect {max_aspect} must be ≥ 1")
    area = resolution * resolution
    side = resolution // step * step
    found = {(side, side)}
    # Walk the wide side in steps; the narrow side is the largest multiple of `step` that keeps the area
    # within resolution² (memory per bucket never exceeds the square's). Mirrored for tall buckets.
    w = side + step
    while True:
        h = area // w // step * step
        if h < step or w > h * max_aspect + 1e-9:
            break
        found.add((w, h))
        found.add((h, w))
        w += step
    return tuple(sorted(found))


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space.

    Ties go to the larger area, then the smaller width, so the choice never depends on list order.
    """
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 12), -b[0] * b[1], b[0]))


def target_size(
    width: int, height: int, bucket: tuple[int, int], upscale: bool = False, step: int = 16
) -> tuple[int, int]:
    """Output size for a `width`×`height` source in `bucket`: the bucket itself when the source covers it
    (or `upscale`), otherwise the largest multiple-of-`step` size within the source at the bucket's aspect.

    Raises ValueError when the source is smaller than one `step` on a side and `upscale` is off.
    """
    bw, bh = bucket
    if upscale or (width >= bw and height >= bh):
        return bw, bh
    scale = min(width / bw, height / bh)
    tw, th = int(bw * scale) // step * step, int(bh * scale) // step * step
    if tw < step or th < step:
        raise ValueError(f"{width}×{height} is too small for a {step}-pixel multiple at aspect {bw}:{bh}")
    return tw, th


def output_size(
    width: int,
    height: int,
    resolution: int,
    max_aspect: float = 2.0,
    bucketing: bool = True,
    upscale: bool = False,
    step: int = 16,
) -> tuple[int, int]:
    """Final size of an (oriented) `width`×`height` image: bucket choice, then `target_size`.

    Without bucketing the only bucket is the square of `resolution` (rounded down to `step`).
    """
    if bucketing:
        bucket = choose_bucket(width, height, bucket_list(resolution, max_aspect, step))
    else:
        side = resolution // step * step
        bucket = (side, side)
    return target_size(width, height, bucket, upscale, step)


def centre_crop(width: int, height: int, tw: int, th: int) -> tuple[float, float]:
    """(width, height) of the centred part of a `width`×`height` image with the aspect of `tw`×`th`: what
    the resize keeps (and what a loss mask keeps with it)."""
    return (height * tw / th, float(height)) if width * th > height * tw else (float(width), width * th / tw)


# --- decode --------------------------------------------------------------------------------------------


def _bad_image(path: str | os.PathLike[str], exc: BaseException) -> DatasetError:
    return DatasetError(
        f"{path}: cannot decode image ({type(exc).__name__}: {exc}); re-export it or remove it from the dataset",
        items=[str(path)],
    )


def _open(path: str | os.PathLike[str], data: bytes | None = None) -> Image.Image:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(path if data is None else io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad_image(path, exc) from exc


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(0x0112, 1)  # EXIF Orientation
    except Exception:  # noqa: BLE001 - a damaged EXIF block must not make a decodable image unusable
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _oriented_size(img: Image.Image, orientation: int) -> tuple[int, int]:
    w, h = img.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5–8 swap the axes


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header without decoding pixels."""
    with _open(path) as img:
        return _oriented_size(img, _orientation(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; transparency is composited on white (what a viewer shows)."""
    from PIL import Image

    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode.startswith("I") or mode == "F":
        img = _deep_to_l(img)
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGB", rgba.size, (255, 255, 255))
        white.paste(rgba, mask=rgba.getchannel("A"))
        return white
    return img.convert("RGB")  # P, L, 1, CMYK, YCbCr, LAB, HSV


def _deep_to_l(img: Image.Image) -> Image.Image:
    """16/32-bit greyscale → 8-bit by scaling the value range (Pillow's own convert clips at 255)."""
    import numpy as np
    from PIL import Image

    arr = np.asarray(img)
    if img.mode == "F":
        scaled = np.clip(arr, 0.0, 1.0) * 255.0 if arr.max(initial=0.0) <= 1.0 else np.clip(arr, 0, 255)
    else:  # I;16*: 0..65535; I (32-bit, how Pillow opens some 16-bit PNGs): assume the 16-bit range
        scaled = np.clip(arr.astype(np.float64), 0, 65535) * (255.0 / 65535.0)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), "L")


def load_image(path: str | os.PathLike[str], expected_hash: str | None = None) -> Image.Image:
    """Decode an image fully: EXIF orientation applied, converted to 8-bit RGB, metadata dropped.

    A corrupt or truncated file raises `DatasetError` naming it; `expected_hash`: decode only bytes with
    this content hash (see `_decode`).
    """
    img, orientation, _ = _decode(path, lambda w, h, o: None, expected_hash)
    return _orient(img, orientation)


# EXIF orientation → the transpose that displays the stored pixels upright (as ImageOps.exif_transpose).
_TRANSPOSE = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}  # fmt: skip


def _orient(img: Image.Image, orientation: int) -> Image.Image:
    from PIL import Image

    if orientation in _TRANSPOSE:
        img = img.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
    img.info = {}  # no ICC/EXIF/text carried into outputs: they would make PNG bytes vary
    return img


def _decode(
    path: str | os.PathLike[str],
    plan: Callable[[int, int, int], tuple[int, int] | None],
    expected_hash: str | None = None,
) -> tuple[Image.Image, int, float]:
    """Open and decode `path` once, to RGB in the file's stored (un-rotated) frame.

    `plan(w, h, orientation)` gets the stored size from the header and may return the stored-frame size
    needed afterwards; a JPEG then decodes at a reduced scale. Returns (image, EXIF orientation, decoded pixels
    per stored pixel). With `expected_hash` (the content hash the build was planned with) the file is read
    once, its bytes checked against it (`InputChanged` if the file changed since), and those bytes decoded.
    """
    from PIL import Image

    data = None
    if expected_hash is not None:
        from zrecipe.engine.files import read_verified

        data = read_verified(path, expected_hash)
    img = _open(path, data)
    try:
        with img:
            orientation = _orientation(img)
            want = plan(img.width, img.height, orientation)
            scale = 1.0
            if (
                want is not None
                and img.format == "JPEG"
                and img.width >= _DRAFT_MIN_FACTOR * want[0]
                and img.height >= _DRAFT_MIN_FACTOR * want[1]
            ):
                full_width = img.width
                # libjpeg picks the largest 1/2^k with a result still ≥ `want`; the box Pillow returns is
                # the stored image in decoded-pixel units, which gives that scale exactly.
                applied = img.draft("RGB", want)
                if applied is not None:
                    scale = applied[1][2] / full_width
            img.load()
            out = _to_rgb(img)
            if out is img:
                out = img.copy()  # detach from the file before it closes
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise _bad_image(path, exc) from exc
    return out, orientation, scale


# --- resize --------------------------------------------------------------------------------------------


def resize_image(
    path: str | os.PathLike[str],
    resolution: int,
    max_aspect: float = 2.0,
    bucketing: bool = True,
    upscale: bool = False,
    *,
    step: int = 16,
    draft: bool = True,
    expected_hash: str | None = None,
) -> Image.Image:
    """Decode `path` and return it as an RGB image of its bucket's size (see `output_size`).

    The image is scaled (LANCZOS) to cover the target and centre-cropped, in one resampling pass.
    `draft=False` forces a full-resolution decode (the reference the draft path is tested against).
    `expected_hash`: decode only bytes with this content hash (see `_decode`).
    Raises `DatasetError` for undecodable files and images smaller than `step` pixels.
    """
    from PIL import Image

    geometry: list[tuple[float, ...]] = []

    def plan(sw: int, sh: int, orientation: int) -> tuple[int, int] | None:
        # Sizes are chosen on the upright image, but the work happens in the stored frame: a centred
        # crop is the same box under every flip, so only the axes swap (orientations 5–8).
        swapped = orientation in (5, 6, 7, 8)
        w, h = (sh, sw) if swapped else (sw, sh)
        try:
            tw, th = output_size(w, h, resolution, max_aspect, bucketing, upscale, step)
        except ValueError as exc:
            raise DatasetError(
                f"{path}: image is {w}×{h}, too small to resize ({exc}); remove it or set `upscale: true`",
                items=[str(path)],
            ) from exc
        if swapped:
            tw, th = th, tw
        cw, ch = centre_crop(sw, sh, tw, th)
        geometry.append((sw, sh, tw, th, cw, ch))
        scale = max(tw / cw, th / ch)
        return (
            (math.ceil(sw * scale), math.ceil(sh * scale))
            if draft and scale <= 1 / _DRAFT_MIN_FACTOR
            else None
        )

    img, orientation, f = _decode(path, plan, expected_hash)
    ((sw, sh, tw, th, cw, ch),) = geometry
    box = ((sw - cw) / 2 * f, (sh - ch) / 2 * f, (sw + cw) / 2 * f, (sh + ch) / 2 * f)
    if img.size != (tw, th) or box != (0.0, 0.0, float(tw), float(th)):
        img = img.resize((int(tw), int(th)), Image.Resampling.LANCZOS, box=box)
    return _orient(img, orientation)


def resize_to_file(
    path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    resolution: int,
    max_aspect: float = 2.0,
    bucketing: bool = True,
    upscale: bool = False,
    *,
    step: int = 16,
    draft: bool = True,
    expected_hash: str | None = None,
) -> tuple[int, int]:
    """`resize_image` and write the result as PNG to `out_path`; returns (width, height).

    The bytes depend only on the pixels (no timestamps, text, EXIF or ICC chunks), so the same input gives
    the same file. Written by `zrecipe.data.png`, which is several times faster than Pillow's encoder.
    With `expected_hash`, only the bytes the plan hashed are decoded (a build step passes the key's hash).
    """
    import numpy as np

    from zrecipe.data.png import write_png

    img = resize_image(
        path, resolution, max_aspect, bucketing, upscale, step=step, draft=draft, expected_hash=expected_hash
    )
    write_png(out_path, np.asarray(img))
    return img.size
