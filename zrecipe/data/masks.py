"""Loss masks: a training image's mask, cropped and scaled exactly as the image is, on the latent grid.

A mask comes from the image's alpha channel or from a greyscale image of its own (white = learn, black =
ignore). It is read in the image's upright (EXIF-oriented) frame, cut to the same centred crop the resize
keeps (`images.centre_crop` of the same bucket), and area-averaged straight onto the latent grid
(height/8 × width/8 for Z-Image's VAE) with Pillow's BOX filter in float32: each latent cell holds the mean
mask value of the source pixels whose centres fall inside it (exactly the mean of a block when the scale is
an integer). A mask file of another size than its image is accepted when it has the image's aspect ratio
(its crop box is scaled to it). Values are then raised to `unmasked_weight`; a mask that is zero everywhere
is an error (nothing of the image would be learned).
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING, Any

from zrecipe.data.images import (
    _bad_image,
    _deep_to_l,
    _orient,
    _orientation,
    _oriented_size,
    centre_crop,
    output_size,
)
from zrecipe.errors import DatasetError

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_ASPECT_TOLERANCE = 0.01  # a mask may differ from its image in size by rounding, not in shape


def latent_mask(
    image_path: str | os.PathLike[str],
    mask_path: str | os.PathLike[str] | None,
    resolution: int,
    max_aspect: float = 2.0,
    bucketing: bool = True,
    upscale: bool = False,
    *,
    step: int = 16,
    grid: int = 8,
    unmasked_weight: float = 0.0,
    image_data: bytes | None = None,
    mask_data: bytes | None = None,
) -> np.ndarray:
    """The (h/grid, w/grid) float32 mask of an image whose resize is (w, h) (see the module docstring).

    `mask_path` None: the image's alpha channel. `image_data` / `mask_data`: the files' bytes when the
    caller has read (and checked) them already. Raises DatasetError naming the file for an image without
    alpha, a mask of another shape, an empty mask, or an undecodable file."""
    import numpy as np
    from PIL import Image

    image = _open(image_path, image_data)
    with image:
        orientation = _orientation(image)
        width, height = _oriented_size(image, orientation)
        try:
            tw, th = output_size(width, height, resolution, max_aspect, bucketing, upscale, step)
        except ValueError as exc:
            raise DatasetError(
                f"{image_path}: image is {width}×{height}, too small to resize ({exc}); remove it or set "
                "`upscale: true`",
                items=[str(image_path)],
            ) from exc
        if mask_path is None:
            mask = _orient(_alpha(image, image_path), orientation)
            where = image_path
    if mask_path is not None:
        mask, where = _mask_file(mask_path, mask_data), mask_path
        if mask.size != (width, height):
            _check_aspect(mask.size, (width, height), mask_path, image_path)
    cw, ch = centre_crop(width, height, tw, th)
    sx, sy = mask.size[0] / width, mask.size[1] / height
    box = ((width - cw) / 2 * sx, (height - ch) / 2 * sy, (width + cw) / 2 * sx, (height + ch) / 2 * sy)
    values = Image.fromarray(np.asarray(mask, dtype=np.float32) / 255.0, mode="F")
    cells = values.resize((tw // grid, th // grid), Image.Resampling.BOX, box=box)
    out = np.maximum(np.clip(np.asarray(cells, dtype=np.float32), 0.0, 1.0), np.float32(unmasked_weight))
    if not out.any():
        raise DatasetError(
            f"{where}: the mask is black everywhere, so nothing of {image_path} would be learned; fix the "
            "mask, set `unmasked_weight`, or remove the image",
            items=[str(image_path)],
        )
    return out


def _open(path, data: bytes | None) -> Image.Image:
    """Open `path`, or its bytes `data` already read."""
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        return PILImage.open(path if data is None else io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise _bad_image(path, exc) from exc


def _alpha(image: Image.Image, path) -> Image.Image:
    """The alpha channel (mode L, stored frame) of an opened image; DatasetError when it has none."""
    from PIL import Image as PILImage

    if image.mode not in ALPHA_MODES and "transparency" not in image.info:
        raise DatasetError(
            f"{path}: has no alpha channel (mode {image.mode}), so `masks: {{alpha: true}}` has no mask for "
            "it; save it with transparency, or use `masks: {folder: ...}`",
            items=[str(path)],
        )
    try:
        image.load()
        return image.convert("RGBA").getchannel("A")
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise _bad_image(path, exc) from exc


def _mask_file(path, data: bytes | None) -> Image.Image:
    """A mask image as 8-bit greyscale in its upright frame."""
    from PIL import Image as PILImage

    mask = _open(path, data)
    try:
        with mask:
            orientation = _orientation(mask)
            mask.load()
            grey = _deep_to_l(mask) if mask.mode.startswith("I") or mask.mode == "F" else mask.convert("L")
    except (OSError, SyntaxError, ValueError, PILImage.DecompressionBombError) as exc:
        raise _bad_image(path, exc) from exc
    return _orient(grey, orientation)


def _check_aspect(mask_size, image_size, mask_path, image_path) -> None:
    (mw, mh), (w, h) = mask_size, image_size
    if abs(math.log((mw / mh) / (w / h))) > _ASPECT_TOLERANCE:
        raise DatasetError(
            f"{mask_path}: the mask is {mw}×{mh} but its image {image_path} is {w}×{h} (upright); a mask "
            "must cover the whole image: export it at the image's size",
            items=[str(image_path)],
        )


def find_masks(folder: str | os.PathLike[str], rel_paths: list[str], recursive: bool) -> dict[str, Any]:
    """{image rel path: mask ImageFile} for the images with a mask in `folder`: the mask has the image's
    relative path and stem with any image extension. Several candidates for one image are an error."""
    from zrecipe.data.scan import scan_images

    by_stem: dict[str, list[Any]] = {}
    for f in scan_images(folder, recursive=recursive):
        by_stem.setdefault(os.path.splitext(f.rel_path)[0], []).append(f)
    out, ambiguous = {}, []
    for rel in rel_paths:
        found = by_stem.get(os.path.splitext(rel)[0], [])
        if len(found) > 1:
            ambiguous.append(f"{rel}: {', '.join(sorted(f.rel_path for f in found))}")
        elif found:
            out[rel] = found[0]
    if ambiguous:
        raise DatasetError(
            f"{folder}: several masks for one image (keep one per image):\n  " + "\n  ".join(ambiguous),
            items=ambiguous,
        )
    return out


def mask_file_for(folder: str | os.PathLike[str], rel_path: str) -> str:
    """The mask file of image `rel_path` in `folder` (the one `find_masks` found when planning)."""
    from zrecipe.data.scan import IMAGE_EXTENSIONS

    stem = os.path.splitext(rel_path)[0]
    parent, name = os.path.split(os.path.join(os.fspath(folder), stem))
    try:
        names = sorted(n for n in os.listdir(parent or ".") if os.path.splitext(n)[0] == name)
    except OSError:
        names = []
    found = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    if len(found) != 1:
        raise DatasetError(
            f"{folder}: expected one mask for {rel_path} ({stem}.png/.jpg/.webp), found "
            f"{', '.join(found) or 'none'}; the mask folder changed since the build was planned",
            items=[rel_path],
        )
    return os.path.join(parent, found[0])
