"""LoRA export and import in every common convention, LoRA application, and full fine-tune export.

`read_lora` reads zrecipe adapters and mflux / ComfyUI / ai-toolkit, diffusers / PEFT, kohya and original
Z-Image (fused qkv) LoRAs; `write_lora` writes the mflux (= ComfyUI), diffusers and kohya formats;
`apply_loras` stacks several LoRAs on a transformer; `export_full_model` writes a diffusers model folder.
"""

from zrecipe.export.apply import MultiLoRALinear, apply_loras, linear_shapes
from zrecipe.export.full_export import export_full_model
from zrecipe.export.lora_formats import (
    FORMATS,
    LoraDelta,
    LoraWeights,
    lora_from_tensors,
    read_lora,
    write_lora,
)
from zrecipe.export.sources import load_export_source, run_export

__all__ = [
    "FORMATS",
    "LoraDelta",
    "LoraWeights",
    "MultiLoRALinear",
    "apply_loras",
    "export_full_model",
    "linear_shapes",
    "load_export_source",
    "lora_from_tensors",
    "read_lora",
    "run_export",
    "write_lora",
]
