"""Text → image generation (`generate`) and the build's sample images and contact sheet (`samples`)."""

from zrecipe.generation.generate import GeneratedImage, GenerationSettings, generate, save_png
from zrecipe.generation.samples import SampleRequest, contact_sheet, render_samples

__all__ = [
    "GeneratedImage",
    "GenerationSettings",
    "SampleRequest",
    "contact_sheet",
    "generate",
    "render_samples",
    "save_png",
]
