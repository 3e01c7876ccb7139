"""Dataset layer: find images, resolve captions, decode / bucket / resize. No recipe objects here.

Importing this package stays cheap (no PIL, numpy or MLX): the planner needs scanning and captions only.
"""

from zrecipe.data.captions import (
    CAPTION_SOURCES,
    CaptionResult,
    add_trigger,
    caption_from_filename,
    distinct_texts,
    resolve_captions,
    sidecar_path,
)
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
from zrecipe.data.scan import IMAGE_EXTENSIONS, ImageFile, scan_dataset, scan_images

__all__ = [
    "CAPTION_SOURCES",
    "IMAGE_EXTENSIONS",
    "CaptionResult",
    "ImageFile",
    "add_trigger",
    "bucket_list",
    "caption_from_filename",
    "choose_bucket",
    "distinct_texts",
    "image_size",
    "load_image",
    "output_size",
    "resize_image",
    "resize_to_file",
    "resolve_captions",
    "scan_dataset",
    "scan_images",
    "sidecar_path",
    "target_size",
]
