"""Observability: a one-line progress bar, the loss log and a loss plot drawn with PIL (no matplotlib)."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Progress:
    """step/total, loss, smoothed loss (EMA), it/s and ETA; redrawn in place on a terminal, one line every
    `every` steps otherwise (logs stay readable)."""

    def __init__(
        self, total: int, start: int = 0, stream: TextIO | None = None, every: int = 10, enabled=True
    ):
        self.total, self.start, self.step = total, start, start
        self.stream = stream or sys.stderr
        self.every = max(1, every)
        self.enabled = enabled
        self.smoothed: float | None = None
        self._t0 = time.perf_counter()
        self._tty = getattr(self.stream, "isatty", lambda: False)()

    def update(self, step: int, loss: float) -> None:
        self.step = step
        # EMA with bias towards recent steps: the raw per-step loss of diffusion training is very noisy.
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss
        if not self.enabled:
            return
        if self._tty or step % self.every == 0 or step == self.total:
            end = "" if self._tty and step < self.total else "\n"
            self.stream.write(("\r" if self._tty else "") + self.line(loss) + end)
            self.stream.flush()

    def line(self, loss: float) -> str:
        done = self.step - self.start
        elapsed = time.perf_counter() - self._t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.step) / rate if rate > 0 else float("nan")
        width = 24
        filled = int(width * self.step / max(1, self.total))
        bar = "#" * filled + "-" * (width - filled)
        return (
            f"[{bar}] step {self.step}/{self.total}  loss {loss:.4f}  avg {self.smoothed:.4f}  "
            f"{rate:.2f} it/s  ETA {format_seconds(eta)}"
        )

    def close(self) -> None:
        if self.enabled and self._tty:
            self.stream.write("\n")


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def write_loss_log(path: Path, history: list[dict[str, Any]]) -> None:
    from zrecipe.training.checkpoint import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(history))


def plot_loss(path: Path, history: list[dict[str, Any]], size: tuple[int, int] = (800, 400)) -> None:
    """Raw loss (light) and its moving average (dark) against the step, as a PNG; the validation loss
    (orange, dots at the steps it was measured) on the same axes when the history has one."""
    from PIL import Image, ImageDraw

    from zrecipe.training.checkpoint import atomic_path

    width, height = size
    margin = 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, 10, width - 10, height - margin], outline="black")
    points = [(float(h["step"]), float(h["loss"])) for h in history if math.isfinite(float(h["loss"]))]
    validation = [(float(h["step"]), float(h["val_loss"])) for h in history
                  if "val_loss" in h and math.isfinite(float(h["val_loss"]))]  # fmt: skip
    if points:
        steps = [p[0] for p in points]
        losses = [p[1] for p in points]
        lo, hi = min(losses + [v for _, v in validation]), max(losses + [v for _, v in validation])
        hi = hi if hi > lo else lo + 1.0
        s0, s1 = min(steps), max(steps)
        s1 = s1 if s1 > s0 else s0 + 1.0

        def xy(step: float, loss: float) -> tuple[float, float]:
            x = margin + (step - s0) / (s1 - s0) * (width - margin - 10)
            y = 10 + (1.0 - (loss - lo) / (hi - lo)) * (height - margin - 10)
            return x, y

        draw.line([xy(s, v) for s, v in points], fill=(170, 190, 230), width=1)
        window = max(1, len(points) // 20)
        smooth = [
            (
                steps[i],
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]),
            )
            for i in range(len(points))
        ]
        draw.line([xy(s, v) for s, v in smooth], fill=(20, 60, 160), width=2)
        if validation:
            if len(validation) > 1:
                draw.line([xy(s, v) for s, v in validation], fill=(230, 120, 20), width=2)
            for s, v in validation:
                x, y = xy(s, v)
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(230, 120, 20))
        draw.text((margin, height - margin + 8), f"step {int(s0)}", fill="black")
        draw.text((width - 90, height - margin + 8), f"step {int(s1)}", fill="black")
        draw.text((4, 10), f"{hi:.3g}", fill="black")
        draw.text((4, height - margin - 12), f"{lo:.3g}", fill="black")
    legend = "training loss (light: per step, dark: moving average)"
    draw.text(
        (margin + 10, height - 22), legend + ("; orange: validation" if validation else ""), fill="black"
    )
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
