"""The recipe language: YAML/JSON recipes → validated, frozen Recipe objects.

    from zrecipe.recipe import load_recipe, recipe_hash
    recipe = load_recipe("recipes/style.yaml")   # RecipeError listing every problem, file:line: key: ...

Defaults live in `schema.py` only. No MLX / numpy imports anywhere in this package.
"""

from zrecipe.recipe.loader import load_recipe
from zrecipe.recipe.schema import (
    BLOCK_LAYER_TYPES,
    BLOCK_TYPES,
    EXPORT_FORMATS,
    LAYER_TYPES,
    MODEL_PRESETS,
    Bucketing,
    CaptionSource,
    Dataset,
    Ema,
    Export,
    FullFinetune,
    LoraSpec,
    LoraTarget,
    Optimizer,
    Recipe,
    Sample,
    Save,
    TrainingLoop,
)
from zrecipe.recipe.serialize import recipe_hash

__all__ = [
    "BLOCK_LAYER_TYPES",
    "BLOCK_TYPES",
    "EXPORT_FORMATS",
    "LAYER_TYPES",
    "MODEL_PRESETS",
    "Bucketing",
    "CaptionSource",
    "Dataset",
    "Ema",
    "Export",
    "FullFinetune",
    "LoraSpec",
    "LoraTarget",
    "Optimizer",
    "Recipe",
    "Sample",
    "Save",
    "TrainingLoop",
    "load_recipe",
    "recipe_hash",
]
