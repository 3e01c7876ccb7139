"""Loss masks in the build: which images have one, the per-image `mask` node, and its run function.

    mask   item <dataset>/<image>, params {resize geometry, source, unmasked_weight, grid},
           inputs [image content hash] (alpha) or [image content hash, mask file content hash] (folder)

A mask is its own per-item node rather than part of the resize entry, so editing a mask (or adding
`masks:` to a dataset) recomputes masks and retrains, but never re-encodes an image through the VAE. Its
key covers the image (its geometry and, for `alpha`, the mask itself), the mask file's content and the
resize parameters, so the mask always matches the latents it weights; the train node references every
mask (optionally, like the images: a mask that fails under `on_error: skip` drops its item). The entry
holds `mask.npy`: float32 (h/8, w/8), the latent grid of the resized image (see zrecipe.data.masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zrecipe.errors import DatasetError

MASK_FILE = "mask.npy"


def scan_masks(recipe, scan) -> dict[str, dict[str, Any]]:
    """{dataset: {image rel path: mask ImageFile}} for datasets with `masks: {folder: ...}`. An image
    without a mask is a problem: listed in one DatasetError (`on_error: fail`) or left out of the scan
    and recorded in `scan.skipped` (`on_error: skip`)."""
    from zrecipe.data.masks import find_masks

    found: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for ds in recipe.datasets:
        if ds.masks is None or ds.masks.source != "folder" or ds.name not in scan.images:
            continue
        files = scan.images[ds.name]
        try:
            masks = find_masks(ds.masks.folder, [f.rel_path for f in files], ds.recursive)
        except DatasetError as exc:
            problems.append(f"dataset {ds.name!r}: {exc}")
            continue
        missing = [f.rel_path for f in files if f.rel_path not in masks]
        lines = [f"dataset {ds.name!r}: {rel}: no mask in {ds.masks.folder} (same name, any image type)"
                 for rel in missing]  # fmt: skip
        if ds.on_error == "skip":
            scan.skipped.extend(lines)
            scan.images[ds.name] = [f for f in files if f.rel_path in masks]
        else:
            problems.extend(lines)
        found[ds.name] = masks
    if problems:
        raise DatasetError(
            f"{recipe.source}: {len(problems)} mask problem(s):\n  " + "\n  ".join(problems)
            + "\nGive every image of a masked dataset its mask, or set `on_error: skip` to leave the rest out.",
            items=problems,
        )  # fmt: skip
    return found


def mask_params(ds, resize_params: dict[str, Any]) -> dict[str, Any] | None:
    """The mask nodes' parameters of dataset `ds` (None without masks): the resize geometry plus the
    mask source, floor and latent grid."""
    from zrecipe.models.z_image.vocabulary import VAE_DOWNSAMPLE

    if ds.masks is None:
        return None
    return {
        **resize_params,
        "source": ds.masks.source,
        "unmasked_weight": ds.masks.unmasked_weight,
        "grid": VAE_DOWNSAMPLE,
    }


def run_mask(tasks, ctx) -> None:
    """Each task's latent-grid mask (`mask.npy`), from the bytes its key was planned with."""
    import numpy as np

    from zrecipe.data.masks import latent_mask, mask_file_for
    from zrecipe.engine.files import read_verified

    for task in tasks:
        dataset, rel = task.item.split("/", 1)
        image = Path(ctx.data.dataset_folders[dataset]) / rel
        p = task.params
        mask_path, mask_data = None, None
        if p["source"] == "folder":
            mask_path = mask_file_for(ctx.data.mask_folders[dataset], rel)
            mask_data = read_verified(mask_path, task.inputs[1])
        mask = latent_mask(
            image, mask_path, p["resolution"], p["max_aspect"], p["bucketing"], p["upscale"], step=p["step"],
            grid=p["grid"], unmasked_weight=p["unmasked_weight"], image_data=read_verified(image, task.inputs[0]),
            mask_data=mask_data,
        )  # fmt: skip
        with ctx.output(task) as folder:
            np.save(folder / MASK_FILE, mask, allow_pickle=False)
