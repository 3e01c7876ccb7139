"""Model identity per component, from the weight files' content through the stat cache.

A changed VAE file invalidates exactly the steps that use the VAE (encode-image, sample), a changed
transformer shard exactly train / sample / export, and so on. Hashing goes through the stat cache, so a
20 GB model is read once and afterwards costs a stat per file. The identity is the content of the files
(by their path inside the model folder), however they arrived: a downloaded Hugging Face snapshot, the same
files placed by hand, or component files named in the recipe (resolved into an assembled folder of links
under the diffusers names) all give the same identity for the same bytes. The built-in `tiny` model is
identified by its generator version (it is deterministic), so planning never has to create it.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import xxhash

# Which top-level folders of a diffusers model folder each component's identity covers.
COMPONENT_FOLDERS = {
    "transformer": ("transformer", "scheduler"),
    "vae": ("vae",),
    "text_encoder": ("text_encoder", "tokenizer"),
}


class ModelIdentity:
    """Lazily resolved model folder and per-component content identities of the model spec `spec`.

    `cache_dir` (the store) is accepted for callers but decides nothing: models, and so identities, do
    not depend on the store."""

    def __init__(self, spec: str, cache_dir: str | Path, stat_cache):
        del cache_dir
        self.spec = spec
        self._stat_cache = stat_cache

    @property
    def _is_tiny(self) -> bool:
        from zrecipe.models.z_image.resolve import TINY, ModelSpec

        parsed = ModelSpec.parse(self.spec)
        return parsed.base == TINY and not parsed.files

    @cached_property
    def model_path(self) -> str | None:
        """The resolved folder (None for `tiny` before it was created: it is created when a step needs it)."""
        from zrecipe.models.z_image.resolve import resolve_model

        if self._is_tiny:
            return None
        return str(resolve_model(self.spec))

    @cached_property
    def _digests(self) -> dict[str, str]:
        if self._is_tiny:
            from zrecipe.models.z_image.tiny import TINY_VERSION

            return {c: f"tiny-v{TINY_VERSION}:{c}" for c in COMPONENT_FOLDERS}
        from zrecipe.models.z_image.resolve import model_weight_files

        root = Path(self.model_path)
        files = model_weight_files(root)
        hashes = self._stat_cache.hash_files([str(f) for f in files])
        out = {}
        for component, folders in COMPONENT_FOLDERS.items():
            h = xxhash.xxh3_128()
            for f in files:
                rel = f.relative_to(root).as_posix()
                if rel.split("/", 1)[0] in folders:
                    h.update(f"{rel}\t{hashes[str(f)]}\n".encode())
            out[component] = f"model:{h.hexdigest()}"
        return out

    @property
    def transformer(self) -> str:
        return self._digests["transformer"]

    @property
    def vae(self) -> str:
        return self._digests["vae"]

    @property
    def text_encoder(self) -> str:
        return self._digests["text_encoder"]


def resolve_model_path(data) -> Path:
    """The model folder for a running step (creates the tiny model in the model cache on first use)."""
    from zrecipe.models.z_image.resolve import resolve_model

    if data.model_path:
        return Path(data.model_path)
    path = resolve_model(data.model_spec)
    data.model_path = str(path)
    return path
