"""Captioning with a vision-language model through `mlx-vlm` (the optional `captions` extra).

One image per generation call, greedy decoding (temperature 0: the argmax token every step), a fixed token
budget: a caption is a function of the image, the model, the prompt and these settings alone — the same
on every run and whichever other images are captioned in the same process (batched generation would pad
prompts to a common length and change the numerics, as batched text encoding does).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zrecipe.errors import DatasetError, ModelError, UserError

INSTALL = "pip install 'zrecipe[captions]'"


class MissingExtra(UserError):
    """An optional feature whose packages are not installed (exit 2, saying what to install)."""


def require_mlx_vlm() -> None:
    """Raise MissingExtra unless `mlx-vlm` can be imported (checked without importing it)."""
    if importlib.util.find_spec("mlx_vlm") is None:
        raise MissingExtra(
            "captions: {generate: ...} runs a vision-language model with mlx-vlm, which is not installed. "
            f"Install the captions extra: {INSTALL}"
        )


@dataclass(frozen=True)
class Caption:
    """A generated caption: its text (on one line, whitespace runs made one space), how many tokens it took, and why generation stopped
    (`stop`: the model ended it; `length`: it reached max_tokens)."""

    text: str
    tokens: int
    finish: str


class Captioner:
    """A vision-language model loaded once, captioning one image per call."""

    def __init__(self, folder: str | Path, name: str | None = None):
        """Load the model in `folder`; `name` is how messages call it (default: the folder)."""
        require_mlx_vlm()
        import mlx_vlm
        from mlx_vlm import load

        self.folder = Path(folder)
        self.name = name or str(folder)
        try:
            self.model, self.processor = load(str(self.folder))
        except (ValueError, KeyError, OSError, TypeError, AttributeError, ImportError) as exc:
            raise ModelError(_load_problem(self.folder, exc, getattr(mlx_vlm, "__version__", "?"))) from exc

    def caption(
        self, image: Any, item: str, prompt: str, max_tokens: int, repetition_penalty=None
    ) -> Caption:
        """Caption one PIL image (`item`: the image as messages name it, e.g. its path). DatasetError (a
        per-item failure) when the model cannot process the image or generates nothing."""
        from mlx_vlm import generate
        from mlx_vlm.prompt_utils import apply_chat_template

        text = apply_chat_template(self.processor, self.model.config, prompt, num_images=1)
        options: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "top_k": 0}
        if repetition_penalty is not None:
            options["repetition_penalty"] = repetition_penalty
        try:
            result = generate(self.model, self.processor, text, image=[image], verbose=False, **options)
        except Exception as exc:  # noqa: BLE001 - any failure on this image is this item's failure
            raise DatasetError(
                f"{item}: the captioning model {self.name} cannot read this image ({type(exc).__name__}: "
                f"{exc}); re-export the image, or set `on_error: skip` to leave it out.",
                items=[item],
            ) from exc
        caption = " ".join(result.text.split())  # one line: newlines and runs of spaces become one space
        if not caption:
            raise DatasetError(
                f"{item}: the captioning model {self.name} generated an empty caption (it stopped after "
                f"{result.generation_tokens} token{'s' if result.generation_tokens != 1 else ''}); change "
                "`captions.generate.prompt`, write a caption for this image, or set `on_error: skip` to "
                "leave it out.",
                items=[item],
            )
        finish = result.finish_reason if result.finish_reason in ("stop", "length") else None
        finish = finish or ("length" if result.generation_tokens >= max_tokens else "stop")
        return Caption(caption, int(result.generation_tokens), finish)


def _load_problem(folder: Path, exc: BaseException, version: str) -> str:
    text = str(exc).strip().splitlines()
    reason = f"{type(exc).__name__}: {text[0] if text else ''}"
    if "not supported" in str(exc):
        return (
            f"captioning model {folder}: mlx-vlm {version} has no implementation of this model type "
            f"({reason}). Use a family it supports (Qwen2-VL, Qwen2.5-VL, SmolVLM, Florence-2, ...) or upgrade "
            "mlx-vlm."
        )
    return f"captioning model {folder}: mlx-vlm {version} cannot load it ({reason}); re-download the model."
