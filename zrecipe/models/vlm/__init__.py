"""Vision-language models that caption images: `tiny-vlm` (a seeded random-weight model in the real
Hugging Face layout), model resolution and identity (`resolve.py`), and captioning through `mlx-vlm`
(`caption.py`, the optional `captions` extra). Nothing here knows about recipes or the build."""
