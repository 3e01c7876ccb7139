"""Every image's caption after a build, where it came from, and the views of them: `captions.jsonl` in
the output folder (published with every build of a recipe with generated captions), the table of
`zrecipe caption`, and its dataset contact sheet (thumbnails with their captions).

Rows are computed from the recipe and the build's plan: human captions are resolved again exactly as
planning did (`captions.human_captions`), generated ones are read from their store entries (verified) and
finished with the dataset's template and trigger (`captions.final_caption`, what encode-text uses).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CAPTIONS_FILE = "captions.jsonl"
SHEET_THUMB = 160  # thumbnail side in the dataset contact sheet
SHEET_COLUMNS = 8
SHEET_MAX_IMAGES = 256  # a sheet of 3,000 thumbnails would be a 200-megapixel PNG


@dataclass
class CaptionRow:
    """One image. origin: `generated`, `sidecar`, `edited` (a written sidecar changed by hand),
    `manifest`, `inline`, or `missing` (its caption step failed, was skipped or has not run: `error`
    says which). caption: the final text training sees; generated: the model's own text (generated
    rows); tokens / finish: its length and why it stopped (`stop`, or `length` at max_tokens)."""

    dataset: str
    image: str
    origin: str
    caption: str | None = None
    generated: str | None = None
    tokens: int | None = None
    finish: str | None = None
    error: str | None = None

    @property
    def item(self) -> str:
        return f"{self.dataset}/{self.image}"


def generated_datasets(recipe) -> list[Any]:
    """The recipe's datasets whose captions a vision-language model generates."""
    return [ds for ds in recipe.datasets if ds.captions.kind == "generate"]


def caption_rows(recipe, plan, store, report=None, verify: bool = True) -> list[CaptionRow]:
    """A row per image of each `generate` dataset, in dataset then file order. `report` (the build's)
    gives the reason of captions that failed or were skipped; `verify`: check the caption entries'
    content hashes (the default: nothing is read from the store unchecked)."""
    from zrecipe.data import scan_images
    from zrecipe.errors import DatasetError
    from zrecipe.pipeline.captions import CAPTION_FILE, final_caption, human_captions
    from zrecipe.pipeline.vlm_captions import CAPTION_INFO, CAPTION_KIND

    nodes = plan.by_id()
    errors = {}
    kind_report = report.kinds.get(CAPTION_KIND) if report is not None else None
    if kind_report is not None:
        errors = {e["item"]: e["error"] for e in (*kind_report.failures, *kind_report.skipped_items)}
    rows = []
    for ds in generated_datasets(recipe):
        try:
            files = scan_images(ds.path, recursive=ds.recursive)
        except DatasetError:
            continue  # the build reported it
        human = human_captions(ds, files)
        for f in files:
            rel = f.rel_path
            row = CaptionRow(ds.name, rel, "missing")
            if rel in human.captions:
                row.origin, row.caption = human.origin[rel], human.captions[rel]
            elif rel in human.failed:
                row.error = "its caption file cannot be read"
            else:
                planned = nodes.get((CAPTION_KIND, row.item))
                entry = store.get(planned.key, verify=verify) if planned is not None else None
                if entry is None:
                    row.error = errors.get(row.item, "not captioned yet")
                else:
                    text = (entry / CAPTION_FILE).read_text(encoding="utf-8")
                    info = json.loads((entry / CAPTION_INFO).read_text())
                    row.origin, row.generated = "generated", text
                    row.caption = final_caption(text, rel, ds.trigger, ds.captions.template)
                    row.tokens, row.finish = info.get("tokens"), info.get("finish")
            rows.append(row)
    return rows


def write_captions_file(rows: list[CaptionRow], path: str | Path) -> Path:
    """`rows` as JSON lines (atomically)."""
    from zrecipe.engine.store import write_atomic

    text = "".join(json.dumps(asdict(r), ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    write_atomic(path, text.encode("utf-8"), fsync=False)
    return Path(path)


def publish_captions(plan, store, recipe) -> dict[str, list[str]]:
    """Write `<output_path>/captions.jsonl` for a recipe with generated captions (after a build; a build
    that found nothing stale keeps the file there: the captions are the ones it lists)."""
    if not generated_datasets(recipe) or "caption" not in plan.nodes:
        return {}
    path = Path(recipe.save.output_path) / CAPTIONS_FILE
    if plan.stale_count or not path.is_file():
        write_captions_file(caption_rows(recipe, plan, store), path)  # entries hash-checked as read
    return {"captions": [str(path)]}


def caption_sheet(recipe, rows: list[CaptionRow], path: str | Path) -> Path:
    """A dataset contact sheet: each image as a thumbnail with its caption (origin in brackets) under it;
    the first SHEET_MAX_IMAGES rows."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from zrecipe.data.images import load_image
    from zrecipe.errors import DatasetError, UserError

    if not rows:
        raise UserError("the recipe's generated-caption datasets hold no images: no contact sheet to draw.")
    folders = {ds.name: Path(ds.path) for ds in recipe.datasets}
    font = ImageFont.load_default()
    chars = max(8, SHEET_THUMB // 6)
    cells = []
    for row in rows[:SHEET_MAX_IMAGES]:
        try:
            thumb = load_image(folders[row.dataset] / row.image)
            thumb.thumbnail((SHEET_THUMB, SHEET_THUMB))
        except DatasetError:  # an image that does not decode: a grey cell, its row says why
            thumb = Image.new("RGB", (SHEET_THUMB, SHEET_THUMB), "lightgrey")
        label = f"[{row.origin}] {row.caption if row.caption is not None else row.error}"
        lines = [row.image, *textwrap.wrap(label, chars)[:6]]
        cells.append((thumb, lines))
    line_h, pad = 12, 8
    cell_h = SHEET_THUMB + pad + line_h * max(len(lines) for _, lines in cells)
    cols = min(SHEET_COLUMNS, len(cells))
    nrows = -(-len(cells) // cols)
    sheet = Image.new("RGB", (cols * (SHEET_THUMB + pad) + pad, nrows * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (thumb, lines) in enumerate(cells):
        x, y = pad + (i % cols) * (SHEET_THUMB + pad), pad + (i // cols) * (cell_h + pad)
        sheet.paste(thumb, (x, y))
        for j, line in enumerate(lines):
            draw.text((x, y + SHEET_THUMB + 4 + j * line_h), line, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")
    return path
