"""Training: LoRA / full fine-tuning with flow matching, checkpoint zips, bit-exact resume, memory plans.

    from zrecipe.training import train, TrainSettings, Example, apply_lora, MemoryOptimizer

Names resolve lazily (this package imports MLX; the CLI's --help path must not).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LoRALinear": "lora",
    "apply_lora": "lora",
    "fuse_lora": "lora",
    "lora_weights": "lora",
    "save_adapter": "lora",
    "load_adapter": "lora",
    "trainable_parameter_count": "lora",
    "flow_matching_loss": "loss",
    "sample_sigmas": "loss",
    "Example": "data",
    "BatchIterator": "data",
    "dataset_fingerprint": "data",
    "TrainSettings": "settings",
    "train": "loop",
    "TrainResult": "loop",
    "Checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "list_checkpoints": "checkpoint",
    "MemoryOptimizer": "memory",
    "estimate_memory": "memory",
    "StopMonitor": "stop",
}

__all__ = [
    "BatchIterator",
    "Checkpoint",
    "Example",
    "LoRALinear",
    "MemoryOptimizer",
    "StopMonitor",
    "TrainResult",
    "TrainSettings",
    "apply_lora",
    "dataset_fingerprint",
    "estimate_memory",
    "flow_matching_loss",
    "fuse_lora",
    "list_checkpoints",
    "load_adapter",
    "lora_weights",
    "read_checkpoint",
    "sample_sigmas",
    "save_adapter",
    "train",
    "trainable_parameter_count",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"zrecipe.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'zrecipe.training' has no attribute {name!r}")
