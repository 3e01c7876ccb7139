"""zrecipe: declarative, incremental dataset-and-recipe builds for fine-tuning Z-Image with MLX.

Importing the package is cheap on purpose: `zrecipe --help` and `zrecipe plan` must not import MLX. It
arranges for a fast BLAS to be selected for MLX on Linux at the first MLX import (see `zrecipe.backend`).
"""

from zrecipe.backend import configure_blas_before_mlx as _configure_blas_before_mlx

__version__ = "0.1.0"

_configure_blas_before_mlx()
