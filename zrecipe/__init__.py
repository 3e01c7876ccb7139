"""zrecipe: declarative, incremental dataset-and-recipe builds for fine-tuning Z-Image with MLX.

Importing the package is cheap on purpose: `zrecipe --help` and `zrecipe plan` must not import MLX.
"""

__version__ = "0.1.0"
