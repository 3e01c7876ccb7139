"""A small deterministic dataset of flat coloured shapes with captions (for `zrecipe init --tiny`).

The same generator produced `recipes/data/tiny/`; it needs no download and gives images whose captions
describe them exactly, which is what a smoke-test LoRA needs.
"""

from __future__ import annotations

import random
from pathlib import Path

COLORS = {
    "red": (220, 40, 40), "blue": (40, 70, 220), "green": (40, 170, 70), "yellow": (235, 210, 40),
    "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "stripe pattern")
SIZES = ((160, 160), (192, 128), (128, 192), (176, 144), (144, 176), (200, 150))


def write_shapes_dataset(folder: str | Path, count: int = 12, seed: int = 7) -> list[Path]:
    """Write `count` images (PNG and JPEG) with sidecar captions into `folder`; returns the image paths."""
    from PIL import Image, ImageDraw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    names = list(COLORS)
    written = []
    for i in range(count):
        fg, bg = names[i % 8], names[(i * 3 + 5) % 8]
        if bg == fg:
            bg = "white" if fg != "white" else "black"
        shape = SHAPES[i % 4]
        w, h = SIZES[i % len(SIZES)]
        im = Image.new("RGB", (w, h), COLORS[bg])
        d = ImageDraw.Draw(im)
        cx, cy, r = w // 2 + rng.randint(-10, 10), h // 2 + rng.randint(-10, 10), min(w, h) // 3
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[fg])
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[fg])
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
        else:
            for x in range(0, w, 24):
                d.rectangle([x, 0, x + 11, h], fill=COLORS[fg])
        stem = f"{i:02d}_{fg}_{shape.split()[0]}"
        path = folder / f"{stem}.{'jpg' if i % 3 else 'png'}"
        if path.suffix == ".jpg":
            im.save(path, quality=90)
        else:
            im.save(path)
        (folder / f"{stem}.txt").write_text(f"a {fg} {shape} on a {bg} background, flat shapes style\n")
        written.append(path)
    return written
