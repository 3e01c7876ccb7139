"""The per-user cache folder for what zrecipe can rebuild at will: $XDG_CACHE_HOME/zrecipe, else
~/.cache/zrecipe (the OpenBLAS copy, remembered recipe parses, and the models zrecipe makes itself unless
$ZRECIPE_CACHE says otherwise). Nothing here is ever the only copy of anything: deleting it is safe."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_folder(name: str | None = None) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = Path(base) / "zrecipe"
    return home / name if name else home
