"""The one LoRA representation shared by training, export, apply and generation.

- `zrecipe.lora.delta`: what an adapter changes in one layer (`LoraDelta`, the `AdapterDelta` protocol,
  the kind registry `DELTA_KINDS`) and the one fuse (`fuse_linear`).
- `zrecipe.lora.layers`: adapter layers around a frozen base (`AdapterLayer`, `LoRALinear` for training,
  `MultiLoRALinear` for stacked application), each with `to_delta()` / `from_delta()`.
- `zrecipe.lora.mflux_checkpoint`: mflux training checkpoint zips, recognised and converted.

File conventions (zrecipe's adapter layout, mflux/ComfyUI, diffusers, kohya, musubi) live in
`zrecipe.export.lora_formats`; the recipe → target resolution and the adapter file in
`zrecipe.training.lora`. Names resolve lazily (MLX loads on first use).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AdapterDelta": "delta",
    "LoraDelta": "delta",
    "DELTA_KINDS": "delta",
    "fuse_linear": "delta",
    "AdapterLayer": "layers",
    "LoRALinear": "layers",
    "MultiLoRALinear": "layers",
    "TRAINABLE_KINDS": "layers",
    "adapter_layers": "layers",
    "linear_shapes": "layers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"zrecipe.lora.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'zrecipe.lora' has no attribute {name!r}")
