"""Training: LoRA / full fine-tuning with flow matching, checkpoint zips, bit-exact resume, memory plans.

    from zrecipe.training import train, TrainSettings, Example, apply_lora, MemoryOptimizer
    from zrecipe.models.z_image.training import FlowMatchingObjective  # Z-Image's loss and batches

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
    "Example": "data",
    "BatchIterator": "data",
    "dataset_fingerprint": "data",
    "TrainSettings": "settings",
    "train": "loop",
    "TrainResult": "loop",
    "RunInfo": "checkpointer",
    "Checkpointer": "checkpointer",
    "TrainingCallback": "callbacks",
    "default_callbacks": "callbacks",
    "make_optimizer": "optim",
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
    "Checkpointer",
    "Example",
    "LoRALinear",
    "MemoryOptimizer",
    "RunInfo",
    "StopMonitor",
    "TrainResult",
    "TrainSettings",
    "TrainingCallback",
    "apply_lora",
    "dataset_fingerprint",
    "default_callbacks",
    "estimate_memory",
    "fuse_lora",
    "list_checkpoints",
    "load_adapter",
    "lora_weights",
    "make_optimizer",
    "read_checkpoint",
    "save_adapter",
    "train",
    "trainable_parameter_count",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"zrecipe.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'zrecipe.training' has no attribute {name!r}")
