"""zrecipe: declarative, incremental dataset-and-recipe builds for fine-tuning Z-Image with MLX.

Importing the package is cheap on purpose: `zrecipe --help` and `zrecipe plan` must not import MLX. It does
select a fast BLAS for MLX on Linux (a few milliseconds, before any MLX import; see `zrecipe.backend`).
"""

from zrecipe.backend import configure_blas as _configure_blas

__version__ = "0.1.0"

_configure_blas()
